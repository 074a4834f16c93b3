"""Engine tests: schedules, EMA, parameter groups, exact resume after a kill, max_minutes, logs and progress."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from medaug.errors import ConfigError
from medaug.train.checkpoint import latest_checkpoint, load_checkpoint
from medaug.train.ema import ModelEMA
from medaug.train.engine import OptimConfig, TrainConfig, param_groups, train, unwrap
from medaug.train.schedule import lr_at
from tests.train.toy import N_SAMPLES, ToyNet, ToyTask

# ----------------------------------------------------------------------------------------- schedules

# lr 1.0, 4 warm-up steps, 14 steps: decay runs over steps 4..13 (9 intervals), min lr 0.1
SCHEDULE_CASES = [
    ("cosine", 0, 0.25), ("cosine", 1, 0.5), ("cosine", 3, 1.0), ("cosine", 4, 1.0),
    ("cosine", 7, 0.1 + 0.9 * 0.5 * (1 + 0.5)),   # progress 1/3: cos(pi/3) = 0.5
    ("cosine", 10, 0.1 + 0.9 * 0.5 * (1 - 0.5)),  # progress 2/3: cos(2pi/3) = -0.5
    ("cosine", 13, 0.1), ("cosine", 50, 0.1),
    ("linear", 0, 0.25), ("linear", 4, 1.0), ("linear", 7, 0.7), ("linear", 10, 0.4), ("linear", 13, 0.1),
    ("constant", 0, 0.25), ("constant", 7, 1.0), ("constant", 13, 1.0),
]


@pytest.mark.parametrize("schedule,step,expected", SCHEDULE_CASES,
                         ids=[f"{schedule}-step{step}" for schedule, step, _ in SCHEDULE_CASES])
def test_lr_at_matches_hand_computed_values(schedule: str, step: int, expected: float) -> None:
    config = OptimConfig(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    assert lr_at(step, config, max_steps=14) == pytest.approx(expected, abs=1e-12)


def test_lr_without_warmup_starts_at_lr_and_ends_at_min() -> None:
    config = OptimConfig(lr=2.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    values = [lr_at(step, config, max_steps=3) for step in range(3)]
    assert values == pytest.approx([2.0, 0.2 + 1.8 * 0.5, 0.2])


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_is_the_exponential_average_and_copies_buffers() -> None:
    module = nn.BatchNorm1d(3)  # a weight, a bias and running-statistics buffers
    snapshots = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([0.25, 4.0, 2.0])]
    with torch.no_grad():
        module.weight.copy_(snapshots[0])
    ema = ModelEMA(module, decay=0.75)
    for values in snapshots[1:]:
        with torch.no_grad():
            module.weight.copy_(values)
            module.running_mean.add_(1.0)
        ema.update(module)
    expected = 0.75 * (0.75 * snapshots[0] + 0.25 * snapshots[1]) + 0.25 * snapshots[2]
    assert torch.allclose(ema.state_dict()["weight"], expected, atol=1e-6)
    assert torch.equal(ema.state_dict()["running_mean"], torch.full((3,), 2.0))
    assert set(ema.state_dict()) == set(module.state_dict())


def test_ema_shadow_is_float32_and_round_trips() -> None:
    module = nn.Linear(4, 2).to(torch.bfloat16)
    ema = ModelEMA(module, decay=0.5)
    assert all(value.dtype == torch.float32 for value in ema.shadow.values())
    state = {key: value + 1 for key, value in ema.state_dict().items()}
    ema.load_state_dict(state)
    assert all(torch.equal(ema.state_dict()[key], state[key]) for key in state)
    with pytest.raises(KeyError, match="missing"):
        ema.load_state_dict({"weight": state["weight"]})


# ---------------------------------------------------------------------------------- parameter groups


def test_param_groups_decay_only_matrices_not_listed() -> None:
    net = ToyNet()
    frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)
    net.register_parameter("frozen", frozen)
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert {id(p) for p in decay["params"]} == {id(net.inp.weight), id(net.out.weight)}
    expected_no_decay = [net.inp.bias, net.norm.weight, net.norm.bias, net.out.bias, net.offset]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected_no_decay}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


# ---------------------------------------------------------------------------------- training runs


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        max_steps=12, batch_size=8, num_workers=0, ema_decay=0.9, checkpoint_every=4, log_every=2, seed=3,
        device="cpu", optim={"net": OptimConfig(lr=1e-2, warmup_steps=2), "aux": OptimConfig(lr=5e-3, schedule="linear")},
    )
    values.update(overrides)
    return TrainConfig(**values)


def _expected_order(seed: int, steps: int, batch_size: int) -> list[list[int]]:
    """The batches DistributedSampler documents: epoch e is randperm(n) drawn with seed + e, cut into batches."""
    per_epoch = N_SAMPLES // batch_size
    order = []
    for epoch in range(math.ceil(steps / per_epoch)):
        permutation = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        order += [permutation[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return order[:steps]


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-identical nested state (tensors with torch.equal, everything else with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("num_workers", [0, 2], ids=["main-process", "2-workers"])
def test_resume_after_kill_is_bit_identical_to_uninterrupted_run(tmp_path: Path, num_workers: int) -> None:
    config = _config(num_workers=num_workers)
    straight = ToyTask()
    result = train(straight, config, tmp_path / "straight")

    killed = ToyTask(fail_at_step=11)  # checkpoints at 4 and 8, logs up to step 10, dies in step 11
    with pytest.raises(RuntimeError, match="killed at step 11"):
        train(killed, config, tmp_path / "resumed")
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000008"
    resumed = ToyTask()
    resumed_result = train(resumed, config, tmp_path / "resumed", resume=True)

    assert (result.step, resumed_result.step, result.stopped_by) == (12, 12, "max_steps")
    expected_order = _expected_order(seed=3, steps=12, batch_size=8)
    assert straight.seen == expected_order
    assert killed.seen[:8] + resumed.seen == expected_order
    a, b = load_checkpoint(result.checkpoint_path), load_checkpoint(resumed_result.checkpoint_path)
    assert set(a.state_dicts) == {"model", "aux", "ema"}
    _assert_same(a.state_dicts, b.state_dicts, "weights")
    _assert_same(a.trainer_state, b.trainer_state, "trainer")  # optimizers, schedules, RNG, data position
    assert a.trainer_state["data_position"] == {"epoch": 2, "batch": 2}  # 12 steps of 5 batches per epoch
    initial = ToyNet()
    assert not torch.equal(a.state_dicts["model"]["inp.weight"], initial.inp.weight)  # it did train
    logged = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10, 12]  # the killed run's step-10 record was dropped on resume


def test_resume_without_restored_rng_would_differ(tmp_path: Path) -> None:
    """Guard for the test above: the toy task's noise makes runs depend on the RNG state."""
    first = train(ToyTask(), _config(max_steps=4, seed=3), tmp_path / "a")
    second = train(ToyTask(), _config(max_steps=4, seed=4), tmp_path / "b")
    weights_a = load_checkpoint(first.checkpoint_path).state_dicts["model"]["inp.weight"]
    weights_b = load_checkpoint(second.checkpoint_path).state_dicts["model"]["inp.weight"]
    assert not torch.equal(weights_a, weights_b)


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path: Path) -> None:
    config = _config(max_steps=1000, max_minutes=0.3 / 60, checkpoint_every=1000, log_every=1000)
    result = train(ToyTask(sleep_s=0.05), config, tmp_path)
    assert result.stopped_by == "max_minutes"
    assert 1 <= result.step < 50
    assert result.checkpoint_path == latest_checkpoint(tmp_path)
    checkpoint = load_checkpoint(result.checkpoint_path, expect_kind="toy")
    assert checkpoint.step == checkpoint.trainer_state["step"] == result.step
    assert "loss" in result.metrics  # the stop forced a final log record


