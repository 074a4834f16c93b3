"""``medaug demo``: the whole MedVAR pipeline on built-in phantoms, nothing to download (issue 12 item 2).

Stages, each the library function its own command calls, in one output folder ``OUT``::

    phantoms     medaug phantoms           OUT/phantoms/<domain>/phantom_NNNN/   (CT abdomen, MR prostate, MR brain)
    prepare      medaug prepare            OUT/prepare.yaml (domains at --size), OUT/prepared/
    train        medaug train all          OUT/medvar/ (tiny tokenizer in OUT/medvar/tokenizer_run, then MedVAR)
    synthesize   medaug synthesize         OUT/synthetic/ (class-balanced; png/, nifti/, dicom/, manifest.parquet)
    features     medaug train features     OUT/features/ (medaug's own feature encoder, on the prepared train split)
    evaluate     medaug evaluate metrics   OUT/report/ (report.html, report.md, metrics.json; medaug backbone)
    acceptance   the quality bar           OUT/acceptance.json (medaug.eval.acceptance: targets present, a UNet
                                           trained on real slices agrees with the generated masks, FID/KID
                                           near the real-vs-real floor and far from noise, no near copies)

``OUT/demo.json`` records the settings and, per finished stage, its summary, wall and CPU seconds. Running
the demo again with the same ``--out`` reuses finished stages and finishes an interrupted one through that
stage's own resume (phantoms and prepare skip complete volumes, training continues from its last
checkpoint, synthesis skips finished batches); a folder made with other settings, or a non-empty folder
that is not a demo, is refused. The models are the tiny presets (``recipes/models/medvar-tiny.yaml``,
``features-tiny.yaml``) trained for :data:`DEMO_STEPS` times ``--steps-scale``: small enough for a CPU,
long enough that the generator clears the quality bar of the ``acceptance`` stage on the phantoms (a slow
test checks that it does).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from medaug_cli.render import console, print_error, print_json, table

SIZES = (64, 128, 256)
DEVICES = ("auto", "cpu", "cuda")
STATE_FILE = "demo.json"
STATE_FORMAT = "medaug-demo"
STATE_VERSION = 1
PHANTOMS_DIR, PREPARE_RECIPE, PREPARED_DIR = "phantoms", "prepare.yaml", "prepared"
MEDVAR_DIR, FEATURES_DIR, SYNTHETIC_DIR, REPORT_DIR = "medvar", "features", "synthetic", "report"
ACCEPTANCE_FILE = "acceptance.json"
STAGES = ("phantoms", "prepare", "train", "synthesize", "features", "evaluate", "acceptance")
UNET_STEPS = 300  # acceptance: UNet steps on the real train split, times --steps-scale

# Per phantom domain: the voxel matrix at --size 64 (in-plane sides scale with --size, the slice count
# stays) and the domain spacing (mm) that fits its body into 64 pixels (divided by --size / 64).
PHANTOMS_AT_64: dict[str, tuple[tuple[int, int, int], float]] = {
    "ct_abdomen": ((56, 56, 12), 8.0),     # 380-480 mm field of view, body <= 350 mm
    "mr_prostate": ((64, 64, 12), 2.5),    # 150-165 mm pelvis
    "mr_brain": ((48, 56, 14), 3.5),       # 176 x 208 mm head
}
# Tokenizer encoder levels per --size: the latent stays 8 x 8 (scales 1..8 of medvar-tiny, 155 tokens).
CHANNEL_MULTIPLIERS = {64: [1, 2, 2, 4], 128: [1, 2, 2, 4, 4], 256: [1, 1, 2, 2, 4, 4]}
GENERATOR_RECIPE, FEATURES_RECIPE = "medvar-tiny", "features-tiny"  # recipes/models/*.yaml
TARGETS = ("liver", "prostate", "brain_tumor")  # one structure per phantom domain, equal shares
FORMATS = ("png", "nifti", "dicom")


@dataclass(frozen=True)
class DemoSettings:
    """What defines a demo folder's content (``device`` only picks where it runs)."""

    size: int = 64
    steps_scale: float = 1.0
    subjects: int = 4
    samples: int = 192
    seed: int = 0
    device: str = "auto"

    def identity(self) -> dict[str, Any]:
        """The settings a rerun must share to reuse the folder."""
        record = asdict(self)
        record.pop("device")
        return record

    def steps(self, stage: str) -> int:
        """Optimizer steps of ``stage`` (tokenizer, var, features): its recipe's ``train.max_steps`` times
        ``steps_scale``, at least 2."""
        return max(2, round(recipe_steps()[stage] * self.steps_scale))


