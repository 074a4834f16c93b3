#!/usr/bin/env bash
# Session 10's second GPU call (one H200): the decoder at batch 256 with and without the phase-form upsamples
# (three round-robin rounds, outputs compared), then one image and small chunks with and without the decoder's
# CUDA graph; clocks and power logged. Run from the repo root on the device with MEDAUG_COMMIT set.
set -u
export PYTHONPATH=. MEDAUG_COMMIT=${MEDAUG_COMMIT:-unknown}
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 250 > "$OUT/smi.csv" 2>&1 &
SMI=$!
run() { local name=$1 limit=$2; shift 2; echo "=== $name" >> "$OUT/all.log"
  timeout "$limit" python3 benchmarks/sample.py "$@" --json-out "$OUT/$name.json" >> "$OUT/all.log" 2>&1
  echo "=== $name rc=$?" >> "$OUT/all.log"; }
run g 200 --part g --variants fused_norm,fused_no_phase --deadline-s 190
run o 200 --part o --deadline-s 190
kill $SMI
