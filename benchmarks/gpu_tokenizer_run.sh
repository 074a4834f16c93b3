#!/usr/bin/env bash
# One self-contained GPU run of the paired tokenizer (issue 4), for one `device` call of <= 9 minutes:
#   prepare the carried NIfTI scans of ../shared/real (.gpu-data/real, made by ../shared/device/stage-data.sh)
#   plus procedural phantoms -> train the 256² tokenizer for TRAIN_MINUTES -> evaluate on val ->
#   metrics JSON, reconstruction grid and logs packed into $OUT/tokenizer-run.tar.gz (< 16 MiB).
# Run on the device (from the repo root, .whl and .gpu-data carried):
#   bash benchmarks/gpu_tokenizer_run.sh
# Environment: OUT (default out/gpu), TRAIN_MINUTES (5.5), MAX_STEPS (800: ~2.3 steps/s at batch 32 on one
# H200 including data loading), WORKERS (12), PHANTOMS (6 per domain), RECIPE (recipes/models/tokenizer-256.yaml),
# EXTRA_SET (more --set overrides, e.g. for a CPU smoke run with the tiny recipe).
set -euo pipefail
OUT=${OUT:-out/gpu}
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5}
MAX_STEPS=${MAX_STEPS:-800}
WORKERS=${WORKERS:-12}
PHANTOMS=${PHANTOMS:-6}
RECIPE=${RECIPE:-recipes/models/tokenizer-256.yaml}
EXTRA_SET=${EXTRA_SET:-}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import nibabel, monai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
work=$(mktemp -d)
real=$(pwd)/.gpu-data/real
medaug() { python3 -m medaug_cli.app "$@"; }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/run.log"; }

log "phantoms"
medaug phantoms --out "$work/phantoms" --n "$PHANTOMS" --json > "$work/phantoms.json"

cat > "$work/prepare.yaml" <<EOF
sources:
  - {path: $real/brats2013, dataset: $(pwd)/recipes/datasets/brats2013.yaml}
  - {path: $real/totalsegmentator, dataset: $(pwd)/recipes/datasets/real_totalsegmentator_ct_sm.yaml}
  - {path: $real/totalsegmentator, dataset: $(pwd)/recipes/datasets/real_totalsegmentator_mr.yaml}
  - {path: $work/phantoms/ct_abdomen, dataset: $(pwd)/recipes/datasets/phantom_ct_abdomen.yaml}
  - {path: $work/phantoms/mr_prostate, dataset: $(pwd)/recipes/datasets/phantom_mr_prostate.yaml}
  - {path: $work/phantoms/mr_brain, dataset: $(pwd)/recipes/datasets/phantom_mr_brain.yaml}
domains:
  ct/abdomen: {modality: ct, channels: [ct], spacing_mm: 1.5, size: 256, intensity: {ct: {window_hu: [-160, 240]}}}
  mr/abdomen: {modality: mr, channels: [mr], spacing_mm: 1.5, size: 256, intensity: {mr: {percentiles: [0.5, 99.5]}}}
  mr/prostate: {modality: mr, channels: [t2, adc], spacing_mm: 0.6, size: 256, intensity: {t2: {percentiles: [0.5, 99.5]}, adc: {percentiles: [0.5, 99.5]}}}
  mr/brain: {modality: mr, channels: [flair, t1c], spacing_mm: 1.0, size: 256, intensity: {flair: {percentiles: [0.5, 99.5]}, t1c: {percentiles: [0.5, 99.5]}}}
EOF
log "prepare"
medaug prepare --recipe "$work/prepare.yaml" --out "$work/prepared" --workers "$WORKERS" --json > "$OUT/prepare.json"

log "train tokenizer (${TRAIN_MINUTES} min, <= ${MAX_STEPS} steps)"
medaug train tokenizer --data "$work/prepared" --recipe "$RECIPE" --out "$work/run" --json \
  --set train.max_minutes="$TRAIN_MINUTES" --set train.max_steps="$MAX_STEPS" \
  --set train.checkpoint_every=100000 --set train.log_every=50 --set train.num_workers=8 \
  --set losses.gan_start_step=$((MAX_STEPS * 6 / 10)) --set codebook.reinit_every=200 --set codebook.reinit_until=$((MAX_STEPS / 2)) \
  --set train.optim.vqvae.warmup_steps=$((MAX_STEPS / 10)) $EXTRA_SET > "$OUT/train.json"
log "done"

cp "$work/run/log.jsonl" "$work/run/metrics.json" "$work/run/reconstructions.png" "$OUT/" 2>/dev/null || true
tar -czf "$work/tokenizer-run.tar.gz" -C "$OUT" . && mv "$work/tokenizer-run.tar.gz" "$OUT/"
ls -la "$OUT"
