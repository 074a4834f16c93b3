"""``medaug phantoms``: write procedural CT/MR phantoms with label maps (a thin shell over
:func:`medaug.phantoms.write_phantoms`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from medaug_cli.render import console, print_error, print_json, table

DOMAIN_HELP = "Phantom domain: ct_abdomen, mr_prostate or mr_brain (also ct/abdomen...). Repeatable; default all."


def phantoms(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (created); subjects go to OUT/<domain>[_dicom]/phantom_NNNN/."
    ),
    domain: list[str] | None = typer.Option(None, "--domain", "-d", help=DOMAIN_HELP),
    n: int = typer.Option(1, "--n", min=0, help="Subjects per domain."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Run seed; each subject's seed derives from (seed, domain, index)."
    ),
    format: str = typer.Option("nifti", "--format", "-f", help="Comma-separated output formats: nifti, dicom."),
    size: str = typer.Option("default", "--size", help="Voxel matrix: default, small (about half per side) or IxJxK."),
    json_output: bool = typer.Option(False, "--json", help="Print the written subjects as JSON instead of a table."),
) -> None:
    """Write procedural phantoms (CT abdomen; MR prostate T2+ADC; MR brain FLAIR+T1c), each with a label map.

    Re-running skips subjects that are already complete. Example:

        medaug phantoms --out phantoms --n 2 --format nifti,dicom
    """
    from medaug.errors import MedaugError
    from medaug.phantoms import write_phantoms

    results = []
    try:
        total = _count_subjects(domain, n, format)
        with _progress(total, enabled=not json_output) as advance:

            def on_subject(result) -> None:
                results.append(result)
                advance()

            write_phantoms(out, domain or None, n=n, seed=seed, formats=format, shape=size, on_subject=on_subject)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if json_output:
        print_json([_result_row(result) for result in results])
        return
    console.print(_summary(results, out))


def _count_subjects(domains: list[str] | None, n: int, formats: str) -> int:
    """Subject folders the run will visit (validates domain and format names: ConfigError if unknown)."""
    from medaug.phantoms import DOMAINS, resolve_domain, resolve_formats

    names = {resolve_domain(name).name for name in domains or DOMAINS}
    return n * len(names) * len(resolve_formats(formats))


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A transient Rich progress bar; yields ``advance()``, a no-op when not ``enabled``."""
    if not enabled:
        yield lambda: None
        return
    columns = (SpinnerColumn(), TextColumn("writing phantoms"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("phantoms", total=total)
        yield lambda: progress.advance(task)


def _result_row(result) -> dict:
    return {
        "domain": result.domain,
        "format": result.format,
        "index": result.index,
        "seed": result.seed,
        "folder": str(result.folder),
        "written": result.written,
    }


def _summary(results: list, out: Path):
    """One row per (domain, format): subjects written and skipped, and the folder they are in."""
    groups: dict[tuple[str, str], list] = {}
    for result in results:
        groups.setdefault((result.domain, result.format), []).append(result)
    rows = []
    for (domain, fmt), members in groups.items():
        written = sum(result.written for result in members)
        rows.append([domain, fmt, len(members), written, len(members) - written, members[0].folder.parent.name])
    return table(f"Phantoms in {out}", ["domain", "format", "subjects", "written", "skipped", "folder (in OUT)"], rows)
