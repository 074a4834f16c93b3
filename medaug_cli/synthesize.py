"""``medaug synthesize``: class-balanced labelled slices from a trained generator."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import typer

from medaug_cli.render import console, print_error, print_json, table

GPU_BATCH, CPU_BATCH = 256, 16  # --batch-size when not given (default_batch_size)


def synthesize(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A generator run folder (medaug train var/all --out) or one of its checkpoints."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A new or empty output folder (not needed with --dry-run)."),
    n: int = typer.Option(..., "--n", "-n", "--num-samples", min=1, help="How many samples (under torchrun write -n or --num-samples: torchrun reads --n as its own --nnodes)."),
    organ: Optional[list[str]] = typer.Option(None, "--organ", "--structure", help="A structure every sample of its share must contain; parents cover their parts (prostate = both zones). Repeatable."),
    domain: Optional[list[str]] = typer.Option(None, "--domain", help="Only these domains (e.g. mr/prostate). Repeatable."),
    balance: str = typer.Option("structure", "--balance", help="structure: equal share per --organ; domain: equal share per domain; none: the training distribution."),
    cfg: float = typer.Option(1.5, "--cfg", help="Classifier-free guidance at the last scale (ramped from 0 over the scales; 0 = off)."),
    top_k: int = typer.Option(900, "--top-k", help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(0.96, "--top-p", help="Keep the smallest set of tokens with this probability mass (1 = all)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature (> 0)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the plan; each sample's own seed derives from it."),
    redraws: int = typer.Option(2, "--redraws", min=0, help="Draw a sample again (new seed) when its mask misses its --organ, at most this often (0: keep first draws; the manifest records draws)."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Use the null condition (no structures; the domain too unless the generator was trained with model.null_keeps_domain)."),
    formats: str = typer.Option("png", "--format", "-f", help="Comma list of png, nifti, nnunet, dicom."),
    window: Optional[str] = typer.Option(None, "--window", help="8-bit PNGs windowed as CENTRE,WIDTH in HU/a.u. (default: 16-bit PNGs)."),
    nifti_gz: bool = typer.Option(False, "--nifti-gz", help="Write .nii.gz instead of .nii."),
    dicom_sop: str = typer.Option("image", "--dicom-sop", help="DICOM storage class: image (CT/MR Image Storage) or sc (Secondary Capture)."),
    nnunet_id: int = typer.Option(900, "--nnunet-id", help="First nnU-Net dataset number (one dataset per domain)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help=f"Samples per batch (per process; default {GPU_BATCH} on a GPU in bfloat16, where the sampler splits what does not fit, else {CPU_BATCH})."),
    compile_decoder: str = typer.Option("auto", "--compile-decoder", help="the GPU decoder's path for chunks under 32 images (larger ones run the fused, uncompiled path): auto compiles it only without Triton, for runs of at least 50,000 samples (compiling takes about a minute); on; off."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when present), cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: bfloat16 on GPUs, float32 on CPU)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Export threads."),
    resume: bool = typer.Option(False, "--resume", help="Finish a killed run in --out (same request)."),
    send: Optional[str] = typer.Option(None, "--send", help="After synthesis, C-STORE the DICOM files to HOST:PORT (a PACS)."),
    aet: str = typer.Option("ANY-SCP", "--aet", help="The called AE title of the --send destination."),
    calling_aet: str = typer.Option("MEDAUG", "--calling-aet", help="Our AE title for --send."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Generate labelled image + mask slices and export them, with a manifest of every setting.

    Example: medaug synthesize --checkpoint runs/medvar --organ prostate --n 10000 --format nifti,png --out synth/prostate

    On several GPUs: torchrun --nproc-per-node 4 -m medaug_cli.app synthesize -n 10000 ... (ranks split the
    batches; rank 0 writes the manifest; use -n, since torchrun takes --n for an abbreviation of its options).
    """
    from medaug.errors import MedaugError
    from medaug.synth.plan import PlanRequest, SamplingSettings
    from medaug.synth.run import synthesize as run_synthesis

    rank0 = os.environ.get("RANK", "0").strip() in ("", "0")
    logging.getLogger("medaug.synth.run").setLevel(logging.ERROR)  # its warnings are rendered from the summary
    try:
        request = PlanRequest(n=n, targets=tuple(organ or ()), domains=tuple(domain or ()), balance=balance, seed=seed,
                              unconditional=unconditional, batch_size=batch_size or default_batch_size(device, dtype),
                              redraws=redraws,
                              sampling=SamplingSettings(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature))
        export = _export_settings(formats, window, nifti_gz, dicom_sop, nnunet_id, workers)
        if out is None and not dry_run:
            raise MedaugError("--out", "is missing; expected the folder for the samples")
        quiet = json_output or dry_run or not rank0
        result = _with_progress(run_synthesis, quiet, checkpoint, out, request, export, device=device, dtype=dtype,
                                resume=resume, dry_run=dry_run, compile_decoder=_on_off_auto(compile_decoder))
        if send and rank0 and not dry_run:
            result.summary["send"] = _send(out, send, aet, calling_aet, quiet)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if rank0:
        render_summary(result.summary, json_output, result)
        if send and not dry_run and result.summary["send"]["failed"]:
            raise typer.Exit(1)


