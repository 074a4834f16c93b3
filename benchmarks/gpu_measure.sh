#!/usr/bin/env bash
# Several measurements in one device call (kind nvidia-h200-x2, <= 9 minutes), side by side (PARTS picks them):
#   pipeline   GPU 1: benchmarks/gpu_pipeline.sh (raw data -> prepare -> train -> synthesize -> own backbone -> metrics);
#   downstream GPU 0: gpu_pipeline.sh on BraTS + phantoms with shorter training, then `medaug evaluate downstream`;
#   sample     GPU 0: benchmarks/sample.py parts SAMPLE_PARTS (default "a b": d16 sampler and decoder, then d30;
#              "s": the streamed loop and the max-autotune decoder alone);
#   sweep      benchmarks/phantom_sweep.py (tiny phantom pipeline budgets; SWEEP_DEVICE cpu like CI, or cuda).
# Every part runs under a timeout that ends it LIMIT_S seconds after the start, so the logs always come back.
# Everything it keeps lands in $OUT (at most 8 files): pipeline.tar.gz + pipeline.json, downstream.tar.gz +
# downstream.json, sample-h200.json, phantom-sweep.json, logs.tar.gz.
# On the device, from the repo root, carry [".whl", ".gpu-data"]:
#   MEDAUG_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_measure.sh
# Environment: OUT (out/measure), PARTS (pipeline sample sweep), SAMPLE_DEADLINE_S (330 for part a; part b gets
# what is left of 480), SWEEP_PARALLEL (10), SWEEP_THREADS (2), SWEEP_CONFIGS (default: all of phantom_sweep.py),
# SWEEP_DEVICE (cpu), SWEEP_ROUND2 (non-empty: round-2 configs), SWEEP_ARGS (more phantom_sweep.py arguments,
# e.g. "--round3 --seeds 4 --acceptance --cfgs 1.5 --samples 192"), LIMIT_S (530), DOWNSTREAM_ENV / PIPELINE_ENV
# (variables for the two gpu_pipeline.sh runs).
set -uo pipefail
OUT=${OUT:-out/measure}
PARTS=${PARTS:-pipeline sample sweep}
SAMPLE_DEADLINE_S=${SAMPLE_DEADLINE_S:-330}
SAMPLE_PARTS=${SAMPLE_PARTS:-a b}
SWEEP_PARALLEL=${SWEEP_PARALLEL:-10}
SWEEP_THREADS=${SWEEP_THREADS:-2}
SWEEP_CONFIGS=${SWEEP_CONFIGS:-}
SWEEP_DEVICE=${SWEEP_DEVICE:-cpu}
SWEEP_ROUND2=${SWEEP_ROUND2:-}
SWEEP_ARGS=${SWEEP_ARGS:-}
LIMIT_S=${LIMIT_S:-530}
DOWNSTREAM_ENV=${DOWNSTREAM_ENV:-SOURCES=brats+phantoms TOKENIZER_MINUTES=1.5 VAR_MINUTES=1.5 SYNTH_N=1536 SYNTH_ORGANS=brain_tumor,prostate,liver EVAL_STEPS=0 DOWNSTREAM=brain_tumor,prostate}
PIPELINE_ENV=${PIPELINE_ENV:-TOKENIZER_MINUTES=2 VAR_MINUTES=2 SYNTH_N=6000 EVAL_STEPS=300}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -d .whl ] && ! python3 -c "import nibabel, monai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
logs=$(mktemp -d)
start=$(date +%s)
budget() { echo $(( LIMIT_S - ($(date +%s) - start) )); }
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
pipe_gpu=$(( gpus >= 2 ? 1 : 0 ))
pids=()
case " $PARTS " in *" pipeline "*)
  env CUDA_VISIBLE_DEVICES=$pipe_gpu OUT="$logs/pipe" DEADLINE_EPOCH=$(( start + LIMIT_S )) $PIPELINE_ENV timeout "$(budget)" bash benchmarks/gpu_pipeline.sh \
    > "$logs/pipeline.log" 2>&1 &
  pids+=($!) ;;
esac
case " $PARTS " in *" downstream "*)
  # shellcheck disable=SC2086  # DOWNSTREAM_ENV holds several NAME=value words
  env CUDA_VISIBLE_DEVICES=0 OUT="$logs/down" DEADLINE_EPOCH=$(( start + LIMIT_S )) $DOWNSTREAM_ENV timeout "$(budget)" bash benchmarks/gpu_pipeline.sh \
    > "$logs/downstream.log" 2>&1 &
  pids+=($!) ;;
esac
case " $PARTS " in *" sample "*)
  (
    for part in $SAMPLE_PARTS; do
      deadline=$([ "$part" = b ] && echo 150 || echo "$SAMPLE_DEADLINE_S")
      CUDA_VISIBLE_DEVICES=0 timeout "$(budget)" python3 benchmarks/sample.py --part "$part" --deadline-s "$deadline" \
        --json-out "$logs/sample-$part.json" > "$logs/sample-$part.log" 2>&1
    done
  ) &
  pids+=($!) ;;
esac
case " $PARTS " in *" sweep "*)
  only=""
  for name in $SWEEP_CONFIGS; do only="$only --only $name"; done
  # shellcheck disable=SC2086
  if [ -n "$SWEEP_ROUND2" ]; then only="$only --round2 --acceptance"; fi
  only="$only $SWEEP_ARGS"
  CUDA_VISIBLE_DEVICES=$([ "$SWEEP_DEVICE" = cpu ] && echo "" || echo 0) timeout "$(budget)" nice -n 10 \
    python3 benchmarks/phantom_sweep.py --out "$logs/sweep" --device "$SWEEP_DEVICE" \
    --parallel "$SWEEP_PARALLEL" --threads "$SWEEP_THREADS" $only --json-out "$OUT/phantom-sweep.json" \
    --deadline-s $(( $(budget) - 25 )) \
    > "$logs/sweep.log" 2>&1 &
  pids+=($!) ;;
esac
for pid in "${pids[@]}"; do wait "$pid"; done
python3 - "$logs" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
logs, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {}
for part in ("a", "b", "s"):
    path = logs / f"sample-{part}.json"
    if path.exists():
        data = json.loads(path.read_text())
        for key, value in data.items():
            merged[key if key not in merged or key == "benchmark" else f"{key}_{part}"] = value
if merged:
    (out / "sample-h200.json").write_text(json.dumps(merged, indent=2))
EOF
cp "$logs/pipe/pipeline.tar.gz" "$logs/pipe/pipeline.json" "$OUT/" 2>/dev/null
cp "$logs/down/pipeline.tar.gz" "$OUT/downstream.tar.gz" 2>/dev/null
cp "$logs/down/pipeline.json" "$OUT/downstream.json" 2>/dev/null
tail -n 5 "$logs"/sweep/*.log > "$logs/sweep-configs.log" 2>/dev/null
cp "$logs/pipe/run.log" "$logs/pipeline-run.log" 2>/dev/null
cp "$logs/down/run.log" "$logs/downstream-run.log" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$logs" --exclude=pipe --exclude=down --exclude=sweep . 2>/dev/null
tail -n 8 "$logs"/*.log
ls -la "$OUT"
