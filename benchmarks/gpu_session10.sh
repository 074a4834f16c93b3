#!/usr/bin/env bash
# Session 10's GPU call (one H200): where the decoder's time goes beyond its kernels (device timeline, a CUDA
# graph of the whole decode, clocks and power logged), each convolution's cuDNN search cost at the default
# and at 25 candidates, the upsamples' phase form, and one image with the fused path from batch 1.
# Run from the repo root on the device with MEDAUG_COMMIT set; writes under $OUT.
set -u
export PYTHONPATH=. MEDAUG_COMMIT=${MEDAUG_COMMIT:-unknown}
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 250 > "$OUT/smi.csv" 2>&1 &
SMI=$!
run() { local name=$1 limit=$2; shift 2; echo "=== $name" >> "$OUT/all.log"
  timeout "$limit" python3 benchmarks/sample.py "$@" --json-out "$OUT/$name.json" >> "$OUT/all.log" 2>&1
  echo "=== $name rc=$?" >> "$OUT/all.log"; }
run t 150 --part t --deadline-s 140
run c10 90 --part c --deadline-s 85
MEDAUG_CUDNN_BENCHMARK_LIMIT=25 run c25 120 --part c --deadline-s 115
run o 200 --part o --deadline-s 190
kill $SMI
