#!/usr/bin/env bash
# Session 10's fourth GPU call (one H200, carry .whl): decoder chunks of many sizes with and without padded rows
# (sample.py part r), then the phantom pipeline with `medaug synthesize -n 10000 --format png` (redraws on).
set -u
export PYTHONPATH=. MEDAUG_COMMIT=${MEDAUG_COMMIT:-unknown}
timeout 120 python3 benchmarks/sample.py --part r --deadline-s 110 --json-out "$OUT/r.json" > "$OUT/r.log" 2>&1
echo "rc=$?" >> "$OUT/r.log"
SOURCES=phantoms TOKENIZER_MINUTES=0.5 VAR_MINUTES=0.5 EVAL_STEPS=0 SYNTH_N=10000 \
  DEADLINE_EPOCH=$(( $(date +%s) + 390 )) timeout 400 bash benchmarks/gpu_pipeline.sh > "$OUT/pipe.log" 2>&1
echo "rc=$?" >> "$OUT/pipe.log"
rm -f "$OUT"/*.png "$OUT/pipeline.tar.gz"
