"""``medaug synthesize`` (issue 7): plan, engine, manifest, exports, resume, torchrun, CLI.

The generator is the session's tiny phantom pipeline (``tests/pipeline.py``); ``tiny_synthesis`` is one
finished run of it (24 samples, liver + prostate, batches of 8, PNG + NIfTI + nnU-Net).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medaug import vocab
from medaug.data.dataset import PreparedSliceDataset
from medaug.errors import ConfigError
from medaug.synth import layout
from medaug.synth.engine import SynthGenerator, export_affine
from medaug.synth.plan import PlanRequest, SamplingSettings, draw_seed, make_plan, resolve_targets, sample_seed
from medaug.synth.run import read_manifest, redraw_missing, regenerate, synthesize
from medaug.train.condition_bank import build_condition_bank
from medaug_cli.app import app
from tests.pipeline import REPO, SYNTH_BATCH, SYNTH_N
from tests.train.torchrun import run_torchrun

# ---------------------------------------------------------------- the plan (a hand-made bank)

STRUCTURES = ("liver", "spleen", "prostate_peripheral_zone", "prostate_transition_zone", "brain_tumor_edema")
DOMAINS = ("ct/abdomen", "mr/brain", "mr/prostate")


def _bank():
    """ct rows: 6 with liver, 2 with spleen only; prostate rows: 3 with both zones, 1 with PZ only; brain: 2 edema."""
    rows = [(0, {1}), (0, {1})] * 3 + [(0, {2})] * 2 + [(2, {3, 4})] * 3 + [(2, {3})] + [(1, {5})] * 2
    domain_N = np.array([d for d, _ in rows])
    present_NS = np.zeros((len(rows), len(STRUCTURES)), bool)
    for i, (_, present) in enumerate(rows):
        present_NS[i, [s - 1 for s in present]] = True
    annotated_NS = np.zeros_like(present_NS)
    annotated_NS[domain_N == 0, :2] = annotated_NS[domain_N == 2, 2:4] = annotated_NS[domain_N == 1, 4] = True
    return build_condition_bank(domain_N, present_NS, annotated_NS, DOMAINS, STRUCTURES)


def test_parent_names_resolve_to_the_generators_parts():
    resolved = resolve_targets(["prostate", "liver"], STRUCTURES)
    assert resolved == {"prostate": ("prostate_peripheral_zone", "prostate_transition_zone"), "liver": ("liver",)}


def test_unknown_organ_lists_the_valid_names():
    for name in ("heart", "not_an_organ"):
        with pytest.raises(ConfigError) as error:
            resolve_targets([name], STRUCTURES)
        message = str(error.value)
        assert f"--organ {name}" in message and "\n" not in message
        assert all(valid in message for valid in ("liver", "prostate", "prostate_transition_zone", "brain_tumor"))


def test_structure_balance_gives_equal_shares_and_conditions_that_contain_the_target():
    plan = make_plan(PlanRequest(n=11, targets=("liver", "prostate")), _bank(), DOMAINS)
    counts = plan.counts()["target"]
    assert sorted(counts.values()) == [5, 6] and set(counts) == {"liver", "prostate"}
    for sample in plan.samples:
        wanted = {STRUCTURES.index(name) + 1 for name in sample.target_structures}
        assert wanted & set(sample.present), sample
        assert sample.domain == ("ct/abdomen" if sample.target == "liver" else "mr/prostate")
    assert [s.index for s in plan.samples] == list(range(11))
    assert [s.seed for s in plan.samples] == [sample_seed(0, i) for i in range(11)]


def test_domain_balance_and_no_target_spread_evenly_over_domains():
    plan = make_plan(PlanRequest(n=9), _bank(), DOMAINS)
    assert plan.counts()["domain"] == {"ct/abdomen": 3, "mr/brain": 3, "mr/prostate": 3}
    plan = make_plan(PlanRequest(n=8, targets=("liver", "spleen", "prostate"), balance="domain"), _bank(), DOMAINS)
    assert plan.counts()["domain"] == {"ct/abdomen": 4, "mr/prostate": 4}
    assert plan.counts()["target"] == {"liver": 2, "spleen": 2, "prostate": 4} or sorted(plan.counts()["target"].items()) == [
        ("liver", 2), ("prostate", 4), ("spleen", 2)]


def test_balance_none_follows_the_training_counts():
    plan = make_plan(PlanRequest(n=4000, targets=("prostate",), balance="none", seed=5), _bank(), DOMAINS)
    both = sum(1 for s in plan.samples if s.present == (3, 4))
    assert abs(both / 4000 - 0.75) < 0.03  # 3 of the 4 prostate rows have both zones


def test_plan_is_deterministic_and_unconditional_plans_use_the_null_condition():
    request = PlanRequest(n=12, targets=("liver", "prostate"), seed=7)
    assert make_plan(request, _bank(), DOMAINS).to_table().equals(make_plan(request, _bank(), DOMAINS).to_table())
    plan = make_plan(PlanRequest(n=6, unconditional=True), _bank(), DOMAINS)
    assert all(s.unconditional and not s.present and not s.annotated for s in plan.samples)
    with pytest.raises(ConfigError, match="--unconditional"):
        PlanRequest(n=3, unconditional=True, targets=("liver",))
    with pytest.raises(ConfigError, match="--domain mr/heart"):
        make_plan(PlanRequest(n=3, domains=("mr/heart",)), _bank(), DOMAINS)
    with pytest.raises(ConfigError, match="--top-p"):
        SamplingSettings(top_p=0.0)


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def generator(tiny_var_run):
    return SynthGenerator(tiny_var_run["run_dir"], "cpu")


def test_same_seed_gives_identical_samples_and_another_seed_differs(generator):
    plan = make_plan(PlanRequest(n=4, targets=("liver",), seed=11), generator.bank, generator.domain_names)
    first, second = (generator.generate(plan.samples, SamplingSettings()) for _ in range(2))
    np.testing.assert_array_equal(first.image_BCHW, second.image_BCHW)
    np.testing.assert_array_equal(first.label_BHW, second.label_BHW)
    other = make_plan(PlanRequest(n=4, targets=("liver",), seed=12), generator.bank, generator.domain_names)
    assert not np.array_equal(generator.generate(other.samples, SamplingSettings()).image_BCHW, first.image_BCHW)


def test_a_sample_does_not_depend_on_its_batch_neighbours(generator):
    """Per-sample seeds: tokens of a sample equal whether it is sampled alone or in a batch (fp32, CPU)."""
    plan = make_plan(PlanRequest(n=3, targets=("prostate",), seed=2), generator.bank, generator.domain_names)
    batch = generator.generate(plan.samples, SamplingSettings())
    alone = generator.generate(plan.samples[1:2], SamplingSettings())
    np.testing.assert_array_equal(alone.label_BHW[0], batch.label_BHW[1])
    np.testing.assert_allclose(alone.image_BCHW[0], batch.image_BCHW[1], atol=1e-5)


# ---------------------------------------------------------------- a finished run


def test_manifest_holds_every_sample_with_its_settings(tiny_synthesis):
    out, request = tiny_synthesis["out"], tiny_synthesis["request"]
    manifest = read_manifest(out)
    assert manifest.num_rows == SYNTH_N
    assert manifest.column("sample_index").to_pylist() == list(range(SYNTH_N))
    for name, dtype, _ in layout.MANIFEST_COLUMNS:
        assert manifest.schema.field(name).type == dtype, name
    rows = manifest.to_pylist()
    assert all(r["synthetic"] and r["split"] is None for r in rows)
    assert {r["target"]: 0 for r in rows} and sum(r["target"] == "liver" for r in rows) == SYNTH_N // 2
    min_pixels = SynthGenerator(tiny_synthesis["run"], "cpu").shown_min_pixels
    for r in rows:
        assert 1 <= r["draws"] <= 1 + request.redraws
        assert r["seed"] == draw_seed(sample_seed(request.seed, r["sample_index"]), r["draws"])
        assert (r["cfg"], r["top_k"], r["top_p"], r["temperature"]) == (1.5, 900, 0.96, 1.0)
        assert (r["batch_index"], r["batch_position"], r["batch_size"]) == (r["sample_index"] // SYNTH_BATCH,
                                                                             r["sample_index"] % SYNTH_BATCH, SYNTH_BATCH)
        assert r["dtype"] == "float32" and r["device"] == "cpu" and len(r["generator_sha256"]) == 64
        shown = sum(count for name, count in zip(r["structures_present"], r["structure_pixels"])
                    if name in r["target_structures"])
        assert r["adherent"] == (shown >= min_pixels)
        assert r["adherent"] or r["draws"] == 1 + request.redraws  # a miss is kept only when out of redraws
    state = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
    assert state["status"] == "complete" and state["samples"] == SYNTH_N
    for target, record in state["adherence"]["targets"].items():
        flags = [r["adherent"] for r in rows if r["target"] == target]
        first = [r["adherent"] and r["draws"] == 1 for r in rows if r["target"] == target]
        assert record == {"samples": len(flags), "fraction": round(float(np.mean(flags)), 4),
                          "first_draw": round(float(np.mean(first)), 4)}


def _target_pixels(label_HW, structures) -> int:
    return int(np.isin(label_HW, [vocab.structure(name).id for name in structures]).sum())


def test_samples_whose_masks_miss_their_target_are_drawn_again(generator, monkeypatch):
    """redraw_missing against draws made one by one: which rows miss (pixel counts of their own labels), and
    that each replaced row equals its sample generated alone with the next draw's seed."""
    # the body: the tiny generator draws it on 650-750 pixels (not yet the organs), so a threshold at the median splits
    plan = make_plan(PlanRequest(n=8, targets=("body",), seed=5), generator.bank, generator.domain_names)
    settings = SamplingSettings()
    batch = generator.generate(plan.samples, settings)
    first_pixels = [_target_pixels(batch.label_BHW[i], s.target_structures) for i, s in enumerate(plan.samples)]
    threshold = int(np.median(first_pixels)) + 1  # about half the first draws miss
    monkeypatch.setattr(SynthGenerator, "shown_min_pixels", property(lambda self: threshold))
    kept, draws = redraw_missing(generator, plan.samples, batch, settings, redraws=2)
    assert [d > 1 for d in draws] == [p < threshold for p in first_pixels]
    assert any(d > 1 for d in draws) and any(d == 1 for d in draws)
    for row, (sample, draw) in enumerate(zip(plan.samples, draws)):
        assert kept[row].seed == draw_seed(sample.seed, draw)
        pixels = _target_pixels(batch.label_BHW[row], sample.target_structures)
        assert pixels >= threshold or draw == 3
        for earlier in range(2, draw):  # every draw before the kept one missed too
            alone = generator.generate([replace(sample, seed=draw_seed(sample.seed, earlier))], settings)
            assert _target_pixels(alone.label_BHW[0], sample.target_structures) < threshold
        if draw > 1:
            alone = generator.generate([kept[row]], settings)
            np.testing.assert_array_equal(alone.label_BHW[0], batch.label_BHW[row])
            assert batch.present[row] == alone.present[0] and batch.pixels[row] == alone.pixels[0]


