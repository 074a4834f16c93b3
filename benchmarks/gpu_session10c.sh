#!/usr/bin/env bash
# Session 10's third GPU call (one H200): benchmarks/sample.py part f, every default as shipped (decoder alone,
# d16 at 1/16/64/256 with decode, streamed, d30), with clocks and power logged.
set -u
export PYTHONPATH=. MEDAUG_COMMIT=${MEDAUG_COMMIT:-unknown}
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 250 > "$OUT/smi.csv" 2>&1 &
SMI=$!
timeout 470 python3 benchmarks/sample.py --part f --deadline-s 450 --json-out "$OUT/f.json" > "$OUT/f.log" 2>&1
echo "rc=$?" >> "$OUT/f.log"
kill $SMI
