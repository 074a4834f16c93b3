"""``medaug evaluate``: judge synthetic data (``metrics``: distributions and memorization; ``downstream``:
segmentation trained with and without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from medaug_cli.render import console, print_error, print_json, table

app = typer.Typer(
    help="Evaluate synthetic data against real prepared data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_backbones(specs: list[str]) -> dict[str, Path]:
    """``["medaug=runs/feat", ...]`` → {name: path}; raises ValueError naming a malformed or repeated spec."""
    backbones: dict[str, Path] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(f"--backbone {spec}: expected NAME=PATH, e.g. medaug=runs/features")
        if name.strip() in backbones:
            raise ValueError(f"--backbone {spec}: {name.strip()} is given twice; expected one path per backbone")
        backbones[name.strip()] = Path(path.strip())
    return backbones


@app.command("metrics")
def metrics(
    real: Path = typer.Option(..., "--real", help="The real prepared dataset (medaug prepare --out)."),
    synthetic: Path = typer.Option(..., "--synthetic", help="A synthetic folder (medaug synthesize --out)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: metrics.json, report.md, report.html, figures."),
    backbone: Optional[list[str]] = typer.Option(None, "--backbone", help="Feature backbone weights NAME=PATH (repeatable): inception-fid=FILE, radimagenet-resnet50=FILE, clip=FILE, medaug=RUN. Backbones not given are reported unavailable."),
    split: str = typer.Option("test", "--split", help="The real rows to compare with: test, val (train is refused by the lineage guard for a generator trained on it)."),
    device: str = typer.Option("cpu", "--device", help="Where the backbones run: cpu, cuda, cuda:1..."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Slices per backbone forward."),
    bootstrap: int = typer.Option(50, "--bootstrap", min=0, help="Bootstrap resamples for the confidence intervals (0: none)."),
    k: int = typer.Option(5, "--k", min=1, help="Neighbours of precision/recall/density/coverage."),
    min_group_size: int = typer.Option(10, "--min-group-size", min=2, help="Rows a domain or structure needs in each set to be scored."),
    seconds_per_image: Optional[float] = typer.Option(None, "--seconds-per-image", min=0.0, help="P of MedVAR's efficiency score (default: from synthesize.json)."),
    gamma: float = typer.Option(1.0, "--gamma", help="γ of MedVAR's efficiency score Q·ln(1+P)^γ."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Evaluate even when the real rows hold the generator's training patients (flagged in the report)."),
    json_output: bool = typer.Option(False, "--json", help="Print metrics.json instead of the summary tables."),
) -> None:
    """FID/KID/CMMD, precision/recall, density/coverage, memorization and intensity fidelity, with a report.

    Example: medaug evaluate metrics --real prepared/demo --synthetic synth/demo --backbone medaug=runs/features --out reports/demo

    Every number is named by its backbone; real rows whose patients trained the generator are refused.
    """
    from medaug.errors import MedaugError
    from medaug.eval.evaluate import EvaluateConfig, evaluate_metrics
    from medaug.eval.metrics import MetricConfig

    try:
        backbones = parse_backbones(backbone or [])
        config = EvaluateConfig(device=device, batch_size=batch_size, min_group_size=min_group_size,
                                seconds_per_image=seconds_per_image, efficiency_gamma=gamma, allow_overlap=allow_overlap,
                                metrics=MetricConfig(k=k, bootstrap=bootstrap))
        result = _run_with_status(evaluate_metrics, json_output, real, synthetic, backbones, out, split, config)
    except (MedaugError, ValueError) as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if json_output:
        print_json(result)
        return
    render_summary(result, out)


def _run_with_status(function, quiet: bool, *args: Any) -> dict[str, Any]:
    """``function(*args, progress=...)`` under a Rich status line naming the current stage."""
    if quiet:
        return function(*args)
    with console.status("evaluate") as status:
        return function(*args, progress=lambda stage, done, total: status.update(f"evaluate: {stage}"))


def _fmt(entry: dict[str, Any] | None) -> str:
    from medaug.eval.report import format_number

    if not entry or entry.get("value") is None:
        return "-"
    return f"{format_number(entry['value'])} (floor {format_number(entry.get('floor'))})"


def render_summary(result: dict[str, Any], out: Path) -> None:
    """Lineage, backbones, overall metrics per backbone, memorization and where the report is."""
    from medaug.eval.report import format_number

    lineage = result["lineage"]
    console.print(f"lineage: {lineage['status']} - {lineage['message']}", soft_wrap=True, highlight=False)
    rows = [[name, record["status"], record.get("dim") or record.get("reason", "")]
            for name, record in result["backbones"].items()]
    console.print(table("Backbones", ["backbone", "status", "features / reason"], rows))
    names = ("fid", "kid", "cmmd", "precision", "recall", "density", "coverage")
    metric_rows = [[name, *(_fmt(scored["overall"].get(metric)) for metric in names)]
                   for name, scored in result["distribution"].items()]
    if metric_rows:
        console.print(table(f"Overall, {result['counts']['synthetic']} synthetic vs {result['counts']['real']} real "
                            f"({result['split']}); value (real-vs-real floor)", ["backbone", *names], metric_rows))
    memorization = result["memorization"]
    if memorization.get("status") == "available":
        overall = memorization["overall"]
        console.print(f"memorization: {overall['n_flagged']} of {overall['n_synthetic']} synthetic samples flagged as "
                      f"near copies ({format_number(overall['fraction_flagged'])})", highlight=False)
    console.print(f"report: {out / 'report.html'}", soft_wrap=True, highlight=False)


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"0.1,0.25,1"`` → (0.1, 0.25, 1.0); raises ValueError naming ``option`` for anything else."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{option} {text}: expected comma-separated numbers, e.g. 0.1,0.25,1") from None
    if not values:
        raise ValueError(f"{option} is empty; expected comma-separated numbers, e.g. 0.1,0.25,1")
    return values


@app.command("downstream")
def downstream(
    real: Path = typer.Option(..., "--real", help="The real prepared dataset (medaug prepare --out)."),
    synthetic: Path = typer.Option(..., "--synthetic", help="A synthetic folder (medaug synthesize --out)."),
    structure: list[str] = typer.Option(..., "--structure", metavar="NAME", help="Structure to segment, a vocabulary name (repeatable); its sub-structures count as it."),
    steps: int = typer.Option(500, "--steps", min=1, help="Optimizer steps of every run (the same in every arm)."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Runs per cell (seeds 0..N-1); cells report mean ± sd."),
    fractions: str = typer.Option("0.1,0.25,1", "--fractions", help="Shares of the real train split's patient groups, comma-separated, in (0, 1]."),
    ratios: str = typer.Option("0.5", "--ratios", help="Synthetic shares of the real+synthetic arm, comma-separated, in (0, 1)."),
    arms: str = typer.Option("real,real+synthetic,synthetic", "--arms", help="Arms to train, comma-separated: real, real+synthetic, synthetic."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Slices per optimizer step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="Steps between learning-curve points (default: a tenth of --steps)."),
    device: str = typer.Option("auto", "--device", help="Where the UNets train: auto (cuda when available), cpu, cuda, cuda:1..."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Run even when the real test rows hold the generator's training patients (flagged in the report)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader workers for reading and augmenting slices (default: 0 on the CPU, which keeps runs bit-exact; up to 8 with a GPU, where augmentation in the main process would starve it)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder: downstream.json, report.md, report.html, learning_curves.png."),
    json_output: bool = typer.Option(False, "--json", help="Print downstream.json instead of the summary tables."),
) -> None:
    """Train a UNet on real, real+synthetic and synthetic slices; Dice and HD95 on the real test split.

    Example: medaug evaluate downstream --real prepared/demo --synthetic synth/demo --structure prostate --steps 2000 --out reports/downstream

    Every run has the same steps; fractions take whole patient groups; real test rows of the generator's patients are refused.
    """
    from medaug.errors import MedaugError
    from medaug.eval.downstream import DownstreamConfig, evaluate_downstream

    try:
        config = DownstreamConfig(structures=tuple(structure), steps=steps, seeds=seeds,
                                  fractions=parse_floats(fractions, "--fractions"), ratios=parse_floats(ratios, "--ratios"),
                                  arms=tuple(arm.strip() for arm in arms.split(",") if arm.strip()), batch_size=batch_size,
                                  lr=lr, eval_every=eval_every, device=device, allow_overlap=allow_overlap,
                                  num_workers=default_workers(device) if workers is None else workers)
        result = _run_with_status(evaluate_downstream, json_output, real, synthetic, config, out)
    except (MedaugError, ValueError) as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if json_output:
        print_json(result)
        return
    render_downstream(result, out)


def default_workers(device: str) -> int:
    """DataLoader workers when --workers is not given: 0 on the CPU, min(8, CPUs - 1) when the UNets train on
    a GPU (on an H200, a grid of 22 runs of 500 steps at 64² with augmentation in the main process did not
    finish in 280 s: the GPU waited for the CPU)."""
    import os

    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if on_gpu else 0


def render_downstream(result: dict[str, Any], out: Optional[Path]) -> None:
    """Lineage, the arm × fraction table, mask fidelity and where the report is."""
    from medaug.eval.report import format_number

    def plus_minus(entry: dict[str, Any]) -> str:
        if entry.get("mean") is None:
            return "-"
        sd = "" if entry.get("sd") is None else f" ± {format_number(entry['sd'])}"
        return f"{format_number(entry['mean'])}{sd}"

    lineage = result["lineage"]
    console.print(f"lineage: {lineage['status']} - {lineage['message']}", soft_wrap=True, highlight=False)
    rows = [[cell["arm"], format_number(cell["fraction"]), format_number(cell["ratio"]), plus_minus(cell["dice"]),
             plus_minus(cell["hd95_mm"]), cell["n_seeds"]] for cell in result["cells"]]
    console.print(table(f"Real test split ({result['counts']['real_test']} slices), {', '.join(result['structures'])}",
                        ["arm", "real fraction", "synthetic ratio", "Dice", "HD95 (mm)", "n"], rows))
    fidelity = [[name, format_number(entry["synthetic_dice"]), format_number(entry["real_test_dice"]),
                 format_number(entry["shuffled_real_dice"])]
                for name, entry in result["mask_fidelity"]["structures"].items()]
    console.print(table("Mask fidelity (Dice of the real-only UNet)",
                        ["structure", "synthetic", "real test", "shuffled real"], fidelity))
    if out is not None:
        console.print(f"report: {out / 'report.html'}", soft_wrap=True, highlight=False)


__all__ = ["app", "default_workers", "downstream", "metrics", "parse_backbones", "parse_floats", "render_downstream", "render_summary"]
