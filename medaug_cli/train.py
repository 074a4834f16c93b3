"""``medaug train``: train medaug's models (``tokenizer``, ``var``, ``all``, ``features``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from medaug_cli.render import console, print_error, print_json, table

app = typer.Typer(
    help="Train medaug's models on a prepared dataset (the train split only).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("tokenizer")
def tokenizer(
    data: Path = typer.Option(..., "--data", "-d", help="A prepared dataset folder (medaug prepare --out)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A model recipe: recipes/models/FILE.yaml or its name (tiny, tokenizer-256)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints, log.jsonl, metrics.json, reconstructions.png."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=0, help="Stop after this many steps (overrides train.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.batch_size=16 (repeatable)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Train the paired image + mask tokenizer (multi-scale VQ-VAE), then evaluate it on the val split.

    Example: medaug train tokenizer --data prepared/demo --recipe tiny --out runs/tok --max-steps 400

    On several GPUs: torchrun --nproc-per-node 4 -m medaug_cli.app train tokenizer ... (the batch is global).
    """
    from medaug.errors import MedaugError
    from medaug.train.tokenizer import train_tokenizer

    quiet = json_output or not _is_rank0()
    try:
        summary = _run_with_progress(train_tokenizer, "tokenizer", quiet, data, recipe, out, max_steps=max_steps,
                                     resume=resume, overrides=overrides or [])
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if _is_rank0():
        render_tokenizer_summary(summary, json_output)


def _is_rank0() -> bool:
    """Under torchrun only rank 0 shows progress and the summary (``RANK`` is set by the launcher)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _progress_bar(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.description}")]
    return Progress(*columns, console=console, transient=False)


def _run_with_progress(function, label: str, quiet: bool, *args: Any, **options: Any) -> dict[str, Any]:
    """``function(*args, **options, progress=...)`` under a Rich progress bar (none when ``quiet``)."""
    if quiet:
        return function(*args, **options)
    with _progress_bar(label) as progress:
        bar = progress.add_task("", total=None)

        def update(step: int, total: int, metrics: dict[str, float]) -> None:
            loss = metrics.get("loss")
            progress.update(bar, completed=step, total=total, description="" if loss is None else f"loss {loss:.4f}")

        return function(*args, progress=update, **options)


def render_tokenizer_summary(summary: dict[str, Any], json_output: bool) -> None:
    """Final loss terms, val image and mask quality, code usage and where the checkpoint is."""
    if json_output:
        print_json(summary)
        return
    metrics = summary.get("train_metrics") or {}
    shown = [key for key in ("loss", "l1", "ssim", "ce", "dice", "quant", "g_loss", "d_loss", "codebook_usage") if key in metrics]
    console.print(table(f"Trained {summary['run_dir']} to step {summary['step']} ({summary['stopped_by']})",
                        shown, [[f"{metrics[key]:.4f}" for key in shown]]))
    evaluation = summary.get("evaluation")
    if evaluation:
        _render_evaluation(evaluation)
    console.print(f"checkpoint: {summary['checkpoint']}", soft_wrap=True, highlight=False)


def _render_evaluation(evaluation: dict[str, Any]) -> None:
    image_rows = [[key, _fmt(values.get("psnr")), _fmt(values.get("ssim")), _fmt(values.get("psnr_hu")), _fmt(values.get("mae_hu"))]
                  for key, values in evaluation["image"].items()]
    console.print(table(f"Reconstruction on {evaluation['split']} ({evaluation['slices']} slices)",
                        ["channel", "PSNR dB", "SSIM", "PSNR (HU) dB", "MAE HU"], image_rows))
    structure_rows = [[name, _fmt(values["dice"]), _fmt(values["hd95_mm"]), values["slices"], values["missed"]]
                      for name, values in evaluation["structures"].items()]
    if structure_rows:
        console.print(table("Decoded masks", ["structure", "Dice", "HD95 mm", "slices", "missed"], structure_rows))
        area_rows = [[name, _fmt(values["dice"]), _fmt(values["hd95_mm"]), values["slices"]]
                     for name, values in evaluation["dice_by_area"].items()]
        console.print(table("Dice by structure area", ["area", "Dice", "HD95 mm", "slices"], area_rows))
    usage = evaluation["codebook"]["usage_per_scale"]
    console.print(f"code usage per scale: {' '.join(f'{value:.2f}' for value in usage)}")
    if evaluation.get("reconstructions_png"):
        console.print(f"reconstructions: {evaluation['reconstructions_png']}", soft_wrap=True, highlight=False)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- the transformer


@app.command("var")
def var(
    data: Path = typer.Option(..., "--data", "-d", help="A prepared dataset folder (medaug prepare --out)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="A trained tokenizer run (or checkpoint) folder; optional with --resume (the run's copy)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A MedVAR recipe: recipes/models/FILE.yaml or its name (medvar-tiny, medvar-d16)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: tokenizer copy, token cache, checkpoints, log.jsonl, samples.png."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=0, help="Stop after this many steps (overrides train.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set sampler.by=domain (repeatable)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Train the MedVAR next-scale transformer on a trained tokenizer, then sample a grid per domain.

    Example: medaug train var --data prepared/demo --tokenizer runs/tok --recipe medvar-tiny --out runs/var

    The train split is tokenized once into RUN/token_cache/. The run folder is a self-contained generator
    (it holds a copy of the tokenizer and the condition bank). On several GPUs:
    torchrun --nproc-per-node 4 -m medaug_cli.app train var ... (the batch is global).
    """
    from medaug.errors import MedaugError
    from medaug.train.var_task import train_var

    if tokenizer is None and not resume:
        print_error("--tokenizer: missing; expected a trained tokenizer run folder (optional only with --resume)")
        raise typer.Exit(2)
    quiet = json_output or not _is_rank0()
    try:
        summary = _run_with_progress(train_var, "var", quiet, data, tokenizer, recipe, out, max_steps=max_steps,
                                     resume=resume, overrides=overrides or [])
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if _is_rank0():
        render_var_summary(summary, json_output)