def test_redraws_must_be_a_small_count():
    with pytest.raises(ConfigError, match="--redraws"):
        PlanRequest(n=1, redraws=-1)
    with pytest.raises(ConfigError, match="--redraws"):
        PlanRequest(n=1, redraws=11)


def test_structures_present_match_the_stored_masks(tiny_synthesis):
    dataset = PreparedSliceDataset(tiny_synthesis["out"])
    rows = read_manifest(tiny_synthesis["out"]).to_pylist()
    assert len(dataset) == SYNTH_N
    for i in (0, 9, SYNTH_N - 1):
        label = dataset[i]["label"].numpy()
        ids = [int(v) for v in np.unique(label) if v not in (0, 255)]
        assert rows[i]["structures_present"] == [vocab.by_id(v).name for v in ids]
        assert rows[i]["structure_pixels"] == [int((label == v).sum()) for v in ids]


def test_regenerating_a_row_reproduces_it_exactly(tiny_synthesis):
    out = tiny_synthesis["out"]
    dataset = PreparedSliceDataset(out)
    redrawn = [r["sample_index"] for r in read_manifest(out).to_pylist() if r["draws"] > 1]
    for sample_index in (3, 13, *redrawn[:2]):  # a redrawn row: its batch is the rows drawn that often
        image, label = regenerate(out, sample_index)
        item = dataset[sample_index]
        channels = int(item["channel_mask"].sum())
        np.testing.assert_array_equal(image.astype(np.float16)[:channels], item["image"].numpy().astype(np.float16)[:channels])
        np.testing.assert_array_equal(label, item["label"].numpy())
        png = np.asarray(Image.open(out / "png" / f"{layout.sample_id(sample_index)}_label.png"))
        np.testing.assert_array_equal(png, label)