def test_short_run_logs_progress_and_prunes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[int, int]] = []
    task = ToyTask(noise=False)
    config = _config(max_steps=5, log_every=2, checkpoint_every=1, keep_last=2)
    with caplog.at_level(logging.INFO):
        result = train(task, config, tmp_path, progress=lambda step, total, metrics: calls.append((step, total)))
    assert calls == [(step, 5) for step in range(1, 6)]
    assert task.after_steps == [0, 1, 2, 3, 4]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 5]
    net_config = config.optim["net"]
    assert [record["lr/net"] for record in records] == pytest.approx([lr_at(s - 1, net_config, 5) for s in (2, 4, 5)])
    assert result.metrics["lr/net"] == records[-1]["lr/net"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("step_*")) == ["step_000004", "step_000005"]
    meta = load_checkpoint(tmp_path).meta
    assert meta["model_config"] == {"dim": 6, "hidden": 16}
    assert meta["train_config"]["optim"]["net"]["lr"] == 1e-2
    assert meta["modules"] == {"model": "net", "aux": "aux"}
    assert json.loads((tmp_path / "train_config.json").read_text())["keep_last"] == 2
    if importlib.util.find_spec("tensorboard") is None:
        assert any("TensorBoard logging off" in record.getMessage() for record in caplog.records)
    else:
        assert (tmp_path / "tensorboard").is_dir()


def test_run_folder_with_checkpoints_needs_resume(tmp_path: Path) -> None:
    train(ToyTask(), _config(max_steps=2), tmp_path)
    with pytest.raises(ConfigError, match="resume"):
        train(ToyTask(), _config(max_steps=4), tmp_path)
    result = train(ToyTask(), _config(max_steps=2), tmp_path, resume=True)  # already done: nothing to train
    assert (result.step, result.checkpoint_path.name) == (2, "step_000002")


@pytest.mark.parametrize("overrides,field", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 64}, "batch_size"),           # larger than the 40-sample dataset
    ({"optim": {"nope": OptimConfig()}}, "optim.nope"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"keep_last": 0}, "keep_last"),
], ids=["zero-batch", "batch-over-dataset", "unknown-module", "ema-decay-1", "keep-none"])
def test_bad_config_names_the_field(tmp_path: Path, overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        train(ToyTask(), _config(**overrides), tmp_path)
    assert str(error.value).startswith(field) and "expected" in str(error.value)


def test_update_of_unknown_module_is_refused(tmp_path: Path) -> None:
    class WrongName(ToyTask):
        def training_step(self, modules, batch, step, update):
            update("netz", modules["net"](batch["x"]).mean())
            return {}

    with pytest.raises(ConfigError, match=r"update\('netz'\).*expected one of net, aux"):
        train(WrongName(), _config(max_steps=1), tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_unwrap_returns_the_module_inside_compile() -> None:
    net = ToyNet()
    compiled = torch.compile(net)  # compiles lazily, on the first call: free here
    assert compiled is not net and unwrap(compiled) is net and unwrap(net) is net