@app.command("all")
def all_models(
    data: Path = typer.Option(..., "--data", "-d", help="A prepared dataset folder (medaug prepare --out)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A recipe naming both models: {tokenizer: ..., var: ...}, or a MedVAR recipe with a tokenizer key (medvar-tiny)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: the generator; the tokenizer trains in OUT/tokenizer_run."),
    resume: bool = typer.Option(False, "--resume", help="Continue both stages from their latest checkpoints."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a key of one stage: --set tokenizer.train.max_steps=50 or --set var.train.max_steps=50 (repeatable)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Train the tokenizer, then the MedVAR transformer on it, from one recipe.

    Example: medaug train all --data prepared/demo --recipe medvar-tiny --out runs/demo
    """
    from medaug.errors import MedaugError
    from medaug.train.var_task import train_all

    quiet = json_output or not _is_rank0()
    try:
        summary = _run_stages(train_all, quiet, data, recipe, out, resume=resume, overrides=overrides or [])
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if not _is_rank0():
        return
    if json_output:
        print_json(summary)
        return
    render_tokenizer_summary(summary["tokenizer"], False)
    render_var_summary(summary["var"], False)


def _run_stages(function, quiet: bool, *args: Any, **options: Any) -> dict[str, Any]:
    """``function`` with a ``progress(stage, step, total, metrics)`` callback: one bar per stage."""
    if quiet:
        return function(*args, **options)
    with _progress_bar("train") as progress:
        bars: dict[str, Any] = {}

        def update(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task("", total=total)
            loss = metrics.get("loss")
            text = stage if loss is None else f"{stage} loss {loss:.4f}"
            progress.update(bars[stage], completed=step, total=total, description=text)

        return function(*args, progress=update, **options)


def render_var_summary(summary: dict[str, Any], json_output: bool) -> None:
    """Final loss and token accuracy (all and per scale), the token cache, the sample grid, the checkpoint."""
    if json_output:
        print_json(summary)
        return
    metrics = summary.get("train_metrics") or {}
    scales = sorted(key.split("/k")[1] for key in metrics if key.startswith("scale_acc/k"))
    columns = ["loss", "acc", *[f"acc k{k}" for k in scales]]
    values = [metrics.get("loss"), metrics.get("acc"), *[metrics.get(f"scale_acc/k{k}") for k in scales]]
    console.print(table(f"Trained {summary['run_dir']} to step {summary['step']} ({summary['stopped_by']})",
                        columns, [[_fmt(value) for value in values]]))
    cache = summary.get("token_cache") or {}
    if cache:
        state = "built" if cache.get("built") else "reused"
        console.print(f"token cache ({state}): {cache['rows']} rows, {cache['rows_flipped']} flipped: {cache['path']}",
                      soft_wrap=True, highlight=False)
    samples = summary.get("samples") or {}
    if samples.get("png"):
        console.print(f"samples: {samples['png']} ({len(samples['samples'])} samples)", soft_wrap=True, highlight=False)
    console.print(f"checkpoint: {summary['checkpoint']}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------- the feature encoder (evaluation backbone)


@app.command("features")
def features(
    data: Path = typer.Option(..., "--data", "-d", help="A prepared dataset folder (medaug prepare --out)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints, log.jsonl, metrics.json (held-out AUROC)."),
    recipe: Path = typer.Option(Path("features"), "--recipe", "-r", help="A features recipe: recipes/models/FILE.yaml or its name (features, features-tiny)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=0, help="Stop after this many steps (overrides train.max_steps)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.batch_size=16 (repeatable)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Train medaug's own feature encoder (domain + structures present), the offline backbone of medaug evaluate.

    Example: medaug train features --data prepared/demo --out runs/features --recipe features-tiny

    The run folder is what --backbone medaug=RUN takes. Held-out structure-present AUROC and domain
    accuracy are measured at the end (val split, else test) and stored in metrics.json and the checkpoint.
    """
    from medaug.errors import MedaugError
    from medaug.train.features_task import train_features

    quiet = json_output or not _is_rank0()
    try:
        summary = _run_with_progress(train_features, "features", quiet, data, recipe, out, max_steps=max_steps,
                                     resume=resume, overrides=overrides or [])
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if _is_rank0():
        render_features_summary(summary, json_output)


def render_features_summary(summary: dict[str, Any], json_output: bool) -> None:
    """Final losses, held-out structure AUROC (macro and per structure), domain accuracy, the checkpoint."""
    if json_output:
        print_json(summary)
        return
    metrics = summary.get("train_metrics") or {}
    shown = [key for key in ("loss", "domain_ce", "structure_bce", "region_bce", "domain_acc") if key in metrics]
    console.print(table(f"Trained {summary['run_dir']} to step {summary['step']} ({summary['stopped_by']})",
                        shown, [[f"{metrics[key]:.4f}" for key in shown]]))
    evaluation = summary.get("evaluation")
    if evaluation:
        held_out = "" if evaluation["held_out"] else " (NOT held out)"
        console.print(table(f"Held-out evaluation on {evaluation['split']}{held_out} ({evaluation['slices']} slices)",
                            ["structure AUROC (macro)", "structures scored", "domain accuracy"],
                            [[_fmt(evaluation["structure_auroc_macro"]), evaluation["structures_scored"],
                              _fmt(evaluation["domain_accuracy"])]]))
        rows = [[name, _fmt(values["auroc"]), values["positives"], values["negatives"]]
                for name, values in evaluation["structure_auroc"].items()]
        console.print(table("Structure present", ["structure", "AUROC", "present", "absent"], rows))
    console.print(f"checkpoint: {summary['checkpoint']}", soft_wrap=True, highlight=False)
