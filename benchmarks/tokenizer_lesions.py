"""Benchmark (quality): does the tiny tokenizer draw the brain tumour into the *image*, not only the mask?

Issue 11's failing mask agreements came from tokenizers that decoded the tumour's mask well (Dice 0.85-0.97)
but its bright FLAIR lesion barely at all (lesion contrast +0.3 against +1.05 real): the generator then drew
tumour masks over images without a visible lesion, and a UNet trained on real slices found none. This script
trains the demo's tokenizer (recipe ``tiny`` with the demo's overrides and the structure sampler) on a prepared
phantom dataset once per (arm, seed) and measures, over the train slices showing >= 8 tumour pixels, the mean
FLAIR contrast (inside the tumour minus the rest of the brain) of the real slices and of their reconstructions,
beside the tokenizer's own evaluation (PSNR, Dice). Arms: ``base`` (the recipe as it was) and ``sl1``
(``losses.structure_l1=1``, :func:`medaug.models.losses.structure_l1`).

    python benchmarks/tokenizer_lesions.py --prepared out/demo/prepared --out /tmp/lesions --seeds 3 \
        --json-out benchmarks/results/tokenizer-lesions-cpu.json

Each run is a subprocess with one thread; ``--parallel`` run at a time. Prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (benchmarks/common.py)

ARMS = {"base": [], "sl1": ["losses.structure_l1=1.0"]}


def run_one(prepared: Path, out: Path, arm: str, seed: int) -> dict[str, Any]:
    """Train one tokenizer and measure the lesion contrast of its reconstructions."""
    import numpy as np
    import torch

    from medaug.data.structures import StructureTable, read_domain_names
    from medaug.train.token_cache import train_view
    from medaug.train.tokenizer import load_tokenizer, train_tokenizer
    from medaug.train.tokenizer_eval import reconstruct
    from medaug_cli import demo

    torch.set_num_threads(1)
    overrides = [o[len("tokenizer."):] for o in demo.train_overrides(demo.DemoSettings(device="cpu"))
                 if o.startswith("tokenizer.")]
    overrides += [f"train.seed={seed}", "sampler.by=structure", "sampler.power=0.5"] + ARMS[arm]
    tick = time.perf_counter()
    summary = train_tokenizer(prepared, "tiny", out / f"{arm}@{seed}", overrides=overrides)
    seconds = time.perf_counter() - tick
    vqvae, meta = load_tokenizer(summary["checkpoint"])
    table = StructureTable.from_records(meta["structure_table"])
    dataset = train_view(prepared, table, tuple(read_domain_names(prepared)), vqvae)
    tumour = [i + 1 for i, name in enumerate(table.names) if name.startswith("brain_tumor")]
    rows = [i for i in range(len(dataset)) if np.isin(dataset[i]["label"].numpy(), tumour).sum() >= 8]
    batch = torch.utils.data.default_collate([dataset[i] for i in rows])
    image_BCHW, _, _ = reconstruct(vqvae, batch)
    real_BCHW, inside_BHW = batch["image"].numpy(), np.isin(batch["label"].numpy(), tumour)
    contrast = {"real": [], "reconstructed": []}
    for b in range(len(rows)):
        inside, outside = inside_BHW[b], (real_BCHW[b, 0] > -0.8) & ~inside_BHW[b]  # FLAIR is channel 0
        for key, flair_HW in (("real", real_BCHW[b, 0]), ("reconstructed", image_BCHW[b, 0].numpy())):
            contrast[key].append(float(flair_HW[inside].mean() - flair_HW[outside].mean()))
    evaluation = summary.get("evaluation") or {}
    return {"arm": arm, "seed": seed, "seconds": round(seconds, 1), "tumour_rows": len(rows),
            "lesion_contrast_real": float(np.mean(contrast["real"])),
            "lesion_contrast_reconstructed": float(np.mean(contrast["reconstructed"])),
            "psnr": (evaluation.get("image_mean") or {}).get("psnr"), "dice_mean": evaluation.get("dice_mean"),
            "dice": {name: (entry or {}).get("dice") for name, entry in (evaluation.get("structures") or {}).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a prepared phantom dataset (medaug demo's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        record = run_one(args.prepared, args.out, args.one[0], int(args.one[1]))
        (args.out / f"{args.one[0]}@{args.one[1]}.json").write_text(json.dumps(record, indent=1))
        return
    jobs = [(arm, seed) for seed in range(args.seeds) for arm in ARMS]
    started, running, records = time.perf_counter(), [], []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            arm, seed = jobs.pop(0)
            command = [sys.executable, __file__, "--prepared", str(args.prepared), "--out", str(args.out),
                       "--one", arm, str(seed)]
            running.append((arm, seed, subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})))
        time.sleep(2)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            path = args.out / f"{job[0]}@{job[1]}.json"
            records.append(json.loads(path.read_text()) if path.is_file() else {"arm": job[0], "seed": job[1], "error": True})
    common.report("tokenizer_lesions", started, args.json_out, records=records)


if __name__ == "__main__":
    main()