# Optimizer steps of the demo's models at --steps-scale 1: the budget at which the tiny phantom generator
# clears medaug.eval.acceptance's quality bar (benchmarks/phantom_sweep.py, 2026-11-28: at 400/400 the
# tokenizer did not reconstruct tumours and MedVAR put a tumour in 0-75% of brain_tumor samples; at
# 1200/800 with structure-balanced sampling (power 1) 91-100%, UNet agreement 0.83-0.89, no near copies).
# Across training seeds (rounds 3-4, 2026-11-29) that budget cleared the whole bar in 1 of 5 runs with the
# tokenizer drawing rows in natural order and in 4 of 5 with the recipes' structure-balanced tokenizer
# draws and conditions counting a structure from 8 pixels on. 192 samples (64 per target): a generator that
# shows the tumour in 94% of samples fails the 90% bar by chance alone 12% of the time at 32 samples per
# target, 9% at 64 (binomial).
DEMO_STEPS = {"tokenizer": 1200, "var": 800, "features": 300}
VAR_SAMPLER_POWER = 1.0  # MedVAR draws rows fully balanced over their rarest structure


def recipe_steps() -> dict[str, int]:
    """Optimizer steps of the demo's stages at --steps-scale 1: {"tokenizer", "var", "features"}."""
    return dict(DEMO_STEPS)


def check_settings(settings: DemoSettings) -> None:
    """Raise ConfigError naming the option that is out of range."""
    from medaug.errors import ConfigError

    if settings.size not in SIZES:
        raise ConfigError("--size", f"is {settings.size}; expected one of {', '.join(map(str, SIZES))}")
    if not (math.isfinite(settings.steps_scale) and settings.steps_scale > 0):
        raise ConfigError("--steps-scale", f"is {settings.steps_scale}; expected a positive number")
    if settings.device not in DEVICES:
        raise ConfigError("--device", f"is {settings.device!r}; expected one of {', '.join(DEVICES)}")
    if settings.subjects < 4:
        raise ConfigError("subjects", f"is {settings.subjects}; expected >= 4 (train, val and test subjects per domain)")
    if settings.samples < len(TARGETS):
        raise ConfigError("--samples", f"is {settings.samples}; expected >= {len(TARGETS)} (one per target)")


# ---------------------------------------------------------------- the demo folder and its record


def open_state(out: Path, settings: DemoSettings) -> dict[str, Any]:
    """The folder's ``demo.json`` (created for a new or empty folder); ConfigError when ``out`` is
    something else or was made with other settings."""
    import json

    from medaug.errors import ConfigError

    path = out / STATE_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        before, now = state.get("settings") or {}, settings.identity()
        if state.get("format") != STATE_FORMAT or before != now:
            shown = ", ".join(f"--{key.replace('_', '-')} {before.get(key)} (now {value})"
                              for key, value in now.items() if before.get(key) != value)
            raise ConfigError(out, f"holds a demo made with {shown or 'another demo format'}; expected the same "
                                   "settings to reuse it, or another --out")
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(out, "exists and is not a medaug demo folder (no demo.json); expected a new or empty folder")
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "settings": settings.identity(), "stages": {}}
    save_state(out, state)
    return state


