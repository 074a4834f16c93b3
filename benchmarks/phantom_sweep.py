"""Which training budget makes the tiny phantom pipeline good enough? A sweep of demo-sized runs.

Each configuration runs the demo's stages (phantoms → prepare at 64² → ``medaug train all --recipe
medvar-tiny`` with overrides → ``medaug synthesize`` of liver, prostate and brain_tumor, no files) in its
own process with ``--threads`` torch threads, several at once, and records per configuration: the
tokenizer's validation Dice per structure, MedVAR's last training loss/accuracy, condition adherence per
target, and wall/CPU seconds per stage. Issue 11's quality acceptance test picks its budget from this.

    python benchmarks/phantom_sweep.py --out /tmp/sweep --parallel 8 --threads 2 --json-out sweep.json
    python benchmarks/phantom_sweep.py --out /tmp/sweep --only base --json-out sweep.json   # one config
    python benchmarks/phantom_sweep.py --out /tmp/sweep --round3 --seeds 4 --acceptance --cfgs 1.5 ...

``--seeds K`` runs every configuration K times as ``name@s`` (s = 0..K-1): training seeds
(``tokenizer.train.seed``, ``var.train.seed``) and the synthesis seed are s, the phantoms stay the same,
so the spread across seeds is the run-to-run spread of training that the quality test meets.

Configurations are named in ``CONFIGS``; ``--precision fp32`` (default) keeps GPU runs numerically like
the CPU runs of CI (the sweep may run on a GPU machine's CPU cores or its GPU with ``--device``).
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

# name → (subjects per domain, tokenizer steps, MedVAR steps, extra `--set` overrides)
CONFIGS: dict[str, tuple[int, int, int, list[str]]] = {
    "smoke": (4, 10, 10, []),  # checks the script (a few seconds)
    # round 1 (2026-11-28, device CPUs): tokenizer steps matter most for small structures; brain_tumor
    # adherence at cfg 1.5 stayed <= 0.81 and liver varied 0.75-1.0
    "base": (4, 400, 400, []),
    "subj8": (8, 400, 400, []),
    "tok1200": (4, 1200, 400, []),
    "var1200": (4, 400, 1200, []),
    "subj8_800": (8, 800, 800, []),
    "subj8_1200": (8, 1200, 1200, []),
    "subj8_800_mask2": (8, 800, 800, ["tokenizer.losses.mask_ce=2.0", "tokenizer.losses.mask_dice=2.0"]),
    "subj8_800_varb32": (8, 800, 800, ["var.train.batch_size=32"]),
    "subj6_1000": (6, 1000, 1000, []),
    # round 2: balanced structure sampling for MedVAR, bigger tokenizer batches, guidance (--cfgs)
    "t1200_v800": (4, 1200, 800, []),
    "t1200_v800_pow1": (4, 1200, 800, ["var.sampler.power=1.0"]),
    "t1200_v800_tb16_pow1": (4, 1200, 800, ["tokenizer.train.batch_size=16", "var.sampler.power=1.0"]),
    "s6_t1200_v800_pow1": (6, 1200, 800, ["var.sampler.power=1.0"]),
    "t1600_v800_pow1": (4, 1600, 800, ["var.sampler.power=1.0"]),
    "t1200_v1200_pow1_vb32": (4, 1200, 1200, ["var.sampler.power=1.0", "var.train.batch_size=32"]),
}
# round 3 (session 4): conditioning.min_pixels (a structure counts as present in a condition from 8 pixels
# on, the new default) against the old one-pixel rule, at the demo's budget, across training seeds
CONFIGS.update({
    "r3_px1": (4, 1200, 800, ["var.sampler.power=1.0", "var.conditioning.min_pixels=1"]),
    "r3_px8": (4, 1200, 800, ["var.sampler.power=1.0"]),
    "r3_px8_tb16": (4, 1200, 800, ["tokenizer.train.batch_size=16", "var.sampler.power=1.0"]),
})
ROUND3 = ["r3_px1", "r3_px8", "r3_px8_tb16"]
# round 4: presence of brain_tumor stayed 0.80-0.98 with min_pixels 8 (1 of 5 seeds passed every check) and
# the tokenizer reconstructed the tumour's enhancing part and necrosis with Dice 0-0.31: structure-balanced
# draws for the tokenizer too (the tumour is in 12 of 74 train rows)
CONFIGS.update({
    "r4_tsb05": (4, 1200, 800, ["var.sampler.power=1.0", "tokenizer.sampler.by=structure",
                                "tokenizer.sampler.power=0.5"]),
    "r4_tsb1": (4, 1200, 800, ["var.sampler.power=1.0", "tokenizer.sampler.by=structure",
                               "tokenizer.sampler.power=1.0"]),
})
# round 5 (session 5): r4_tsb05 is now the demo's default; it cleared the whole bar in 4 of 5 GPU runs but in 3
# of 8 CPU runs, failing on tumour presence (0.72-0.89) or on a mask agreement when the tokenizer reconstructed
# a small structure badly (tumour edema Dice 0.45, prostate transition zone 0.18). Candidates: heavier mask
# losses for the tokenizer, a longer tokenizer run, a stricter presence rule for conditions, more subjects (defined,
# not run: session 5 had no GPU time); r5_sl1 below is the one run, 8 seeds on the CPU, whole bar 8 of 8
_R4 = ["var.sampler.power=1.0", "tokenizer.sampler.by=structure", "tokenizer.sampler.power=0.5"]
CONFIGS.update({
    "r5_mask2": (4, 1200, 800, _R4 + ["tokenizer.losses.mask_ce=2.0", "tokenizer.losses.mask_dice=2.0"]),
    "r5_t1600": (4, 1600, 800, _R4),
    "r5_px24": (4, 1200, 800, _R4 + ["var.conditioning.min_pixels=24"]),
    "r5_s6": (6, 1200, 800, _R4),
    # the failing mask agreements came from tokenizers that decoded the tumour's mask but not its bright FLAIR
    # lesion (lesion contrast +0.3 against +1.05 real): the image L1 averaged per structure region as well
    "r5_sl1": (4, 1200, 800, _R4 + ["tokenizer.losses.structure_l1=1.0"]),
})
ROUND5 = ["r5_mask2", "r5_t1600", "r5_px24", "r5_s6", "r5_sl1"]
# round 6 (session 6): first-draw tumour presence fell with guidance (cfg 0 / 1.5 / 3: 0.96 / 0.92 / 0.87 over
# r5_sl1's 8 seeds) while VAR's null condition also drops the domain; a null condition that keeps it
CONFIGS.update({
    "r6_nkd": (4, 1200, 800, _R4 + ["tokenizer.losses.structure_l1=1.0", "var.model.null_keeps_domain=true"]),
})
ROUND2 = ["t1200_v800", "t1200_v800_pow1", "t1200_v800_tb16_pow1", "s6_t1200_v800_pow1", "t1600_v800_pow1",
          "t1200_v1200_pow1_vb32"]
MIN_PIXELS = 8  # a target counts as shown when its pixels cover at least this many of the 64x64 mask
TARGETS = ("liver", "prostate", "brain_tumor")


def run_one(name: str, out: Path, device: str, precision: str, samples: int, cfgs: list[float],
            acceptance: bool = False) -> dict[str, Any]:
    """One configuration into ``out/name``: the stages in order; a record of what they gave."""
    from medaug_cli import demo
    from medaug.eval.acceptance import presence
    from medaug.synth.plan import PlanRequest, SamplingSettings
    from medaug.synth.run import ExportSettings, synthesize
    from medaug.train.var_task import train_all

    config, _, seed_text = name.partition("@")
    subjects, tokenizer_steps, var_steps, extra = CONFIGS[config]
    seed = int(seed_text or 0)
    if seed_text:
        extra = extra + [f"tokenizer.train.seed={seed}", f"var.train.seed={seed}"]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    settings = demo.DemoSettings(subjects=subjects, device=device, steps_scale=1.0)
    record: dict[str, Any] = {"config": name, "seed": seed, "subjects": subjects, "tokenizer_steps": tokenizer_steps,
                              "var_steps": var_steps, "extra": extra, "seconds": {}}
    clock = time.perf_counter()
    demo.run_phantoms(folder, settings, lambda *a: None)
    record["prepare"] = demo.run_prepare_stage(folder, settings, lambda *a: None)
    record["seconds"]["prepare"] = round(time.perf_counter() - clock, 1)
    overrides = [override for override in demo.train_overrides(settings) if ".max_steps=" not in override
                 and ".checkpoint_every=" not in override and "warmup_steps" not in override]
    for stage, optimizer, steps in (("tokenizer", "vqvae", tokenizer_steps), ("var", "var", var_steps)):
        overrides += [f"{stage}.train.max_steps={steps}", f"{stage}.train.checkpoint_every={steps}",
                      f"{stage}.train.precision={precision}",
                      f"{stage}.train.optim.{optimizer}.warmup_steps={demo.warmup(steps)}"]
    clock = time.perf_counter()
    trained = train_all(folder / "prepared", demo.GENERATOR_RECIPE, folder / "medvar", resume=True,
                        overrides=overrides + extra)
    record["seconds"]["train"] = round(time.perf_counter() - clock, 1)
    save_record(folder, {**record, "partial": True})
    evaluation = trained["tokenizer"].get("evaluation") or {}
    record["tokenizer_val"] = {"psnr": (evaluation.get("image_mean") or {}).get("psnr"),
                               "dice_mean": evaluation.get("dice_mean"),
                               "dice": {name: (entry or {}).get("dice")
                                        for name, entry in (evaluation.get("structures") or {}).items()}}
    record["var_train"] = {key: (trained["var"].get("train_metrics") or {}).get(key) for key in ("loss", "acc")}
    record["adherence_by_cfg"] = {}
    if acceptance:
        clock = time.perf_counter()
        record["features"] = demo.run_features(folder, settings, lambda *a: None)
        record["seconds"]["features"] = round(time.perf_counter() - clock, 1)
    for cfg in cfgs:
        clock = time.perf_counter()
        request = PlanRequest(n=samples, targets=TARGETS, batch_size=16, seed=seed, sampling=SamplingSettings(cfg=cfg))
        result = synthesize(folder / "medvar", folder / f"synthetic_cfg{cfg:g}", request,
                            ExportSettings(formats=(), montage=24), device="cpu", resume=True)  # CI samples on the CPU
        record["seconds"][f"synthesize_cfg{cfg:g}"] = round(time.perf_counter() - clock, 1)
        record["adherence_by_cfg"][f"{cfg:g}"] = {
            "any_pixel": {target: entry["fraction"] for target, entry in result.summary["adherence"]["targets"].items()},
            f"min_{MIN_PIXELS}_pixels": {target: entry["fraction"] for target, entry in
                                         presence(folder / f"synthetic_cfg{cfg:g}", MIN_PIXELS).items()}}
        if acceptance:
            clock = time.perf_counter()
            record.setdefault("acceptance_by_cfg", {})[f"{cfg:g}"] = accept(folder, f"synthetic_cfg{cfg:g}", device)
            record["seconds"][f"acceptance_cfg{cfg:g}"] = round(time.perf_counter() - clock, 1)
        save_record(folder, record)
    record["cpu_s"] = round(time.process_time(), 1)
    return record


def save_record(folder: Path, record: dict[str, Any]) -> None:
    """``folder/record.json`` now (a sweep cut short by its deadline still reports the stages done)."""
    temporary = folder / "record.json.tmp"
    temporary.write_text(json.dumps(record, indent=2, default=str))
    temporary.replace(folder / "record.json")


def accept(folder: Path, synthetic: str, device: str) -> dict[str, Any]:
    """``evaluate metrics`` (own backbone) and the acceptance checks of ``folder/synthetic``: per check
    {passed, value}, and whether all passed."""
    from medaug.eval.acceptance import acceptance_checks
    from medaug.eval.evaluate import EvaluateConfig, evaluate_metrics

    metrics = evaluate_metrics(folder / "prepared", folder / synthetic, {"medaug": folder / "features"},
                               folder / f"report_{synthetic}", split="test",
                               config=EvaluateConfig(device=device, min_group_size=8, figures=False))
    result = acceptance_checks(folder / "prepared", folder / synthetic, folder / "features", TARGETS, metrics=metrics,
                               unet_steps=300, device=device)
    return {"passed": result["passed"], "checks": result["checks"]}


def launch(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the configurations as subprocesses, ``--parallel`` at a time; their records in order."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pending, running, records = list(names), {}, {}
    started = time.perf_counter()
    while pending or running:
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            for name, (process, log) in running.items():  # out of time: keep what each run has recorded
                process.kill()
                log.close()
                path = args.out / name / "record.json"
                records[name] = {**(json.loads(path.read_text()) if path.is_file() else {"config": name}),
                                 "killed_at_deadline": True}
            for name in pending:
                records[name] = {"config": name, "not_started": True}
            break
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(args.out / f"{name}.log", "w")
            command = [sys.executable, __file__, "--one", name, "--out", str(args.out), "--device", args.device,
                       "--precision", args.precision, "--samples", str(args.samples), "--cfgs", args.cfgs] + (["--acceptance"] if args.acceptance else [])
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(2)
        for name, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                path = args.out / name / "record.json"
                records[name] = json.loads(path.read_text()) if path.is_file() else {
                    "config": name, "error": (args.out / f"{name}.log").read_text()[-800:]}
                del running[name]
                if args.json_out:  # what is done so far survives a killed sweep
                    partial = {"partial": True, "records": [records[n] for n in names if n in records]}
                    args.json_out.write_text(json.dumps(partial, indent=2, default=str) + "\n")
                print(json.dumps({"done": name, "adherence": records[name].get("adherence_by_cfg"),
                                  "tokenizer_dice_mean": (records[name].get("tokenizer_val") or {}).get("dice_mean")}),
                      flush=True)
    return [records[name] for name in names]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration (seeds pooled) and guidance: each acceptance check's values across seeds and how
    many seeds passed it."""
    pooled: dict[str, dict[str, dict[str, list[Any]]]] = {}
    for record in records:
        config = str(record.get("config", "")).partition("@")[0]
        for cfg, result in (record.get("acceptance_by_cfg") or {}).items():
            for check, entry in result["checks"].items():
                values = pooled.setdefault(f"{config} cfg {cfg}", {}).setdefault(check, [])
                values.append((entry.get("value"), entry["passed"]))
    return {key: {check: {"values": [v for v, _ in entries], "passed": sum(p for _, p in entries), "runs": len(entries)}
                  for check, entries in checks.items()} for key, checks in pooled.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", action="append", help="configuration name (repeatable; default all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--cfgs", default="1.5,3,5", help="guidance values to synthesize with (comma list)")
    parser.add_argument("--round2", action="store_true", help="only the round-2 configurations")
    parser.add_argument("--round3", action="store_true", help="only the round-3 configurations")
    parser.add_argument("--round5", action="store_true", help="only the round-5 configurations")
    parser.add_argument("--seeds", type=int, default=0, help="run each configuration with training seeds "
                        "0..K-1 (as name@seed); 0: once, with the recipes' seeds")
    parser.add_argument("--acceptance", action="store_true", help="also train the feature encoder and run the "
                        "acceptance checks (medaug.eval.acceptance) at every guidance value")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="stop the runs after this many seconds "
                        "and report what they recorded (0: none)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        record = run_one(args.one, args.out, args.device, args.precision, args.samples,
                         [float(value) for value in args.cfgs.split(",")], args.acceptance)
        (args.out / args.one / "record.json").write_text(json.dumps(record, indent=2, default=str))
        return
    started = time.perf_counter()
    names = args.only or (ROUND5 if args.round5 else ROUND3 if args.round3 else ROUND2 if args.round2 else
                          [name for name in CONFIGS if name != "smoke"])
    if args.seeds:
        names = [f"{name}@{seed}" for seed in range(args.seeds) for name in names]
    records = launch(names, args)
    result = {"benchmark": "phantom_sweep", "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "parallel": args.parallel, "device": args.device, "precision": args.precision,
              "cpu": os.cpu_count(), "wall_s": round(time.perf_counter() - started, 1), "records": records,
              "summary": summarize(records)}
    text = json.dumps(result, indent=2, default=str)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
