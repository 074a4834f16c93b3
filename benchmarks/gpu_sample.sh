#!/usr/bin/env bash
# One device call (kind nvidia-h200-x2, <= 9 minutes) of benchmarks/sample.py (issue 9): part a (d16:
# ceilings, correctness, decoder variants, d16 sampling) on GPU 0 and part b (d30 sampling, the filter)
# on GPU 1 at the same time, then one merged JSON. Needs only the image's torch (no wheels).
#   MEDAUG_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_sample.sh
# Environment: OUT (default out/gpu-sample), DEADLINE_S (seconds each part may plan for, default 420).
set -uo pipefail
OUT=${OUT:-out/gpu-sample}
DEADLINE_S=${DEADLINE_S:-420}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then b_gpu=1; else b_gpu=0; fi
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/sample.py --part a --deadline-s "$DEADLINE_S" \
  --json-out "$OUT/sample-a.json" > "$OUT/log-a.txt" 2>&1 &
pid_a=$!
if [ "$b_gpu" = 0 ]; then wait $pid_a; fi  # one GPU: run the parts one after the other
CUDA_VISIBLE_DEVICES=$b_gpu python3 benchmarks/sample.py --part b --deadline-s "$DEADLINE_S" \
  --json-out "$OUT/sample-b.json" > "$OUT/log-b.txt" 2>&1 &
pid_b=$!
wait $pid_a; rc_a=$?
wait $pid_b; rc_b=$?
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
merged = {}
for part in ("a", "b"):
    path = out / f"sample-{part}.json"
    if path.exists():
        data = json.loads(path.read_text())
        merged.setdefault("benchmark", data.get("benchmark"))
        for key, value in data.items():
            merged[key if key not in merged or key in ("benchmark",) else f"{key}_{part}"] = value
(out / "sample-h200.json").write_text(json.dumps(merged, indent=2))
EOF
tail -n 25 "$OUT/log-a.txt" "$OUT/log-b.txt"
echo "rc_a=$rc_a rc_b=$rc_b"
