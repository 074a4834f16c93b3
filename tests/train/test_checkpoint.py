"""Checkpoint format tests: round trip, hashes, refusal of tampered or foreign checkpoints, pruning, RNG states."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medaug.errors import CheckpointError
from medaug.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_module_weights,
    save_checkpoint,
    update_checkpoint_meta,
)
from medaug.train.engine import OptimConfig, TrainConfig, train
from tests.train.toy import ToyNet, ToyTask


class Payload:
    """Unpickling this would create a file: a stand-in for code execution from a hostile trainer.pt."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _save_toy(checkpoints_dir: Path, step: int = 7, keep_last: int | None = 3) -> tuple[Path, ToyNet]:
    torch.manual_seed(step)
    net = ToyNet()
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    path = save_checkpoint(checkpoints_dir, step, "toy", {"model": net.state_dict(), "ema": net.state_dict()},
                           {"step": step, "optimizers": {"net": optimizer.state_dict()}},
                           {"model_config": {"dim": 6, "hidden": 16}}, keep_last=keep_last)
    return path, net


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_meta(folder: Path, **changes: Any) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_round_trip_and_recorded_hashes(tmp_path: Path) -> None:
    path, net = _save_toy(tmp_path / "checkpoints")
    assert path == tmp_path / "checkpoints" / "step_000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"
    checkpoint = load_checkpoint(path, expect_kind="toy", expect={"model_config": {"dim": 6, "hidden": 16}})
    meta = checkpoint.meta
    assert (meta["format"], meta["schema_version"], meta["kind"], meta["step"]) == ("medaug-checkpoint", 1, "toy", 7)
    assert meta["files"] == {name: _sha256(path / name) for name in ("model.safetensors", "ema.safetensors", "trainer.pt")}
    for key, value in net.state_dict().items():
        assert torch.equal(checkpoint.state_dicts["model"][key], value)
    fresh = ToyNet()
    load_module_weights(fresh, checkpoint)
    assert torch.equal(fresh.inp.weight, net.inp.weight) and int(fresh.calls) == 1
    position = [name for name, _ in net.named_parameters()].index("inp.weight")
    exp_avg = checkpoint.trainer_state["optimizers"]["net"]["state"][position]["exp_avg"]  # after one step
    assert torch.allclose(exp_avg, 0.1 * net.inp.weight.grad)  # (1 - beta1) * gradient
    assert load_checkpoint(tmp_path).path == path  # a run folder resolves to its latest checkpoint


def test_engine_trainer_file_loads_weights_only(tmp_path: Path) -> None:
    config = TrainConfig(max_steps=2, batch_size=8, num_workers=0, ema_decay=0.5, device="cpu",
                         optim={"net": OptimConfig(lr=1e-2)})
    result = train(ToyTask(), config, tmp_path)
    state = torch.load(result.checkpoint_path / "trainer.pt", weights_only=True)  # raises if anything needs unpickling
    assert state["step"] == 2 and set(state["optimizers"]) == {"net", "aux"}
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert state["data_position"] == {"epoch": 0, "batch": 2}


TAMPERING = {
    "flipped-byte": ("model.safetensors", "sha256"),
    "kind": ("kind", "'tokenizer'"),
    "schema-version": ("schema_version", "expected 1"),
    "format": ("format", "medaug-checkpoint"),
    "missing-file": ("ema.safetensors", "missing"),
    "model-config": ("model_config.hidden", "expected 32"),
}


def _tamper(folder: Path, case: str) -> None:
    if case == "flipped-byte":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif case == "kind":
        _edit_meta(folder, kind="var")
    elif case == "schema-version":
        _edit_meta(folder, schema_version=2)
    elif case == "format":
        _edit_meta(folder, format="something-else")
    elif case == "missing-file":
        (folder / "ema.safetensors").unlink()


@pytest.mark.parametrize("case", list(TAMPERING), ids=list(TAMPERING))
def test_tampered_checkpoint_is_refused_naming_the_cause(tmp_path: Path, case: str) -> None:
    path, _ = _save_toy(tmp_path / "checkpoints")
    _tamper(path, case)
    expect_kind = "tokenizer" if case == "kind" else "toy"
    expect = {"model_config": {"dim": 6, "hidden": 32 if case == "model-config" else 16}}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, expect_kind=expect_kind, expect=expect)
    message = str(error.value)
    where, detail = TAMPERING[case]
    assert where in message and detail in message and "\n" not in message


def test_trainer_file_needing_unpickling_is_refused_without_running_it(tmp_path: Path) -> None:
    path, _ = _save_toy(tmp_path / "checkpoints")
    marker = tmp_path / "payload-ran"
    torch.save({"step": 7, "payload": Payload(marker)}, path / "trainer.pt")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["trainer.pt"] = _sha256(path / "trainer.pt")  # a consistent but hostile checkpoint
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"trainer\.pt: refused by torch.load\(weights_only=True\)"):
        load_checkpoint(path)
    assert not marker.exists()
    assert load_checkpoint(path, trainer=False).trainer_state is None  # weights alone still load


def test_module_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    path, _ = _save_toy(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shape of .*inp\.weight \(16, 6\) vs model \(32, 6\)"):
        load_module_weights(ToyNet(hidden=32), path)
    with pytest.raises(CheckpointError, match="discriminator.safetensors: not in the checkpoint"):
        load_module_weights(ToyNet(), path, name="discriminator")


def test_keep_last_and_latest_fallback(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save_toy(checkpoints, step=step, keep_last=2)
    stale = checkpoints / ".part-step_000005-999"
    stale.mkdir()
    _save_toy(checkpoints, step=5, keep_last=2)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_000004", "step_000005"]
    (checkpoints / "latest").unlink()  # as after a kill between the folder rename and the pointer update
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000005"


def test_update_meta_keeps_the_checkpoint_valid(tmp_path: Path) -> None:
    path, _ = _save_toy(tmp_path / "checkpoints")
    update_checkpoint_meta(path, {"evaluation": {"dice": 0.9}})
    assert load_checkpoint(path).meta["evaluation"] == {"dice": 0.9}
    with pytest.raises(CheckpointError, match="'files' is the engine's"):
        update_checkpoint_meta(path, {"files": {}})


def test_rng_state_round_trip_restores_every_generator() -> None:
    from medaug.train.checkpoint import restore_rng_state

    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator state
    np.random.standard_normal()
    state = capture_rng_state(torch.device("cpu"))
    first = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    restore_rng_state(state, torch.device("cpu"))
    second = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert first == second
    assert all(isinstance(value, torch.Tensor) for value in state.values())