def default_batch_size(device: str, dtype: str | None) -> int:
    """Samples per batch when --batch-size is not given: GPU_BATCH where the fast path runs (a GPU, bfloat16;
    on the H200 d16 makes 402 images/s at 256 against 282 at 16), CPU_BATCH elsewhere."""
    import torch

    gpu = device != "cpu" and torch.cuda.is_available()
    return GPU_BATCH if gpu and dtype in (None, "bfloat16") else CPU_BATCH


def _on_off_auto(value: str) -> bool | None:
    from medaug.errors import MedaugError

    choices = {"auto": None, "on": True, "off": False}
    if value not in choices:
        raise MedaugError("--compile-decoder", f"is {value!r}; expected auto, on or off")
    return choices[value]


def _send(out: Path, destination: str, aet: str, calling_aet: str, quiet: bool) -> dict[str, Any]:
    """C-STORE the run's DICOM files; the report as a dict (accepted/failed counts and the failures)."""
    from medaug.synth.run import send_run

    report = send_run(out, destination, aet, calling_aet)
    if not quiet:
        console.print(f"sent: {report.summary()}", highlight=False)
        for item in report.failed[:20]:
            console.print(f"[red]not stored:[/] {item.path} ({item.error or item.status})", highlight=False)
    return {"destination": destination, "accepted": len(report.accepted), "associations": report.associations,
            "failed": [{"path": str(item.path), "status": item.status, "error": item.error} for item in report.failed]}


def _export_settings(formats: str, window: str | None, nifti_gz: bool, dicom_sop: str, nnunet_id: int, workers: int) -> Any:
    from medaug.errors import ConfigError
    from medaug.synth.export.nifti import NiftiOptions
    from medaug.synth.export.png import PngOptions
    from medaug.synth.run import ExportSettings

    png = PngOptions()
    if window is not None:
        try:
            centre, width = (float(part) for part in window.split(","))
        except ValueError:
            raise ConfigError("--window", f"is {window!r}; expected CENTRE,WIDTH, e.g. 40,400") from None
        png = PngOptions(bits=8, window=(centre, width))
    if dicom_sop not in ("image", "sc"):
        raise ConfigError("--dicom-sop", f"is {dicom_sop!r}; expected image or sc")
    chosen = tuple(part.strip() for part in formats.split(",") if part.strip())
    return ExportSettings(formats=chosen, png=png, nifti=NiftiOptions(compress=nifti_gz), nnunet_id=nnunet_id,
                          workers=workers, dicom={"sop": dicom_sop})


def _with_progress(function: Any, quiet: bool, *args: Any, **options: Any) -> Any:
    if quiet:
        return function(*args, **options)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]synthesize"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("", total=None)

        def update(done: int, total: int, rate: float) -> None:
            progress.update(bar, completed=done, total=total, description=f"{rate:.1f} images/s")

        return function(*args, progress=update, **options)


def render_summary(summary: dict[str, Any], json_output: bool, result: Any) -> None:
    """The plan (dry run) or the run: samples per domain/target, adherence per target and structure, files."""
    if json_output:
        print_json(summary)
        return
    plan = summary["plan"]
    for warning in plan.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
    counts = plan["counts"]
    console.print(table(f"Plan: {plan['n']} samples in {plan['batches']} batches of {plan['batch_size']}",
                        ["domain", "samples"], [[d, c] for d, c in counts["domain"].items()]))
    targets = summary.get("adherence", {}).get("targets", {})
    rows = [[t, c, plan["targets"].get(t, []) and ", ".join(plan["targets"][t]) or "-",
             _fraction(targets.get(t)), _fraction(targets.get(t), "first_draw")] for t, c in counts["target"].items()]
    console.print(table("Targets (adherence: share of samples whose mask shows the target; first draw: before redraws)",
                        ["target", "samples", "structures", "adherence", "first draw"], rows))
    if summary.get("dry_run"):
        return
    structures = summary.get("adherence", {}).get("structures", {})
    console.print(table("Structures in the condition → shown in the mask",
                        ["structure", "samples", "shown"], [[s, v["samples"], _fraction(v)] for s, v in structures.items()]))
    if result.skipped_batches and not result.generated:
        console.print("nothing to do: every batch was already complete")
    console.print(f"{summary['samples']} samples ({result.generated} generated now) in {summary.get('timing', {}).get('seconds_rank0', 0):.1f} s",
                  highlight=False)
    if summary.get("montage"):
        console.print(f"montage: {summary['montage']}", soft_wrap=True, highlight=False)


def _fraction(record: dict[str, Any] | None, key: str = "fraction") -> str:
    return "-" if not record or record.get(key) is None else f"{100 * record[key]:.0f}%"