def test_png_channels_hold_the_model_values_linearly(tiny_synthesis):
    out = tiny_synthesis["out"]
    row = read_manifest(out).to_pylist()[5]
    image, _ = regenerate(out, 5)
    for c, channel in enumerate(row["channels"]):
        stored = np.asarray(Image.open(out / "png" / f"{row['sample_id']}_{channel}.png")).astype(np.int64)
        expected = np.round((np.clip(image[c].astype(np.float64), -1, 1) + 1.0) / 2.0 * 65535.0)
        assert np.abs(stored - expected).max() <= 1


def test_nifti_round_trip_keeps_affine_spacing_and_units(tiny_synthesis, generator):
    out = tiny_synthesis["out"]
    rows = read_manifest(out).to_pylist()
    for row in [next(r for r in rows if r["modality"] == modality) for modality in ("CT", "MR")]:
        domain = generator.domains[row["domain"]]
        image, label = regenerate(out, row["sample_index"])
        for c, channel in enumerate(row["channels"]):
            loaded = nib.load(out / "nifti" / f"{row['sample_id']}_{channel}.nii")
            np.testing.assert_allclose(loaded.affine[:, [0, 1, 3]],
                                       _nifti_affine(export_affine(domain, generator.size))[:, [0, 1, 3]], atol=1e-4)
            np.testing.assert_allclose(loaded.header.get_zooms()[:2], [domain["spacing_mm"]] * 2, rtol=1e-5)
            mapping = json.loads(row["intensity"])[c]
            expected = np.clip(image[c].astype(np.float64), -1, 1) * mapping["scale"] + mapping["offset"]
            values = np.asarray(loaded.dataobj, dtype=np.float64)[..., 0]
            assert np.abs(values - expected).max() <= (0.51 if mapping["units"] == "HU" else 1e-3)
            if domain["modality"] == "ct":
                assert mapping["units"] == "HU" and (mapping["low"], mapping["high"]) == tuple(domain["intensity"]["ct"]["window_hu"])
        stored_label = np.asarray(nib.load(out / "nifti" / f"{row['sample_id']}_label.nii").dataobj)[..., 0]
        np.testing.assert_array_equal(stored_label, label)