def save_state(out: Path, state: dict[str, Any]) -> None:
    from medaug.train.checkpoint import write_json

    write_json(out / STATE_FILE, json_safe(state))


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as None and tuples as lists (demo.json is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def stage_outputs(out: Path) -> dict[str, Path]:
    """The file whose presence shows that each stage's output is still there."""
    return {"phantoms": out / PHANTOMS_DIR, "prepare": out / PREPARED_DIR / "index.parquet",
            "train": out / MEDVAR_DIR / "metrics.json", "synthesize": out / SYNTHETIC_DIR / "manifest.parquet",
            "features": out / FEATURES_DIR / "metrics.json", "evaluate": out / REPORT_DIR / "metrics.json",
            "acceptance": out / ACCEPTANCE_FILE}


def is_done(out: Path, state: dict[str, Any], stage: str) -> bool:
    return state["stages"].get(stage, {}).get("status") == "done" and stage_outputs(out)[stage].exists()


# ---------------------------------------------------------------- stages


def run_phantoms(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """``settings.subjects`` phantoms per domain, matrices scaled to ``settings.size`` (resumable)."""
    from medaug.phantoms import write_phantoms

    folders = []
    for number, (domain, (shape, _)) in enumerate(PHANTOMS_AT_64.items(), start=1):
        folders += write_phantoms(out / PHANTOMS_DIR, domains=[domain], n=settings.subjects, seed=settings.seed,
                                  shape=phantom_shape(shape, settings.size))
        report(number, len(PHANTOMS_AT_64))
    return {"subjects": len(folders), "folder": str(out / PHANTOMS_DIR)}


def phantom_shape(shape_at_64: tuple[int, int, int], size: int) -> tuple[int, int, int]:
    """The voxel matrix for ``size``² slices: in-plane sides times ``size / 64``, slice count kept."""
    factor = size / 64
    return round(shape_at_64[0] * factor), round(shape_at_64[1] * factor), shape_at_64[2]


def prepare_recipe(size: int) -> dict[str, Any]:
    """The prepare recipe of the demo: the three phantom datasets (paths relative to OUT), each domain
    entry of its dataset recipe at ``size`` pixels with the spacing that fits the phantom's body."""
    from medaug.config.base import read_yaml
    from medaug.config.recipes import resolve_recipe_path

    sources, domains = [], {}
    for domain, (_, spacing_at_64_mm) in PHANTOMS_AT_64.items():
        dataset = f"phantom_{domain}"
        entry = dict(read_yaml(resolve_recipe_path(dataset))["domain"])
        entry.update(spacing_mm=spacing_at_64_mm * 64 / size, size=size)
        sources.append({"path": f"{PHANTOMS_DIR}/{domain}", "dataset": dataset})
        domains[entry.pop("name")] = entry
    return {"sources": sources, "domains": domains}


def run_prepare_stage(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """Write ``OUT/prepare.yaml`` and prepare it into ``OUT/prepared`` (complete volumes are skipped)."""
    import yaml

    from medaug.config.recipes import load_prepare_recipe
    from medaug.errors import MedaugError
    from medaug.io.atomic import atomic_output
    from medaug.prepare.pipeline import run_prepare

    recipe_path = out / PREPARE_RECIPE
    with atomic_output(recipe_path) as temporary:
        header = (f"# medaug demo: the phantoms of {PHANTOMS_DIR}/ at {settings.size}x{settings.size} "
                  "(paths relative to this file)\n")
        temporary.write_text(header + yaml.safe_dump(prepare_recipe(settings.size), sort_keys=False))
    summary = run_prepare(load_prepare_recipe(recipe_path), out / PREPARED_DIR, recipe_dir=out,
                          progress=lambda message, done, total: report(done, total))
    if summary.volumes_rejected:
        raise MedaugError(out / PREPARED_DIR, f"{summary.volumes_rejected} phantom volumes rejected: "
                                              f"{summary.rejected[0]['reason']}")
    return {"recipe": str(recipe_path), "prepared": str(out / PREPARED_DIR), "volumes": summary.volumes_total,
            "slices": summary.slices, "slices_per_domain": summary.slices_per_domain,
            "slices_per_split": summary.slices_per_split}


def train_overrides(settings: DemoSettings) -> list[str]:
    """``--set`` keys of ``medaug train all`` for the demo: steps, warm-up, device, tokenizer resolution."""
    size, device = settings.size, settings.device
    overrides = [f"tokenizer.model.image_size={size}", f"tokenizer.model.channel_multipliers={CHANNEL_MULTIPLIERS[size]}",
                 f"var.sampler.power={VAR_SAMPLER_POWER}"]
    for stage, optimizer in (("tokenizer", "vqvae"), ("var", "var")):
        steps = settings.steps(stage)
        overrides += [f"{stage}.train.max_steps={steps}", f"{stage}.train.checkpoint_every={steps}",
                      f"{stage}.train.device={device}", f"{stage}.train.optim.{optimizer}.warmup_steps={warmup(steps)}"]
    return overrides


def warmup(steps: int) -> int:
    """Warm-up steps: a tenth of a short run, at most the recipes' 20."""
    return min(20, max(1, steps // 10))


def run_train(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """``medaug train all --recipe medvar-tiny`` into ``OUT/medvar`` (continues from its last checkpoints)."""
    from medaug.train.var_task import train_all

    summary = train_all(out / PREPARED_DIR, GENERATOR_RECIPE, out / MEDVAR_DIR, resume=True,
                        overrides=train_overrides(settings),
                        progress=lambda stage, step, total, metrics: report(step, total, f"{stage} {_loss(metrics)}"))
    evaluation = summary["tokenizer"].get("evaluation") or {}
    var_metrics = summary["var"].get("train_metrics") or {}
    return {"run_dir": summary["run_dir"], "tokenizer_steps": summary["tokenizer"]["step"],
            "var_steps": summary["var"]["step"],
            "tokenizer_val": {"psnr": (evaluation.get("image_mean") or {}).get("psnr"),
                              "dice": evaluation.get("dice_mean")},
            "var_train": {"loss": var_metrics.get("loss"), "acc": var_metrics.get("acc")},
            "samples_png": (summary["var"].get("samples") or {}).get("png"),
            "reconstructions_png": evaluation.get("reconstructions_png")}


def _loss(metrics: dict[str, float]) -> str:
    loss = metrics.get("loss")
    return "" if loss is None else f"loss {loss:.3f}"


def run_synthesize(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """``medaug synthesize --organ liver --organ prostate --organ brain_tumor --format png,nifti,dicom``."""
    from medaug.synth.plan import PlanRequest
    from medaug.synth.run import ExportSettings, synthesize

    folder = out / SYNTHETIC_DIR
    if folder.is_dir() and not (folder / "synthesize.json").is_file():
        shutil.rmtree(folder)  # killed before the run was claimed: nothing of it is reusable
    request = PlanRequest(n=settings.samples, targets=TARGETS, batch_size=16, seed=settings.seed)
    export = ExportSettings(formats=FORMATS, montage=24)
    result = synthesize(out / MEDVAR_DIR, folder, request, export, device=settings.device, resume=True,
                        progress=lambda done, total, rate: report(done, total, f"{rate:.1f} images/s"))
    summary = result.summary
    return {"folder": str(folder), "samples": summary["samples"], "montage": summary.get("montage"),
            "adherence": {target: record["fraction"] for target, record in summary["adherence"]["targets"].items()},
            "first_draw": {target: record.get("first_draw") for target, record in summary["adherence"]["targets"].items()},
            "files": {fmt: count_files(folder / fmt) for fmt in FORMATS}}


def count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def run_features(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """``medaug train features --recipe features-tiny`` on the prepared train split into ``OUT/features``."""
    from medaug.train.features_task import train_features

    steps = settings.steps("features")
    overrides = [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.device={settings.device}",
                 f"train.optim.encoder.warmup_steps={warmup(steps)}"]
    summary = train_features(out / PREPARED_DIR, FEATURES_RECIPE, out / FEATURES_DIR, resume=True, overrides=overrides,
                             progress=lambda step, total, metrics: report(step, total, _loss(metrics)))
    evaluation = summary.get("evaluation") or {}
    return {"run_dir": summary["run_dir"], "steps": summary["step"], "split": evaluation.get("split"),
            "structure_auroc_macro": evaluation.get("structure_auroc_macro"),
            "domain_accuracy": evaluation.get("domain_accuracy")}


def run_evaluate(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """``medaug evaluate metrics --backbone medaug=OUT/features`` of the synthetic samples against the test split."""
    from medaug.eval.evaluate import EvaluateConfig, evaluate_metrics
    from medaug.train.distributed import pick_device

    config = EvaluateConfig(device=str(pick_device(0, settings.device)), min_group_size=8)
    result = evaluate_metrics(out / PREPARED_DIR, out / SYNTHETIC_DIR, {"medaug": out / FEATURES_DIR},
                              out / REPORT_DIR, split="test", config=config,
                              progress=lambda stage, done, total: report(done, 0, stage))
    overall = (result["distribution"].get("medaug") or {}).get("overall", {})
    memorization = result["memorization"].get("overall") or {}
    return {"report": str(out / REPORT_DIR / "report.html"), "metrics_json": str(out / REPORT_DIR / "metrics.json"),
            "counts": result["counts"], "lineage": result["lineage"]["status"],
            "medaug": {name: (overall.get(name) or {}).get("value") for name in ("fid", "kid", "cmmd", "precision",
                                                                                 "recall", "density", "coverage")},
            "memorization_flagged": memorization.get("n_flagged")}


def run_acceptance(out: Path, settings: DemoSettings, report: Callable[..., None]) -> dict[str, Any]:
    """:func:`medaug.eval.acceptance.acceptance_checks` of the synthetic folder into ``OUT/acceptance.json``."""
    import json

    from medaug.eval.acceptance import acceptance_checks
    from medaug.train.checkpoint import write_json
    from medaug.train.distributed import pick_device

    metrics = json.loads((out / REPORT_DIR / "metrics.json").read_text())
    result = acceptance_checks(out / PREPARED_DIR, out / SYNTHETIC_DIR, out / FEATURES_DIR, TARGETS, metrics=metrics,
                               unet_steps=max(2, round(UNET_STEPS * settings.steps_scale)),
                               device=str(pick_device(0, settings.device)))
    write_json(out / ACCEPTANCE_FILE, json_safe(result))
    return {"passed": result["passed"], "file": str(out / ACCEPTANCE_FILE),
            "checks": {name: {key: check.get(key) for key in ("passed", "value")}
                       for name, check in result["checks"].items()}}


STAGE_FUNCTIONS: dict[str, Callable[[Path, DemoSettings, Callable[..., None]], dict[str, Any]]] = {
    "phantoms": run_phantoms, "prepare": run_prepare_stage, "train": run_train,
    "synthesize": run_synthesize, "features": run_features, "evaluate": run_evaluate,
    "acceptance": run_acceptance,
}


# ---------------------------------------------------------------- the run


def run_demo(out: Path, settings: DemoSettings, reporter: "StageReporter") -> dict[str, Any]:
    """Every stage in order (finished ones reused); returns the final ``demo.json`` content."""
    from medaug.train.distributed import pick_device

    check_settings(settings)
    device = str(pick_device(0, settings.device))  # fails on --device cuda without a GPU, before any file
    state = open_state(out, settings)
    for stage in STAGES:
        if is_done(out, state, stage):
            state["stages"][stage]["reused"] = True
            reporter.skip(stage)
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        with reporter.stage(stage) as report:
            summary = STAGE_FUNCTIONS[stage](out, settings, report)
        state["stages"][stage] = {"status": "done", "reused": False, "device": device,
                                  "wall_s": round(time.perf_counter() - wall, 1),
                                  "cpu_s": round(time.process_time() - cpu, 1), "summary": summary}
        save_state(out, state)
    return state


class StageReporter:
    """Rich progress, one bar per stage (silent with ``quiet``)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Any = None

    @contextmanager
    def open(self) -> Iterator["StageReporter"]:
        if self.quiet:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]{task.fields[stage]:<11}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.description}")]
        with Progress(*columns, console=console, transient=False) as progress:
            self.progress = progress
            yield self

    def skip(self, stage: str) -> None:
        if self.progress is not None:
            self.progress.add_task("reused", total=1, completed=1, stage=stage)

    @contextmanager
    def stage(self, stage: str) -> Iterator[Callable[..., None]]:
        if self.progress is None:
            yield lambda done, total, text="": None
            return
        task = self.progress.add_task("", total=None, stage=stage)
        last = [1]

        def report(done: int, total: int, text: str = "") -> None:
            last[0] = max(done, 1)
            self.progress.update(task, completed=done, total=total or None, description=text)

        yield report
        self.progress.update(task, total=last[0], completed=last[0])


# ---------------------------------------------------------------- the command


def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Demo folder (created; a rerun reuses finished stages)."),
    size: int = typer.Option(64, "--size", help="Slice side in pixels: 64, 128 or 256 (prepared data and tokenizer)."),
    steps_scale: float = typer.Option(1.0, "--steps-scale", help="Multiply the demo's training steps (tokenizer 1200, MedVAR 800, features 300, acceptance UNet 300) by this."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when present), cpu or cuda."),
    samples: int = typer.Option(192, "--samples", min=1, help="Synthetic samples, equal shares of liver, prostate and brain_tumor."),
    json_output: bool = typer.Option(False, "--json", help="Print demo.json (settings, per-stage summaries and times) instead of tables."),
) -> None:
    """Run the whole pipeline on built-in phantoms: prepare, train, synthesize, export, evaluate.

    Example: medaug demo --out out/demo

    phantoms → prepare → tiny tokenizer + MedVAR transformer → class-balanced synthesis (PNG, NIfTI, DICOM)
    → medaug's own feature encoder → evaluate metrics → the quality bar (acceptance.json). About 12
    CPU-minutes (6-8 minutes on 2 cores) with the defaults; uses a GPU when present. A rerun with the same --out reuses finished stages.
    """
    from medaug.errors import MedaugError

    settings = DemoSettings(size=size, steps_scale=steps_scale, samples=samples, device=device)
    reporter = StageReporter(quiet=json_output)
    try:
        with reporter.open():
            state = run_demo(out, settings, reporter)
    except MedaugError as error:
        print_error(str(error))
        raise typer.Exit(2) from None
    if json_output:
        print_json({**state, "out": str(out), "paths": output_paths(out)})
        return
    render_summary(state, out)


def output_paths(out: Path) -> dict[str, str]:
    """Where to look first."""
    return {"report": str(out / REPORT_DIR / "report.html"), "metrics": str(out / REPORT_DIR / "metrics.json"),
            "montage": str(out / SYNTHETIC_DIR / "montage.png"), "manifest": str(out / SYNTHETIC_DIR / "manifest.parquet"),
            "png": str(out / SYNTHETIC_DIR / "png"), "nifti": str(out / SYNTHETIC_DIR / "nifti"),
            "dicom": str(out / SYNTHETIC_DIR / "dicom"), "generator": str(out / MEDVAR_DIR),
            "features": str(out / FEATURES_DIR), "prepared": str(out / PREPARED_DIR)}


def render_summary(state: dict[str, Any], out: Path) -> None:
    """Per stage: ran or reused, seconds and its headline numbers; then where the files are."""
    rows = [[stage, "reused" if record.get("reused") else "ran", f"{record['wall_s']:.0f}", f"{record['cpu_s']:.0f}",
             headline(stage, record["summary"])] for stage, record in state["stages"].items()]
    console.print(table(f"medaug demo ({out})", ["stage", "", "wall s", "CPU s", "result"], rows))
    metrics = state["stages"]["evaluate"]["summary"]["medaug"]
    console.print(table("Synthetic vs real test slices, medaug feature encoder",
                        list(metrics), [[_number(value) for value in metrics.values()]]))
    paths = output_paths(out)
    for name in ("report", "montage", "manifest", "png", "nifti", "dicom", "generator"):
        console.print(f"{name + ':':<10} {paths[name]}", soft_wrap=True, highlight=False)


def headline(stage: str, summary: dict[str, Any]) -> str:
    """One line of a stage's result for the summary table."""
    if stage == "phantoms":
        return f"{summary['subjects']} subjects"
    if stage == "prepare":
        return f"{summary['slices']} slices from {summary['volumes']} volumes, splits {summary['slices_per_split']}"
    if stage == "train":
        return (f"tokenizer {summary['tokenizer_steps']} steps (val PSNR {_number(summary['tokenizer_val']['psnr'])} dB, "
                f"Dice {_number(summary['tokenizer_val']['dice'])}); MedVAR {summary['var_steps']} steps "
                f"(token accuracy {_number(summary['var_train']['acc'])})")
    if stage == "synthesize":
        first = summary.get("first_draw") or {}
        shown = ", ".join(f"{target} {100 * fraction:.0f}%" + (f" (first draw {100 * first[target]:.0f}%)"
                                                              if first.get(target) is not None else "")
                          for target, fraction in summary["adherence"].items())
        return f"{summary['samples']} samples; mask shows the target: {shown}; files {summary['files']}"
    if stage == "features":
        return (f"{summary['steps']} steps; {summary['split']} structure AUROC {_number(summary['structure_auroc_macro'])}, "
                f"domain accuracy {_number(summary['domain_accuracy'])}")
    if stage == "acceptance":
        failed = [name for name, check in summary["checks"].items() if not check["passed"]]
        return "quality bar passed" if summary["passed"] else f"quality bar NOT passed: {', '.join(failed)}"
    return f"{summary['counts']['synthetic']} synthetic vs {summary['counts']['real']} real; lineage {summary['lineage']}"


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


__all__ = ["DemoSettings", "demo", "prepare_recipe", "run_demo", "train_overrides"]
