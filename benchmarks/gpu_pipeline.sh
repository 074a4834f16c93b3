#!/usr/bin/env bash
# The whole MedVAR pipeline in one self-contained device call of <= 9 minutes (issue 6 part 5):
#   raw carried data (.gpu-data/real: the NIfTI scans of ../shared/real, made by `bash ../shared/device/stage-data.sh`,
#   plus procedural phantoms) -> medaug prepare (~1 min) -> medaug train all: the 256² tokenizer (~3 min, evaluated on
#   val), the token cache, the MedVAR transformer (~3 min) and its end-of-training sample grid (~1 min)
#   -> one archive $OUT/pipeline.tar.gz (< 16 MiB): pipeline.json (stage times, prepare counts, tokenizer val scores,
#   VAR train metrics, sample records, machine), loss curves, reconstruction and sample grids, logs.
# Loose copies of pipeline.json, loss_curves.png, reconstructions.png, samples.png and run.log stay beside it.
# On the device, from the repo root, carry [".whl", ".gpu-data"]:
#   bash benchmarks/gpu_pipeline.sh
# CPU smoke (tiny models, phantoms only, a few steps; about 3 minutes on 2 cores):
#   OUT=/tmp/pipe SOURCES=phantoms PHANTOMS=1 TOKENIZER_RECIPE=tiny VAR_RECIPE=medvar-tiny TOKENIZER_STEPS=20 \
#   VAR_STEPS=20 VAR_BATCH=8 VAR_BASE_LR= VAR_COMPILE=false WORKERS=2 TOKENIZER_BATCH=8 TOKENIZER_WORKERS=1 SAMPLES_PER_DOMAIN=2 bash benchmarks/gpu_pipeline.sh
# Environment (defaults for one H200): OUT (out/pipeline), SOURCES (real+phantoms | phantoms), PHANTOMS (6 per domain),
# WORKERS (12 prepare processes), TOKENIZER_RECIPE (tokenizer-256), TOKENIZER_MINUTES (3), TOKENIZER_STEPS (450),
# TOKENIZER_BATCH (32), TOKENIZER_WORKERS (8 DataLoader workers), VAR_RECIPE (medvar-d16), VAR_MINUTES (3), VAR_STEPS (600), VAR_BATCH (128), VAR_BASE_LR (4e-4:
# lr = base_lr * batch / 256; empty for a recipe that sets train.optim.var.lr, like medvar-tiny),
# VAR_COMPILE (true: per-block torch.compile), SAMPLES_PER_DOMAIN (8), TOKENIZER_EXTRA / VAR_EXTRA (more `--set stage.key=value` overrides),
# SYNTH_N (10000 samples of `medaug synthesize` after training, timed end to end; 0 skips it), SYNTH_BATCH (256),
# SYNTH_REDRAWS (2, synthesize's default: samples missing their organ are drawn again; 0 for the sampler's speed alone),
# SYNTH_FORMATS (png), SYNTH_ORGANS ("liver prostate brain"), SYNTH_WORKERS (8 export threads), EVAL_STEPS (400 steps of
# `medaug train features`, then `medaug evaluate metrics` with that own backbone; 0 skips both), FEATURES_RECIPE
# (features), EVAL_DEVICE (cuda when present, else cpu), DOWNSTREAM (structures for `medaug evaluate downstream`,
# e.g. "brain_tumor prostate"; empty skips it), DOWNSTREAM_STEPS (300), DOWNSTREAM_SEEDS (3), DOWNSTREAM_FRACTIONS
# (0.25,1), DOWNSTREAM_RATIOS (0.5), DEADLINE_EPOCH (date +%s by which the report must be written: the evaluation
# stages are cut short 40 s before it; 0 = none), SIZE (256: slice side of every domain; the spacing scales with it). SYNTH_ORGANS and DOWNSTREAM take spaces or commas between names. SOURCES may also be brats+phantoms (BraTS 2013 and the phantoms only).
set -euo pipefail
OUT=${OUT:-out/pipeline}
SOURCES=${SOURCES:-real+phantoms}
SIZE=${SIZE:-256}
PHANTOMS=${PHANTOMS:-6}
WORKERS=${WORKERS:-12}
TOKENIZER_RECIPE=${TOKENIZER_RECIPE:-tokenizer-256}
TOKENIZER_MINUTES=${TOKENIZER_MINUTES:-3}
TOKENIZER_STEPS=${TOKENIZER_STEPS:-450}
TOKENIZER_BATCH=${TOKENIZER_BATCH:-32}
TOKENIZER_WORKERS=${TOKENIZER_WORKERS:-8}
VAR_RECIPE=${VAR_RECIPE:-medvar-d16}
VAR_MINUTES=${VAR_MINUTES:-3}
VAR_STEPS=${VAR_STEPS:-600}
VAR_BATCH=${VAR_BATCH:-128}
VAR_BASE_LR=${VAR_BASE_LR-4e-4}
VAR_COMPILE=${VAR_COMPILE:-true}
SAMPLES_PER_DOMAIN=${SAMPLES_PER_DOMAIN:-8}
SYNTH_N=${SYNTH_N:-10000}
SYNTH_BATCH=${SYNTH_BATCH:-256}
SYNTH_REDRAWS=${SYNTH_REDRAWS:-2}
SYNTH_FORMATS=${SYNTH_FORMATS:-png}
SYNTH_ORGANS=${SYNTH_ORGANS:-liver prostate brain}
SYNTH_WORKERS=${SYNTH_WORKERS:-8}
EVAL_STEPS=${EVAL_STEPS:-400}
FEATURES_RECIPE=${FEATURES_RECIPE:-features}
DOWNSTREAM=${DOWNSTREAM:-}
DOWNSTREAM_STEPS=${DOWNSTREAM_STEPS:-300}
DOWNSTREAM_SEEDS=${DOWNSTREAM_SEEDS:-3}
DOWNSTREAM_FRACTIONS=${DOWNSTREAM_FRACTIONS:-0.25,1}
DOWNSTREAM_RATIOS=${DOWNSTREAM_RATIOS:-0.5}
DEADLINE_EPOCH=${DEADLINE_EPOCH:-0}
EVAL_DEVICE=${EVAL_DEVICE:-$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
TOKENIZER_EXTRA=${TOKENIZER_EXTRA:-}
VAR_EXTRA=${VAR_EXTRA:-}
TOKENIZER_EXTRA=${TOKENIZER_EXTRA//;/ }  # ';' may stand for ' ' (an env word holds no spaces)
VAR_EXTRA=${VAR_EXTRA//;/ }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -d .whl ] && ! python3 -c "import nibabel, monai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
work=$(mktemp -d)
real=$(pwd)/.gpu-data/real
started=$(date +%s)
medaug() { python3 -m medaug_cli.app "$@"; }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/run.log"; }
# seconds left for a late stage: until DEADLINE_EPOCH minus 40 s for the report (no deadline: a day)
left() { if [ "$DEADLINE_EPOCH" -gt 0 ]; then echo $(( DEADLINE_EPOCH - $(date +%s) - 40 > 1 ? DEADLINE_EPOCH - $(date +%s) - 40 : 1 )); else echo 86400; fi; }
mark() { echo "\"$1\": $(( $(date +%s) - started ))," >> "$work/marks.txt"; }

log "phantoms ($PHANTOMS per domain), sources: $SOURCES"
medaug phantoms --out "$work/phantoms" --n "$PHANTOMS" --json > "$work/phantoms.json"
{
  echo "sources:"
  if [ "$SOURCES" = "real+phantoms" ] || [ "$SOURCES" = "brats+phantoms" ]; then
    echo "  - {path: $real/brats2013, dataset: $(pwd)/recipes/datasets/brats2013.yaml}"
  fi
  if [ "$SOURCES" = "real+phantoms" ]; then
    echo "  - {path: $real/totalsegmentator, dataset: $(pwd)/recipes/datasets/real_totalsegmentator_ct_sm.yaml}"
    echo "  - {path: $real/totalsegmentator, dataset: $(pwd)/recipes/datasets/real_totalsegmentator_mr.yaml}"
  fi
  echo "  - {path: $work/phantoms/ct_abdomen, dataset: $(pwd)/recipes/datasets/phantom_ct_abdomen.yaml}"
  echo "  - {path: $work/phantoms/mr_prostate, dataset: $(pwd)/recipes/datasets/phantom_mr_prostate.yaml}"
  echo "  - {path: $work/phantoms/mr_brain, dataset: $(pwd)/recipes/datasets/phantom_mr_brain.yaml}"
  echo "domains:"
  # spacing at SIZE: the 256-pixel spacing times 256 / SIZE (the same field of view)
  mm() { python3 -c "print(round($1 * 256 / $SIZE, 3))"; }
  echo "  ct/abdomen: {modality: ct, channels: [ct], spacing_mm: $(mm 1.5), size: $SIZE, intensity: {ct: {window_hu: [-160, 240]}}}"
  if [ "$SOURCES" = "real+phantoms" ]; then
    echo "  mr/abdomen: {modality: mr, channels: [mr], spacing_mm: $(mm 1.5), size: $SIZE, intensity: {mr: {percentiles: [0.5, 99.5]}}}"
  fi
  echo "  mr/prostate: {modality: mr, channels: [t2, adc], spacing_mm: $(mm 0.6), size: $SIZE, intensity: {t2: {percentiles: [0.5, 99.5]}, adc: {percentiles: [0.5, 99.5]}}}"
  echo "  mr/brain: {modality: mr, channels: [flair, t1c], spacing_mm: $(mm 1.0), size: $SIZE, intensity: {flair: {percentiles: [0.5, 99.5]}, t1c: {percentiles: [0.5, 99.5]}}}"
} > "$work/prepare.yaml"
mark start_prepare
log "prepare ($WORKERS workers)"
medaug prepare --recipe "$work/prepare.yaml" --out "$work/prepared" --workers "$WORKERS" --json > "$work/prepare.json"
mark end_prepare

# one recipe file for `medaug train all`: the two stages' recipes by name
printf 'tokenizer: %s\nvar: %s\n' "$TOKENIZER_RECIPE" "$VAR_RECIPE" > "$work/all.yaml"
log "train all: tokenizer ${TOKENIZER_RECIPE} (${TOKENIZER_MINUTES} min, <= ${TOKENIZER_STEPS} steps), then ${VAR_RECIPE} (${VAR_MINUTES} min, <= ${VAR_STEPS} steps) and its sample grid"
mark start_train
# shellcheck disable=SC2086  # the EXTRA variables hold several --set options
medaug train all --data "$work/prepared" --recipe "$work/all.yaml" --out "$work/gen" --json \
  --set tokenizer.train.max_minutes="$TOKENIZER_MINUTES" --set tokenizer.train.max_steps="$TOKENIZER_STEPS" \
  --set tokenizer.train.batch_size="$TOKENIZER_BATCH" --set tokenizer.train.checkpoint_every=100000 \
  --set tokenizer.train.log_every=10 --set tokenizer.train.num_workers="$TOKENIZER_WORKERS" \
  --set tokenizer.losses.gan_start_step=$((TOKENIZER_STEPS * 6 / 10)) --set tokenizer.codebook.reinit_every=100 \
  --set tokenizer.codebook.reinit_until=$((TOKENIZER_STEPS / 2)) \
  --set tokenizer.train.optim.vqvae.warmup_steps=$((TOKENIZER_STEPS / 10)) $TOKENIZER_EXTRA \
  --set var.train.max_minutes="$VAR_MINUTES" --set var.train.max_steps="$VAR_STEPS" \
  --set var.train.batch_size="$VAR_BATCH" ${VAR_BASE_LR:+--set var.base_lr=$VAR_BASE_LR} \
  --set var.train.optim.var.warmup_steps=$((VAR_STEPS / 20)) --set var.train.checkpoint_every=100000 \
  --set var.train.log_every=10 --set var.train.compile="$VAR_COMPILE" --set var.samples.per_domain="$SAMPLES_PER_DOMAIN" \
  $VAR_EXTRA > "$work/train.json"
mark end_train
if [ "$SYNTH_N" -gt 0 ]; then
  log "synthesize $SYNTH_N samples (${SYNTH_FORMATS}, batch $SYNTH_BATCH) balanced over $SYNTH_ORGANS"
  organs=""
  for organ in ${SYNTH_ORGANS//,/ }; do organs="$organs --organ $organ"; done
  medaug synthesize --checkpoint "$work/gen" --out "$work/synth" -n "$SYNTH_N" $organs --format "$SYNTH_FORMATS" \
    --batch-size "$SYNTH_BATCH" --redraws "$SYNTH_REDRAWS" --workers "$SYNTH_WORKERS" --json > "$work/synth.json"
  cp "$work/synth/montage.png" "$OUT/synth_montage.png" 2>/dev/null || true
fi
mark end_synth
if [ "$SYNTH_N" -gt 0 ] && [ "$EVAL_STEPS" -gt 0 ]; then
  log "own feature backbone (${FEATURES_RECIPE}, $EVAL_STEPS steps) and medaug evaluate metrics on the test split"
  # a failure here is logged and the run still packs what the earlier stages produced
  medaug train features --data "$work/prepared" --out "$work/features" --recipe "$FEATURES_RECIPE" \
    --max-steps "$EVAL_STEPS" --json > "$work/features.json" || log "train features failed"
  timeout "$(left)" python3 -m medaug_cli.app evaluate metrics --real "$work/prepared" --synthetic "$work/synth" --backbone medaug="$work/features" \
    --out "$work/report" --device "$EVAL_DEVICE" --json > "$work/metrics.json" 2> "$work/metrics.err" \
    || { log "evaluate failed (exit $?): $(tail -c 600 "$work/metrics.err" | tr '\n' ' ')"; rm -f "$work/metrics.json"; }
  cp "$work/report/report.md" "$OUT/metrics_report.md" 2>/dev/null || true
fi
mark end_eval
if [ "$SYNTH_N" -gt 0 ] && [ -n "$DOWNSTREAM" ]; then
  log "downstream segmentation ($DOWNSTREAM; $DOWNSTREAM_STEPS steps x $DOWNSTREAM_SEEDS seeds, fractions $DOWNSTREAM_FRACTIONS)"
  structures=""
  for name in ${DOWNSTREAM//,/ }; do structures="$structures --structure $name"; done
  # shellcheck disable=SC2086
  timeout "$(left)" python3 -m medaug_cli.app evaluate downstream --real "$work/prepared" --synthetic "$work/synth" $structures --steps "$DOWNSTREAM_STEPS" \
    --seeds "$DOWNSTREAM_SEEDS" --fractions "$DOWNSTREAM_FRACTIONS" --ratios "$DOWNSTREAM_RATIOS" --device "$EVAL_DEVICE" \
    --out "$work/downstream" --json > "$work/downstream.json" 2> "$work/downstream.err" \
    || { log "downstream failed (exit $?): $(tail -c 600 "$work/downstream.err" "$work/downstream.json" | tr '\n' ' ')"; rm -f "$work/downstream.json"; }
  cp "$work/downstream/report.md" "$OUT/downstream_report.md" 2>/dev/null || true
fi
mark end_downstream
log "report"

python3 - "$work" "$OUT" <<'PY'
"""pipeline.json (stage times, prepare counts, tokenizer val scores, VAR metrics, samples, machine) and loss_curves.png."""
import json, platform, subprocess, sys, time
from pathlib import Path

from PIL import Image, ImageDraw

work, out = Path(sys.argv[1]), Path(sys.argv[2])
marks = json.loads("{" + (work / "marks.txt").read_text().strip().rstrip(",") + "}")
prepare = json.loads((work / "prepare.json").read_text())
trained = json.loads((work / "train.json").read_text())
synth = json.loads((work / "synth.json").read_text()) if (work / "synth.json").is_file() else None
def optional(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


features, metrics, downstream = optional("features.json"), optional("metrics.json"), optional("downstream.json")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


logs = {"tokenizer": records(work / "gen" / "tokenizer_run" / "log.jsonl"), "var": records(work / "gen" / "log.jsonl")}


def curve(panel, rows, key, colour, draw, box):
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    left, top, right, bottom = box
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text((left + 4, top + 2), f"{panel}: {key}", fill=colour)
    if len(points) < 2:
        return
    steps, values = [p[0] for p in points], [p[1] for p in points]
    low, high, last = min(values), max(values), max(steps)
    draw.text((left + 4, bottom - 12), f"step {last}   {low:.3g} .. {high:.3g}", fill=(200, 200, 200))
    scale = lambda s, v: (left + 6 + (right - left - 12) * s / max(last, 1),
                          bottom - 16 - (bottom - top - 34) * (v - low) / max(high - low, 1e-12))
    draw.line([scale(s, v) for s, v in points], fill=colour, width=2)


panels = [("tokenizer", "loss"), ("tokenizer", "l1"), ("tokenizer", "dice"), ("var", "loss"), ("var", "acc"),
          ("var", "samples_per_s")]
canvas = Image.new("RGB", (3 * 360, 2 * 220), "black")
draw = ImageDraw.Draw(canvas)
for i, (stage, key) in enumerate(panels):
    x, y = (i % 3) * 360, (i // 3) * 220
    curve(stage, logs[stage], key, (80, 200, 255) if stage == "var" else (255, 180, 60), draw, (x + 4, y + 4, x + 356, y + 216))
canvas.save(out / "loss_curves.png")

tokenizer, var = trained.get("tokenizer", {}), trained.get("var", {})


def last_rate(rows):
    rates = [row["samples_per_s"] for row in rows[1:] if "samples_per_s" in row]  # the first interval holds compilation
    return round(sorted(rates)[len(rates) // 2], 1) if rates else None


try:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=30).stdout.split("\n")[0].strip()
except OSError:
    gpus = None
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30).stdout.strip() or None
except OSError:
    commit = None
import torch

summary = {
    "benchmark": "gpu_pipeline", "date": time.strftime("%Y-%m-%d"), "commit": commit,
    "machine": {"gpu": gpus, "torch": torch.__version__, "python": platform.python_version()},
    "stage_seconds": {"phantoms_and_recipe": marks["start_prepare"], "prepare": marks["end_prepare"] - marks["start_prepare"],
                      "train_all": marks["end_train"] - marks["start_train"],
                      "synthesize": marks["end_synth"] - marks["end_train"],
                      "evaluate": marks["end_eval"] - marks["end_synth"],
                      "downstream": marks["end_downstream"] - marks["end_eval"], "total": marks["end_downstream"]},
    "prepare": {key: prepare.get(key) for key in ("volumes_total", "volumes_rejected", "slices", "slices_per_domain",
                                                  "slices_per_split") if key in prepare},
    "tokenizer": {"step": tokenizer.get("step"), "stopped_by": tokenizer.get("stopped_by"),
                  "images_per_s_median": last_rate(logs["tokenizer"]), "last_metrics": tokenizer.get("train_metrics"),
                  "evaluation": tokenizer.get("evaluation")},
    "var": {"step": var.get("step"), "stopped_by": var.get("stopped_by"), "images_per_s_median": last_rate(logs["var"]),
            "train_metrics": var.get("train_metrics"), "token_cache": var.get("token_cache"),
            "samples": (var.get("samples") or {}).get("samples")},
    "synthesize": None if synth is None else {
        "samples": synth.get("samples"), "formats": synth["settings"]["formats"], "batch_size": synth["settings"]["batch_size"],
        "dtype": synth["settings"]["dtype"], "wall_s_incl_load_and_compile": marks["end_synth"] - marks["end_train"],
        "generate_and_export_s": synth["timing"]["seconds_rank0"],
        "stage_seconds": synth["timing"].get("stage_seconds_rank0"),
        "images_per_s": round(synth["samples"] / max(synth["timing"]["seconds_rank0"], 1e-9), 1),
        "first_batch_s": synth["timing"].get("first_batch_seconds_rank0"),
        "images_per_s_after_first_batch": round(
            (synth["samples"] - synth["timing"].get("first_batch_samples_rank0", 0))
            / max(synth["timing"]["seconds_rank0"] - synth["timing"].get("first_batch_seconds_rank0", 0), 1e-9), 1),
        "adherence": synth.get("adherence", {}).get("targets")},
    "features": None if features is None else {"step": features.get("step"), "evaluation": features.get("evaluation")},
    "metrics": metrics,
    "downstream": downstream,
}
(out / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(json.dumps({key: summary[key] for key in ("stage_seconds", "prepare")}, default=str))
print("tokenizer", summary["tokenizer"]["step"], summary["tokenizer"]["images_per_s_median"], "img/s;",
      "var", summary["var"]["step"], summary["var"]["images_per_s_median"], "img/s")
PY

cp "$work/gen/tokenizer_run/reconstructions.png" "$work/gen/samples.png" "$OUT/" 2>/dev/null || true
pack=$work/pack
mkdir -p "$pack"
cp "$OUT/pipeline.json" "$OUT/loss_curves.png" "$OUT/run.log" "$work/prepare.json" "$work/train.json" "$work/prepare.yaml" "$pack/"
cp "$work/synth.json" "$OUT/synth_montage.png" "$pack/" 2>/dev/null || true
cp -r "$work/report" "$pack/metrics_report" 2>/dev/null || true
cp -r "$work/downstream" "$pack/downstream_report" 2>/dev/null || true
cp "$work/gen/tokenizer_run/log.jsonl" "$pack/tokenizer_log.jsonl"
cp "$work/gen/log.jsonl" "$pack/var_log.jsonl"
cp "$work/gen/tokenizer_run/metrics.json" "$pack/tokenizer_metrics.json" 2>/dev/null || true
cp "$work/gen/metrics.json" "$pack/var_metrics.json" 2>/dev/null || true
cp "$work/gen/samples.json" "$pack/" 2>/dev/null || true
cp "$OUT"/reconstructions.png "$OUT"/samples.png "$pack/" 2>/dev/null || true
tar -czf "$OUT/pipeline.tar.gz" -C "$pack" .
log "archive $(du -h "$OUT/pipeline.tar.gz" | cut -f1), total $(( $(date +%s) - started )) s"
ls -la "$OUT"
