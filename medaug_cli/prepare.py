"""``medaug prepare``, ``medaug merge`` and ``medaug inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medaug_cli.render import console, print_error, print_json, table


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"is {text!r}; expected I/N with 0 <= I < N, e.g. 0/4", param_hint="--shard") from None
    if not 0 <= index < count:
        raise typer.BadParameter(f"is {text!r}; expected I/N with 0 <= I < N, e.g. 0/4", param_hint="--shard")
    return index, count


def prepare(
    sources: Optional[list[Path]] = typer.Argument(None, help="Dataset folders, each read as --recipe's dataset (omit with a prepare recipe)."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="A prepare recipe (sources + domains) or a dataset recipe (recipes/datasets/*.yaml or its name)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of the prepared dataset (resumes if it exists)."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Worker processes."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Only volumes of shard I/N (0-based), for job arrays; join with `medaug merge`."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Harmonize raw volumes and labels into a prepared slice dataset (index.parquet + shards).

    Example: medaug prepare ../shared/real/brats2013 --recipe brats2013 --out prepared/brats
    """
    from medaug.config.recipes import is_prepare_recipe, load_prepare_recipe, resolve_recipe_path
    from medaug.errors import MedaugError
    from medaug.prepare.pipeline import recipe_for_sources, run_prepare

    shard_tuple = _parse_shard(shard)
    try:
        recipe_path = resolve_recipe_path(recipe)
        if is_prepare_recipe(recipe_path):
            if sources:
                raise typer.BadParameter("a prepare recipe lists its own sources; give no SOURCE folders", param_hint="SOURCE")
            config, base = load_prepare_recipe(recipe_path), recipe_path.parent
        else:
            config, base = recipe_for_sources(recipe_path, [str(s) for s in sources or []]), None
        summary = _run_with_progress(run_prepare, config, out, workers, shard_tuple, base, quiet=json_output)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    render_summary(summary, json_output)


def _run_with_progress(run_prepare, config, out, workers, shard, base, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if quiet:
        return run_prepare(config, out, workers=workers, shard=shard, recipe_dir=base)
    columns = [TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("", total=None)

        def update(message: str, done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description=Path(message).name)

        return run_prepare(config, out, workers=workers, shard=shard, recipe_dir=base, progress=update)


def render_summary(summary, json_output: bool) -> None:
    from dataclasses import asdict

    if json_output:
        print_json(asdict(summary))
        return
    console.print(
        table(
            f"Prepared {summary.out}",
            ["volumes", "prepared now", "already done", "rejected", "slices"],
            [[summary.volumes_total, summary.volumes_done, summary.volumes_skipped, summary.volumes_rejected, summary.slices]],
        )
    )
    if summary.slices_per_domain:
        console.print(table("Slices per domain", ["domain", "slices"], [[k, v] for k, v in summary.slices_per_domain.items()]))
    if summary.slices_per_split:
        console.print(table("Slices per split", ["split", "slices"], [[k, v] for k, v in summary.slices_per_split.items()]))
    if summary.slices_per_structure:
        console.print(table("Slices per structure", ["structure", "slices"], [[k, v] for k, v in summary.slices_per_structure.items()]))
    if summary.rejected:
        console.print(table(f"Rejected ({len(summary.rejected)})", ["source", "reason"], [[r["source"], r["reason"]] for r in summary.rejected]))


def merge(
    inputs: list[Path] = typer.Argument(..., help="Prepared folders (e.g. the outputs of --shard runs)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged prepared dataset."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Merge prepared datasets with the same domains and vocabulary into one (splits recomputed).

    Example: medaug merge prep-0 prep-1 prep-2 --out prepared
    """
    from medaug.errors import MedaugError
    from medaug.prepare.merge import merge_prepared

    try:
        summary = merge_prepared([str(path) for path in inputs], out)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    render_summary(summary, json_output)


def inspect(
    prepared: Path = typer.Argument(..., help="A prepared dataset folder."),
    montage: Optional[Path] = typer.Option(None, "--montage", help="Write a PNG: per domain, slices with their mask overlaid."),
    per_domain: int = typer.Option(6, "--per-domain", min=1, help="Slices per domain in the montage."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarize a prepared dataset and optionally draw a montage of slices with mask overlays.

    Example: medaug inspect prepared/brats --montage brats.png
    """
    from medaug.errors import MedaugError
    from medaug.prepare.inspect import draw_montage, summarize_prepared

    try:
        summary = summarize_prepared(prepared)
        if montage is not None:
            draw_montage(prepared, montage, per_domain=per_domain)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    render_summary(summary, json_output)
    if montage is not None and not json_output:
        console.print(f"montage written to {montage}")