def _nifti_affine(affine_rc):
    """The exporter's convention: the NIfTI voxel axes are (row, col, 0), so the affine is the slice affine."""
    return affine_rc


def test_nnunet_datasets_hold_one_case_per_sample_with_consecutive_labels(tiny_synthesis):
    out = tiny_synthesis["out"]
    manifest = read_manifest(out).to_pylist()
    folders = sorted((out / "nnunet").iterdir())
    assert [f.name for f in folders] == ["Dataset900_medaug_ct_abdomen", "Dataset902_medaug_mr_prostate"]
    for folder in folders:
        record = json.loads((folder / "dataset.json").read_text())
        domain = record["medaug"]["channels"]
        expected = [r for r in manifest if r["channels"] == domain]
        assert record["numTraining"] == len(expected) == len(list((folder / "labelsTr").glob("*.nii.gz")))
        labels = sorted(v for k, v in record["labels"].items() if k != "ignore")
        assert labels == list(range(len(labels)))
        for r in expected[:2]:
            for number in range(len(domain)):
                assert (folder / "imagesTr" / f"syn_{r['sample_id']}_{number:04d}.nii.gz").is_file()


def test_rerunning_a_finished_run_does_nothing(tiny_synthesis):
    out = tiny_synthesis["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = synthesize(tiny_synthesis["run"], out, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu",
                        resume=True)
    assert result.generated == 0 and result.summary["status"] == "complete"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_used_folder_is_refused_without_resume_and_a_changed_request_with_it(tiny_synthesis, tmp_path):
    out = tiny_synthesis["out"]
    with pytest.raises(ConfigError, match="--resume"):
        synthesize(tiny_synthesis["run"], out, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu")
    changed = PlanRequest(n=SYNTH_N, targets=("liver",), batch_size=SYNTH_BATCH, seed=3)
    with pytest.raises(ConfigError, match="plan_sha256"):
        synthesize(tiny_synthesis["run"], out, changed, tiny_synthesis["export"], device="cpu", resume=True)
    (tmp_path / "mine.txt").write_text("the user's file")
    with pytest.raises(ConfigError, match="not empty"):
        synthesize(tiny_synthesis["run"], tmp_path, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu")
    assert (tmp_path / "mine.txt").read_text() == "the user's file"


def test_a_run_started_before_redraws_existed_resumes_with_none(tiny_synthesis, tmp_path):
    import shutil
    from dataclasses import replace as changed

    out = tmp_path / "old"
    shutil.copytree(tiny_synthesis["out"], out)
    state = json.loads((out / layout.SYNTHESIZE_JSON).read_text())
    del state["settings"]["redraws"]  # what synthesize.json held before --redraws
    (out / layout.SYNTHESIZE_JSON).write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="--redraws 0"):
        synthesize(tiny_synthesis["run"], out, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu",
                   resume=True)
    none = changed(tiny_synthesis["request"], redraws=0)
    result = synthesize(tiny_synthesis["run"], out, none, tiny_synthesis["export"], device="cpu", resume=True)
    assert result.generated == 0 and result.summary["status"] == "complete"


class _Killed(Exception):
    pass


def _content(out: Path) -> pa.Table:
    """The manifest without the columns that name the run (batch ids, times)."""
    drop = {"slice_id", "volume_id", "shard", "created_at", "source_image"}
    manifest = read_manifest(out)
    return manifest.select([name for name in manifest.column_names if name not in drop])


def test_kill_and_resume_equals_an_uninterrupted_run(tiny_synthesis, tmp_path):
    out = tmp_path / "killed"

    def kill_after_two_batches(done, total, rate):
        if done >= 2 * SYNTH_BATCH:
            raise _Killed

    with pytest.raises(_Killed):
        synthesize(tiny_synthesis["run"], out, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu",
                   progress=kill_after_two_batches)
    assert not (out / layout.MANIFEST_FILE).exists()
    assert json.loads((out / layout.SYNTHESIZE_JSON).read_text())["status"] == "running"
    # a kill in the middle of a batch: its export files half there, a writer's temporary file left behind
    parts = sorted((out / "parts").glob("*.parquet"))
    assert len(parts) == 2
    unfinished = pa.parquet.read_table(parts[-1], columns=["sample_id"]).column("sample_id").to_pylist()
    parts[-1].unlink()
    next((out / "png").glob(f"{unfinished[0]}_*.png")).unlink()
    (out / "shards" / ".part-999999-stale.npy").write_bytes(b"junk")
    result = synthesize(tiny_synthesis["run"], out, tiny_synthesis["request"], tiny_synthesis["export"], device="cpu",
                        resume=True)
    assert result.generated == 2 * SYNTH_BATCH
    assert _content(out).equals(_content(tiny_synthesis["out"]))
    assert not list((out / "shards").glob(".part-*"))
    names = lambda root, sub: sorted(p.name for p in (root / sub).rglob("*") if p.is_file())  # noqa: E731
    for sub in ("png", "nifti", "nnunet"):
        assert names(out, sub) == names(tiny_synthesis["out"], sub)


def test_two_torchrun_processes_cover_the_plan_exactly_once(tiny_synthesis, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "medaug_cli.app", "synthesize", "--checkpoint", str(tiny_synthesis["run"]), "--out", str(out),
               "--num-samples", str(SYNTH_N), "--organ", "liver", "--organ", "prostate", "--batch-size", str(SYNTH_BATCH),
               "--seed", "3", "--format", "png,nifti,nnunet", "--device", "cpu", "--json"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finished = run_torchrun(command, env=environment, cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads(finished.stdout)  # only rank 0 prints
    assert summary["status"] == "complete" and summary["samples"] == SYNTH_N
    assert _content(out).equals(_content(tiny_synthesis["out"]))
    batch_of = {r["batch_index"] for r in read_manifest(out).to_pylist()}
    assert batch_of == set(range(SYNTH_N // SYNTH_BATCH))


# ---------------------------------------------------------------- the command line

runner = CliRunner()


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tiny_var_run, tmp_path):
    result = runner.invoke(app, ["synthesize", "--checkpoint", tiny_var_run["run_dir"], "--n", "10", "--organ", "prostate",
                                 "--organ", "liver", "--dry-run", "--out", str(tmp_path / "x"), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    assert plan["counts"]["target"] == {"prostate": 5, "liver": 5} or sorted(plan["counts"]["target"].values()) == [5, 5]
    assert plan["targets"]["prostate"] == ["prostate_peripheral_zone", "prostate_transition_zone"]
    assert not (tmp_path / "x").exists()


def test_cli_unknown_organ_is_a_one_line_error(tiny_var_run):
    result = runner.invoke(app, ["synthesize", "--checkpoint", tiny_var_run["run_dir"], "--n", "2", "--organ", "heart",
                                 "--dry-run"])
    assert result.exit_code == 2
    assert "--organ heart" in result.output and "prostate" in result.output


def test_cli_unconditional_run_with_8_bit_window(tiny_var_run, tmp_path):
    out = tmp_path / "unconditional"
    result = runner.invoke(app, ["synthesize", "--checkpoint", tiny_var_run["run_dir"], "--n", "3", "--unconditional",
                                 "--out", str(out), "--window", "40,400", "--format", "png", "--json"])
    assert result.exit_code == 0, result.output
    rows = read_manifest(out).to_pylist()
    assert all(r["unconditional"] and r["condition_present"] == [] for r in rows)
    assert all(r["target"] is None and r["adherent"] is None for r in rows)
    first = rows[0]
    png = np.asarray(Image.open(out / "png" / f"{first['sample_id']}_{first['channels'][0]}.png"))
    assert png.dtype == np.uint8


def test_fast_path_gives_the_basic_samplers_samples_on_cpu(generator, tiny_var_run):
    """The GPU path (FastSampler + FastDecoder) run on the CPU in float32 equals the basic sampler + decode."""
    fast = SynthGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    plan = make_plan(PlanRequest(n=5, targets=("liver", "prostate"), seed=9), generator.bank, generator.domain_names)
    basic, quick = generator.generate(plan.samples, SamplingSettings()), fast.generate(plan.samples, SamplingSettings())
    np.testing.assert_array_equal(quick.label_BHW, basic.label_BHW)
    np.testing.assert_allclose(quick.image_BCHW, basic.image_BCHW, atol=1e-5)


class _QueueingGenerator(SynthGenerator):
    """The real generator, declared asynchronous, logging when each batch is submitted and collected."""

    queues_on_device = True  # what the fast path reports on CUDA

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    def submit(self, samples, settings):
        from medaug.synth.engine import PendingBatch

        self.calls.append(("submit", samples[0].index))
        pending = super().submit(samples, settings)
        return PendingBatch(lambda: (self.calls.append(("result", samples[0].index)), pending.result())[1])


def test_batches_are_queued_one_ahead_when_the_device_runs_behind_the_host(tiny_var_run, tmp_path, monkeypatch):
    """With an asynchronous generator batch b + 1 is submitted before b is collected; what is saved is what a
    one-at-a-time loop saves."""
    import medaug.synth.run as run_module

    saved: dict[str, list] = {}

    def spying(label: str):
        def save(generator, plan, samples, batch, *args):
            saved.setdefault(label, []).append((samples[0].index, batch.image_BCHW.copy(), batch.label_BHW.copy()))
            return original(generator, plan, samples, batch, *args)
        return save

    original = run_module.save_batch
    request = PlanRequest(n=7, targets=("liver", "prostate"), batch_size=2, seed=4, redraws=0)  # the order of batches only
    queueing = _QueueingGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    plain = SynthGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    assert not plain.queues_on_device
    for label, generator in (("queued", queueing), ("plain", plain)):
        plan = make_plan(request, generator.bank, generator.domain_names)
        monkeypatch.setattr(run_module, "save_batch", spying(label))
        out = tmp_path / label
        out.mkdir()
        result = run_module.generate_batches(generator, plan, out, run_module.ExportSettings(formats=()), "uid", 0, 1,
                                             None)
        assert result.generated == 7
    first = [plan.batch(b)[0].index for b in range(plan.num_batches)]
    expected = [("submit", first[0])]
    for now, following in zip(first, first[1:] + [None]):
        expected += ([("submit", following)] if following is not None else []) + [("result", now)]
    assert queueing.calls == expected
    assert [index for index, *_ in saved["queued"]] == [index for index, *_ in saved["plain"]] == first
    for (_, image_a, label_a), (_, image_b, label_b) in zip(saved["queued"], saved["plain"]):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_a_failed_save_is_raised_even_when_generation_fails_too(tiny_var_run, tmp_path, monkeypatch):
    """Batch 0's save fails in the saver thread while batch 1's generation fails in the main thread: the save's
    error is raised (not swallowed), with the generation's error as its context, and no batch is complete."""
    import medaug.synth.run as run_module

    class SaveFailed(RuntimeError):
        pass

    class GenerateFailed(RuntimeError):
        pass

    class FailingSecond(SynthGenerator):
        def submit(self, samples, settings):
            if samples[0].index != plan.batch(0)[0].index:
                raise GenerateFailed("batch 1")
            return super().submit(samples, settings)

    def failing_save(*args):
        raise SaveFailed("batch 0")

    generator = FailingSecond(tiny_var_run["run_dir"], "cpu")
    plan = make_plan(PlanRequest(n=4, targets=("liver",), batch_size=2, seed=1, redraws=0),  # a redraw would submit
                     generator.bank, generator.domain_names)                                # batch 0's misses again
    monkeypatch.setattr(run_module, "save_batch", failing_save)
    with pytest.raises(SaveFailed) as raised:
        run_module.generate_batches(generator, plan, tmp_path, run_module.ExportSettings(formats=()), "uid", 0, 1, None)
    assert isinstance(raised.value.__context__, GenerateFailed)
    from medaug.data.shards import ShardWriter

    assert not any(ShardWriter(tmp_path).is_complete(layout.batch_id("uid", b)) for b in range(plan.num_batches))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the decode stream exists on CUDA only")
def test_batches_queued_on_cuda_equal_batches_made_one_at_a_time(tiny_var_run):
    """On a GPU: every batch submitted before any result is taken (decodes behind later batches' sampling)
    gives the images and labels that batches generated one at a time give."""
    generator = SynthGenerator(tiny_var_run["run_dir"], "cuda")
    plan = make_plan(PlanRequest(n=12, targets=("liver", "prostate"), batch_size=4, seed=3), generator.bank,
                     generator.domain_names)
    batches = [plan.batch(b) for b in range(plan.num_batches)]
    alone = [generator.generate(samples, SamplingSettings()) for samples in batches]
    queued = [pending.result() for pending in [generator.submit(samples, SamplingSettings()) for samples in batches]]
    for one, other in zip(alone, queued):
        np.testing.assert_array_equal(other.image_BCHW, one.image_BCHW)
        np.testing.assert_array_equal(other.label_BHW, one.label_BHW)


@pytest.mark.parametrize("triton", [True, False], ids=["with-triton", "without-triton"])
def test_the_decoder_is_compiled_only_for_runs_where_compiling_pays_and_resumes_as_recorded(tiny_var_run, monkeypatch,
                                                                                              triton):
    import medaug.models.fused_decode as fused_decode
    from medaug.synth.engine import DECODER_COMPILE_MIN_SAMPLES, LEGACY_DECODER

    monkeypatch.setattr(fused_decode, "fused_default", lambda device: triton)
    generator = SynthGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    assert generator.decoder_record() is None  # off CUDA the decoder is exact: nothing to record or adopt
    generator.adopt_decoder({"compiled": True, "channel_stats_norm": True})
    assert generator.decoder_record() is None
    generator.device = torch.device("cuda")  # the rule alone: nothing runs on it
    # with Triton, chunks of 32 or more run the fused path and "compiled" only concerns smaller ones
    compiled = {"compiled": True, "channel_stats_norm": not triton, "gemm_attention": True, "fused_norm": triton,
                "padded_output": triton, "phase_upsample": triton, "padded_rows": triton}
    eager = {"compiled": False, "channel_stats_norm": False, "gemm_attention": True, "fused_norm": triton,
             "padded_output": triton, "phase_upsample": triton, "padded_rows": triton}
    assert generator.decoder_record() == compiled  # a dataset drawing epoch after epoch (GeneratorDataset)
    generator.expected_samples = DECODER_COMPILE_MIN_SAMPLES - 1
    assert generator.decoder_record() == eager
    generator.expected_samples = DECODER_COMPILE_MIN_SAMPLES
    assert generator.decoder_record() == (eager if triton else compiled)  # fused: compiling serves the last chunk
    generator.compile_decoder = True
    assert generator.decoder_record() == compiled
    generator.compile_decoder = False
    assert generator.decoder_record() == eager
    generator.adopt_decoder(None)  # a run from before the record: as it decoded then
    assert generator.decoder_record() == LEGACY_DECODER == {"compiled": True, "channel_stats_norm": False,
                                                            "gemm_attention": False, "fused_norm": False,
                                                            "padded_output": False, "phase_upsample": False,
                                                            "padded_rows": False}
    generator.adopt_decoder(compiled)
    assert generator.decoder_record() == compiled
    generator.adopt_decoder({"compiled": True, "channel_stats_norm": True})  # recorded before gemm_attention
    assert generator.decoder_record() == {"compiled": True, "channel_stats_norm": True, "gemm_attention": False,
                                          "fused_norm": False, "padded_output": False, "phase_upsample": False,
                                          "padded_rows": False}
    generator.adopt_decoder({"compiled": False, "channel_stats_norm": False, "gemm_attention": True})  # before fused
    assert generator.decoder_record() == {**eager, "fused_norm": False, "padded_output": False, "phase_upsample": False,
                                          "padded_rows": False}
    later = ("padded_output", "phase_upsample", "padded_rows")
    unpadded = {key: value for key, value in eager.items() if key not in later}
    generator.adopt_decoder(unpadded)  # fused, recorded before the padded output conv
    assert generator.decoder_record() == {**eager, **dict.fromkeys(later, False)}
    generator.adopt_decoder({key: value for key, value in eager.items() if key != "padded_rows"})  # before padded rows
    assert generator.decoder_record() == {**eager, "padded_rows": False}


def test_the_fast_path_builds_the_decoder_it_records(tiny_var_run, monkeypatch):
    import medaug.models.vqvae as vqvae_module

    built: list[dict] = []
    monkeypatch.setattr(vqvae_module, "FastDecoder", lambda vqvae, **options: built.append(options) or options)
    generator = SynthGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    generator.device = torch.device("cuda")  # the rule alone: the decoder class is replaced, nothing runs
    monkeypatch.setattr(generator, "_fast_sampler", object())
    generator.adopt_decoder({"compiled": False, "channel_stats_norm": True})  # a record from before gemm_attention
    generator._fast_path()
    assert built == [{"compile": False, "channel_stats_norm": True, "gemm_attention": False, "fused_norm": False,
                      "padded_output": False, "phase_upsample": False, "padded_rows": False}]


@pytest.mark.parametrize("triton", [True, False], ids=["with-triton", "without-triton"])
def test_the_sampler_records_its_qkv_kernel_and_resumes_as_recorded(tiny_var_run, monkeypatch, triton):
    import medaug.models.fused_decode as fused_decode
    import medaug.models.sampling as sampling
    from medaug.synth.engine import LEGACY_SAMPLER

    monkeypatch.setattr(fused_decode, "fused_default", lambda device: triton)
    generator = SynthGenerator(tiny_var_run["run_dir"], "cpu", fast=True)
    assert generator.sampler_record() is None  # off CUDA: nothing to record or adopt
    generator.adopt_sampler({"fused_qkv": True})
    assert generator.sampler_record() is None
    generator.device = torch.device("cuda")  # the rule alone: nothing runs on it
    assert generator.sampler_record() == {"fused_qkv": triton}
    generator.adopt_sampler(None)  # a run from before the record: the compiled q/k normalisation
    assert generator.sampler_record() == LEGACY_SAMPLER == {"fused_qkv": False}
    generator.adopt_sampler({"fused_qkv": True})
    assert generator.sampler_record() == {"fused_qkv": True}
    built: list[dict] = []
    monkeypatch.setattr(sampling, "FastSampler", lambda var, quantizer, **options: built.append(options) or options)
    monkeypatch.setattr(generator, "_fast_decoder", object())
    generator._fast_path()
    assert built == [{"fused_kernels": True}]


def test_a_run_records_its_decoder_settings(tiny_synthesis):
    state = json.loads((tiny_synthesis["out"] / layout.SYNTHESIZE_JSON).read_text())
    assert "decoder" in state["settings"] and state["settings"]["decoder"] is None  # the CPU: none apply


def test_cli_batch_size_defaults_by_device_and_the_decoder_flag_is_checked(tiny_var_run, monkeypatch):
    from medaug_cli.synthesize import CPU_BATCH, GPU_BATCH, default_batch_size

    assert default_batch_size("auto", None) == CPU_BATCH == 16  # this machine has no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule on a GPU machine
    assert default_batch_size("auto", None) == default_batch_size("cuda", "bfloat16") == GPU_BATCH == 256
    assert default_batch_size("cuda", "float32") == default_batch_size("cpu", None) == CPU_BATCH  # the basic path
    monkeypatch.undo()
    result = runner.invoke(app, ["synthesize", "--checkpoint", tiny_var_run["run_dir"], "--n", "2", "--organ", "liver",
                                 "--compile-decoder", "maybe", "--dry-run"])
    assert result.exit_code == 2 and "--compile-decoder" in result.output and "auto, on or off" in result.output
