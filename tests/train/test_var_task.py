"""The MedVAR training task: recipes and lr scaling, the weighted token loss, condition dropout (the null
condition), overfitting a few token maps, exact resume with the balanced sampler, 2-process gloo DDP, and a
generator run that reproduces its samples from the run folder alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medaug.config.base import to_dict
from medaug.data.index import read_index
from medaug.data.samplers import BalancedSampler, SamplerConfig, row_weights
from medaug.errors import CheckpointError, ConfigError
from medaug.io.png import read_png
from medaug.models.sampling import generators_from_seeds, sample_tokens
from medaug.models.var import var_preset
from medaug.train.checkpoint import latest_checkpoint, load_checkpoint, sha256_file
from medaug.train.condition_bank import ConditionBank
from medaug.train.engine import param_groups, train
from medaug.train.token_cache import tokenizer_sha256
from medaug.train.var_task import (
    SampleGridConfig,
    VarTask,
    copy_tokenizer,
    drop_flags,
    load_all_recipes,
    load_generator,
    load_var_recipe,
    token_loss,
    token_weights,
    train_var,
    write_samples,
)
from tests.train.conftest import MEDVAR_TINY, REPO, VAR_RUN_STEPS


def with_recipe(task: VarTask, overrides: list[str]) -> VarTask:
    """The same cache, quantizer and context under medvar-tiny with ``overrides``."""
    return VarTask(task.cache, task.quantizer, load_var_recipe(MEDVAR_TINY, ["train.device=cpu", *overrides]), task.context)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- recipes and loss


def test_recipes_load_and_scale_the_learning_rate_with_the_global_batch():
    tiny = load_var_recipe("medvar-tiny")
    assert tiny.model.preset == "tiny" and tiny.train.optim["var"].lr == pytest.approx(1e-3)
    assert tiny.conditioning.drop_rate == pytest.approx(0.1) and tiny.sampler.by == "structure"
    d16 = load_var_recipe("medvar-d16")
    assert d16.base_lr is None and d16.train.optim["var"].lr == pytest.approx(1e-4 * 768 / 256)
    assert load_var_recipe("medvar-d16", ["train.batch_size=128"]).train.optim["var"].lr == pytest.approx(5e-5)
    optim = d16.train.optim["var"]
    assert (optim.betas, optim.weight_decay, optim.grad_clip, d16.train.precision) == ((0.9, 0.95), 0.05, 2.0, "bf16")
    config = d16.model.resolve(num_domains=3, num_structures=20)
    assert (config.depth, config.width, config.heads, config.total_tokens) == (16, 1024, 16, 680)
    assert load_var_recipe(to_dict(d16)) == d16  # the resolved recipe (written beside the run) reloads as it is


def test_the_null_condition_setting_reaches_the_model_and_its_checkpoint_meta():
    from medaug.config.base import from_dict
    from medaug.models.var import VARConfig

    recipe = load_var_recipe("medvar-tiny", ["model.null_keeps_domain=true"])
    config = recipe.model.resolve(num_domains=2, num_structures=3)
    assert config.null_keeps_domain is True
    assert from_dict(VARConfig, to_dict(config), "meta").null_keeps_domain is True  # what load_generator reads
    old_meta = {key: value for key, value in to_dict(config).items() if key != "null_keeps_domain"}
    assert from_dict(VARConfig, old_meta, "meta").null_keeps_domain is False  # checkpoints made before the field


@pytest.mark.parametrize("override,named", [
    ("train.optim.var.lr=1e-3", "base_lr"),
    ("model.codebook_size=256", "model.codebook_size"),
    ("model.preset=d17", "model.preset"),
    ("sampler.by=organ", "sampler.by"),
    ("conditioning.drop_rate=1.5", "conditioning.drop_rate"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing"),
    ("conditioning.min_pixels=0", "conditioning.min_pixels"),
    ("tokens.present_min_pixels=3", "tokens.present_min_pixels"),
], ids=["lr-and-base-lr", "filled-from-tokenizer", "unknown-preset", "unknown-balance", "rate-above-1", "negative-smoothing",
        "zero-pixels", "threshold-set-twice"])
def test_bad_recipe_values_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_var_recipe("medvar-d16", [override])
    assert named in str(error.value)


def test_the_cache_threshold_follows_conditioning_min_pixels():
    assert load_var_recipe("medvar-tiny").tokens.present_min_pixels == 8
    recipe = load_var_recipe("medvar-tiny", ["conditioning.min_pixels=3"])
    assert recipe.tokens.present_min_pixels == 3  # the recorded recipe says how the cache was built
    assert load_var_recipe(to_dict(recipe)) == recipe


def test_train_all_reads_both_recipes_from_one_file(tmp_path):
    named = load_all_recipes("medvar-tiny", ["tokenizer.train.max_steps=7", "var.train.max_steps=9"])
    assert named.tokenizer_source == REPO / "recipes/models/tiny.yaml" and named.tokenizer_overrides == ("train.max_steps=7",)
    assert named.tokenizer.train.max_steps == 7 and named.var.train.max_steps == 9
    (tmp_path / "my-tokenizer.yaml").write_text((REPO / "recipes/models/tiny.yaml").read_text())
    pair = tmp_path / "pair.yaml"
    pair.write_text("tokenizer: my-tokenizer.yaml\nvar: {model: {preset: tiny}, train: {batch_size: 4}}\n")
    loaded = load_all_recipes(pair)  # a path beside the file, and an inline mapping
    assert loaded.tokenizer_source == tmp_path / "my-tokenizer.yaml" and loaded.tokenizer.model.image_size == 64
    assert loaded.var.model.preset == "tiny" and loaded.var.train.batch_size == 4
    with pytest.raises(ConfigError, match="tokenizer"):
        load_all_recipes({"model": {"preset": "tiny"}})  # a VAR recipe that names no tokenizer recipe
    with pytest.raises(ConfigError, match="var.trian"):
        load_all_recipes("medvar-tiny", ["var.trian.max_steps=3"])


def test_token_loss_weights_scales_and_smooths_labels():
    config = var_preset("tiny")  # scales 1, 2, 3, 4: L = 30 tokens, V = 512
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, 512, generator=generator)
    tokens = torch.randint(512, (3, 30), generator=generator)
    scale_weights = [4.0, 0.0, 1.0, 2.0]
    loss, metrics = token_loss(logits, tokens, token_weights(config, scale_weights), 0.1, config)
    log_p = logits.double().log_softmax(dim=-1)
    ce = 0.9 * -log_p.gather(-1, tokens[..., None])[..., 0] + 0.1 * -log_p.mean(dim=-1)  # (B, L) smoothed CE
    per_token = torch.tensor([w for w, side in zip(scale_weights, (1, 2, 3, 4)) for _ in range(side * side)])
    expected = (ce * per_token).sum(dim=1).mean() / per_token.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["scale_loss/k2"]) == pytest.approx(float(ce[:, 5:14].mean()), rel=1e-5)
    hits = (logits.argmax(dim=-1) == tokens).double()
    assert float(metrics["scale_acc/k3"]) == pytest.approx(float(hits[:, 14:30].mean()))
    assert float(metrics["acc"]) == pytest.approx(float(hits.mean()))
    with pytest.raises(ConfigError, match="loss.scale_weights"):
        token_weights(config, [1.0, 2.0])


def test_dropout_flags_of_the_ranks_are_the_rows_of_the_global_batch():
    single = drop_flags(0.5, seed=3, step=7, batch=8, rank=0, world_size=1)
    halves = [drop_flags(0.5, seed=3, step=7, batch=4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.stack(halves, dim=1).flatten(), single)  # rank r holds global rows r, r + 2, ...
    assert torch.equal(drop_flags(0.5, 3, 7, 8, 0, 1), single)  # a function of (seed, step): resumes exactly
    many = drop_flags(0.1, seed=0, step=0, batch=20000, rank=0, world_size=1)
    assert abs(float(many.float().mean()) - 0.1) < 0.01
    assert bool(drop_flags(1.0, 0, 1, 5, 0, 1).all()) and not bool(drop_flags(0.0, 0, 1, 5, 0, 1).any())


# ---------------------------------------------------------------- the task's step


def _step_logits(task: VarTask, var: torch.nn.Module, batch: dict, step: int = 5) -> torch.Tensor:
    captured = []
    handle = var.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        task.training_step({"var": var}, batch, step, lambda name, loss: None)
    finally:
        handle.remove()
    return captured[0]


def test_condition_dropout_yields_the_null_condition(tiny_var_task):
    dropping = with_recipe(tiny_var_task, ["conditioning.drop_rate=1.0"])
    torch.manual_seed(0)
    var = dropping.build_modules()["var"]
    batch = dropping.train_dataset().read_batch([0, 12, 30])
    domains = dropping.var_config.num_domains
    other = {**batch, "domain": (batch["domain"] + 1) % domains, "present": ~batch["present"],
             "annotated": ~batch["annotated"]}
    dropped = _step_logits(dropping, var, batch)
    assert torch.equal(dropped, _step_logits(dropping, var, other))  # any condition: the same logits
    x_teacher = dropping.teacher_inputs(batch["tokens"])
    null = var(x_teacher, batch["domain"], batch["present"], batch["annotated"], torch.ones(3, dtype=torch.bool))
    assert torch.equal(dropped, null)
    keeping = with_recipe(tiny_var_task, ["conditioning.drop_rate=0.0"])  # control: the condition matters
    assert not torch.equal(_step_logits(keeping, var, batch), _step_logits(keeping, var, other))


def test_tiny_var_overfits_a_few_token_maps(tiny_var_task):
    task = with_recipe(tiny_var_task, ["conditioning.drop_rate=0.0"])
    rows = [int(np.flatnonzero(task.cache.domain_N == d)[i]) for d in range(3) for i in (0, 3)]
    batch = task.train_dataset().read_batch(rows)
    torch.manual_seed(0)
    var = task.build_modules()["var"]
    optimizer = torch.optim.AdamW(param_groups(var, 0.0), lr=3e-3, betas=(0.9, 0.95))

    def update(name: str, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    history = [task.training_step({"var": var}, batch, step, update) for step in range(60)]
    assert float(history[0]["acc"]) < 0.2
    var.eval()
    assert float(_step_logits(task, var, batch).argmax(dim=-1).eq(batch["tokens"]).float().mean()) > 0.9


class RecordingTask(VarTask):
    """Records the cached rows of every training batch."""

    def __init__(self, task: VarTask):
        super().__init__(task.cache, task.quantizer, task.recipe, task.context)
        self.seen: list[list[int]] = []

    def training_step(self, modules, batch, step, update):
        self.seen.append(batch["row"].tolist())
        return super().training_step(modules, batch, step, update)


def test_exact_resume_through_the_engine_with_the_balanced_sampler(tiny_var_task, tmp_path):
    base = with_recipe(tiny_var_task, ["conditioning.drop_rate=0.5", "sampler.by=structure", "sampler.epoch_size=16",
                                       "train.max_steps=6", "train.checkpoint_every=3", "train.batch_size=4"])
    config = base.recipe.train
    full_task = RecordingTask(base)
    full = train(full_task, config, tmp_path / "full")

    def crash(step: int, total: int, metrics: dict) -> None:
        if step == 5:
            raise RuntimeError("killed")

    killed = RecordingTask(base)
    with pytest.raises(RuntimeError, match="killed"):
        train(killed, config, tmp_path / "resumed", progress=crash)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000003"
    resumed_task = RecordingTask(base)
    resumed = train(resumed_task, config, tmp_path / "resumed", resume=True)
    assert resumed.step == full.step == 6
    a, b = load_checkpoint(full.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    for key, value in a.state_dicts["model"].items():
        assert torch.equal(value, b.state_dicts["model"][key]), key
    assert killed.seen[:3] + resumed_task.seen == full_task.seen
    # the engine drew the task's balanced stream: epochs of 16 draws, 4 batches each
    weights = row_weights(SamplerConfig(by="structure", power=0.5), base.cache.domain_N, base.cache.present_NS)
    sampler = BalancedSampler(weights, seed=config.seed, epoch_size=16)
    expected = sampler.share(0).tolist() + sampler.share(1)[:8].tolist()
    assert sum(full_task.seen, []) == expected


# ---------------------------------------------------------------- two processes


def test_two_gloo_processes_equal_one_process(tiny_prepared, tiny_tokenizer_run, tmp_path, monkeypatch):
    """torchrun + the CLI: 2 CPU processes (the token cache encoded in two halves, balanced sampler,
    dropout flags of the global batch) train the weights one process trains with the same global batch."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    overrides = ["train.device=cpu", "train.batch_size=8", "train.log_every=1", "sampler.by=domain",
                 "conditioning.drop_rate=0.5", "samples.per_domain=1"]
    sets = [part for override in overrides for part in ("--set", override)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "medaug_cli.app", "train", "var", "--data", str(tiny_prepared), "--tokenizer",
               tiny_tokenizer_run["run_dir"], "--recipe", str(MEDVAR_TINY), "--out", str(tmp_path / "ddp"),
               "--max-steps", "3", *sets, "--json"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert json.loads(finished.stdout)["step"] == 3  # only rank 0 prints its summary

    single = train_var(tiny_prepared, tiny_tokenizer_run["run_dir"], MEDVAR_TINY, tmp_path / "single", max_steps=3,
                       overrides=overrides)
    caches = [np.load(next((tmp_path / name / "token_cache").glob("*/tokens.npy"))) for name in ("ddp", "single")]
    np.testing.assert_array_equal(caches[0], caches[1])  # two encoding processes wrote what one writes
    ddp, reference = load_checkpoint(tmp_path / "ddp", expect_kind="var"), load_checkpoint(Path(single["checkpoint"]))
    assert ddp.meta["world_size"] == 2 and reference.meta["world_size"] == 1
    for ddp_record, single_record in zip(read_log(tmp_path / "ddp"), read_log(tmp_path / "single"), strict=True):
        for key in ("loss", "acc", "cond_drop", "scale_loss/k0", "scale_loss/k6"):
            assert ddp_record[key] == pytest.approx(single_record[key], abs=2e-5), (ddp_record["step"], key)
    for key, value in reference.state_dicts["model"].items():  # measured: 2e-8 apart
        assert torch.allclose(ddp.state_dicts["model"][key], value, rtol=0, atol=1e-5), key
    assert ddp.meta["condition_bank"] == reference.meta["condition_bank"]


# ---------------------------------------------------------------- the generator run


def test_training_lowers_the_loss_and_logs_per_scale_metrics(tiny_var_run):
    records = read_log(Path(tiny_var_run["run_dir"]))
    assert [record["step"] for record in records] == list(range(5, VAR_RUN_STEPS + 1, 5))
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.3, (first["loss"], last["loss"])
    assert {f"scale_acc/k{k}" for k in range(7)} <= set(last) and last["scale_acc/k0"] > first["scale_acc/k0"] - 1e-6
    assert tiny_var_run["token_cache"]["built"] and tiny_var_run["step"] == VAR_RUN_STEPS


def test_generator_checkpoint_records_tokenizer_domains_data_and_condition_bank(tiny_var_run, tiny_tokenizer_run,
                                                                                tiny_prepared):
    run = Path(tiny_var_run["run_dir"])
    meta = load_checkpoint(run, expect_kind="var").meta
    tokenizer_meta = json.loads((Path(tiny_tokenizer_run["checkpoint"]) / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == tokenizer_sha256(Path(tiny_tokenizer_run["checkpoint"]))
    assert (run / meta["tokenizer"]["path"] / "model.safetensors").read_bytes() == \
        (Path(tiny_tokenizer_run["checkpoint"]) / "model.safetensors").read_bytes()
    assert not (run / meta["tokenizer"]["path"] / "trainer.pt").exists()
    names = [record["name"] for record in tokenizer_meta["structure_table"]]
    assert [record["name"] for record in meta["structure_table"]] == names
    assert meta["domains"] == json.loads((tiny_prepared / "domains.json").read_text())
    config = meta["model_config"]
    assert config["patch_sides"] == tokenizer_meta["model_config"]["quantizer"]["patch_sides"]
    assert (config["num_domains"], config["num_structures"], config["depth"]) == (3, len(names), 2)
    frame = read_index(tiny_prepared / "index.parquet").to_pandas()
    train_rows = frame[frame["split"] == "train"]
    assert meta["data"]["index_sha256"] == sha256_file(tiny_prepared / "index.parquet")
    assert meta["data"]["train_groups"] == sorted(train_rows["patient_group"].unique())
    # the bank: per domain, the distinct (present, annotated) sets of the train rows with their counts; a
    # structure is present from conditioning.min_pixels (8) pixels on
    bank = ConditionBank.from_json(meta["condition_bank"])
    for domain, rows in train_rows.groupby("domain"):
        shown = lambda row: [n for n, px in zip(row.structures_present, row.structure_pixels) if px >= 8]  # noqa: E731
        expected = Counter((tuple(sorted(shown(row), key=names.index)),
                            tuple(sorted(row.structures_annotated, key=names.index))) for row in rows.itertuples())
        found = {(tuple(bank.names(c.present)), tuple(bank.names(c.annotated))): c.count for c in bank.domains[domain]}
        assert found == dict(expected), domain
    assert meta["samples"]["png"] == str(run / "samples.png")


def test_generator_reproduces_its_samples_from_the_run_folder_alone(tiny_var_run, tmp_path):
    run = Path(tiny_var_run["run_dir"])
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("token_cache"))
    meta_path = latest_checkpoint(moved) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"]["prepared"] = str(tmp_path / "deleted")  # nothing may read the prepared data
    meta_path.write_text(json.dumps(meta))
    var, vqvae, loaded = load_generator(moved)
    recorded = json.loads((run / "samples.json").read_text())
    picture = read_png(run / "samples.png")
    assert len(recorded["samples"]) == 3 * 2 and picture.shape == (3 * (128 + 14), 2 * 2 * 128, 3)
    again = write_samples(var, vqvae, loaded, SampleGridConfig(**recorded["settings"]), tmp_path / "again")
    assert again["samples"] == recorded["samples"]  # same domains, seeds, conditions, and token hashes
    assert np.array_equal(read_png(tmp_path / "again" / "samples.png"), picture)
    # the first sample straight from the sampler with its seed and condition
    first, bank = recorded["samples"][0], ConditionBank.from_json(loaded["condition_bank"])
    present = torch.tensor([[name in first["present"] for name in bank.structures]])
    annotated = torch.tensor([[name in first["annotated"] for name in bank.structures]])
    domain = torch.tensor([loaded["domain_names"].index(first["domain"])])
    settings = recorded["settings"]
    indices = sample_tokens(var, vqvae.quantizer, domain, present, annotated, generators=generators_from_seeds([first["seed"]]),
                            cfg=settings["cfg"], top_k=settings["top_k"], top_p=settings["top_p"],
                            temperature=settings["temperature"])
    tokens = vqvae.quantizer.indices_to_tokens(indices)[0].numpy().astype(np.int64)
    assert hashlib.sha256(tokens.tobytes()).hexdigest() == first["tokens_sha256"]


def test_generator_refuses_a_tokenizer_copy_that_was_changed(tiny_var_run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(Path(tiny_var_run["run_dir"]), moved, ignore=shutil.ignore_patterns("token_cache"))
    tokenizer_meta = moved / "tokenizer" / "meta.json"
    meta = json.loads(tokenizer_meta.read_text())
    meta["model_config"]["quantizer"]["phi_ratio"] = 0.25  # same weights, other decoding: another tokenizer
    tokenizer_meta.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="content hash"):
        load_generator(moved)
    with pytest.raises(ConfigError, match="holds tokenizer"):  # the run folder keeps its own tokenizer
        copy_tokenizer(Path(tiny_var_run["run_dir"]) / "tokenizer", moved)
