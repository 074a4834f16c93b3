"""``medaug evaluate``: judge synthetic data (``metrics``; ``downstream`` later)."""

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


__all__ = ["app", "metrics", "parse_backbones", "render_summary"]
