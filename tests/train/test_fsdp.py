"""FSDP2 through the engine (2 gloo processes under torchrun), checkpoints that load anywhere, and the
speed paths (per-block compile, activation checkpointing) computing what the eager model computes.

Run as a script under torchrun, this file is the worker: it trains :class:`TinyVarTask` into a run folder
(``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/test_fsdp.py RUN CONFIG_JSON
[resume]``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make medaug and tests importable
    sys.path.insert(0, str(REPO))

from medaug.config.base import from_dict, to_dict  # noqa: E402
from medaug.models.var import VAR, VARConfig  # noqa: E402
from medaug.train import engine  # noqa: E402
from medaug.errors import CheckpointError  # noqa: E402
from medaug.train.checkpoint import (  # noqa: E402
    load_checkpoint,
    load_module_weights,
    load_optimizer_state_dict,
    optimizer_state_dict,
)
from medaug.train.engine import TrainConfig, train  # noqa: E402
from tests.train.torchrun import run_torchrun  # noqa: E402

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# 3 scales (14 tokens), 3 blocks of width 48: odd sizes, so FSDP2 shards unevenly (dim 0 of 3·48 over 2 ranks...)
MODEL = VARConfig(depth=3, width=48, heads=2, patch_sides=(1, 2, 3), codebook_size=40, latent_dim=6, num_domains=2,
                  num_structures=3, drop_path_rate=0.0, attn_impl="sdpa")
ROWS = 24
# a constant learning rate after one warm-up step: runs of 4 and 5 steps see the same rates
BASE_CONFIG: dict[str, Any] = {"batch_size": 8, "num_workers": 0, "checkpoint_every": 100, "log_every": 1, "seed": 3,
                               "device": "cpu", "ema_decay": 0.5,
                               "optim": {"var": {"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5,
                                                 "schedule": "constant"}}}


class TokenRows(Dataset):
    """``ROWS`` fixed random rows: teacher inputs (L - 1, latent) float32, tokens (L,), domain, present, annotated."""

    def __init__(self, config: VARConfig = MODEL, seed: int = 11):
        generator = torch.Generator().manual_seed(seed)
        length = config.total_tokens
        self.x_NLC = torch.randn(ROWS, length - 1, config.latent_dim, generator=generator)
        self.tokens_NL = torch.randint(0, config.codebook_size, (ROWS, length), generator=generator)
        self.domain_N = torch.randint(0, config.num_domains, (ROWS,), generator=generator)
        self.present_NS = torch.rand(ROWS, config.num_structures, generator=generator) < 0.5

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return {"x": self.x_NLC[row], "tokens": self.tokens_NL[row], "domain": self.domain_N[row],
                "present": self.present_NS[row], "annotated": torch.ones_like(self.present_NS[row])}


class TinyVarTask:
    """The VAR transformer with its real blocks on fixed random rows: cross-entropy over all tokens."""

    name = "var"

    def build_modules(self) -> dict[str, nn.Module]:
        return {"var": VAR(MODEL)}

    def train_dataset(self) -> Dataset:
        return TokenRows()

    def training_step(self, modules: dict[str, nn.Module], batch: dict[str, Any], step: int, update) -> dict[str, Any]:
        drop_B = torch.zeros(batch["tokens"].shape[0], dtype=torch.bool)
        logits_BLV = modules["var"](batch["x"], batch["domain"], batch["present"], batch["annotated"], drop_B)
        loss = F.cross_entropy(logits_BLV.flatten(0, 1), batch["tokens"].flatten())
        update("var", loss)
        return {"loss": loss.detach()}

    def metadata(self) -> dict[str, Any]:
        return {"model_config": to_dict(MODEL)}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _config(**changes: Any) -> TrainConfig:
    data = {**BASE_CONFIG, **changes}
    return from_dict(TrainConfig, data, "config")


def _torchrun(run_dir: Path, config: dict[str, Any], resume: bool = False, processes: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(Path(__file__)), str(run_dir), json.dumps(config), "resume" if resume else "fresh"]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    finished = run_torchrun(command, fresh_dir=None if resume else run_dir, env=environment, cwd=REPO, timeout=240)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


def _assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    assert set(actual) == set(expected), f"{where}: keys differ"
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value.double(), rtol=0, atol=2e-5, msg=f"{where}.{key}")


def _exp_avg(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Adam's first moments by parameter name from a checkpoint's trainer state."""
    state = checkpoint.trainer_state["optimizers"]["var"]["state"]
    return {name: entry["exp_avg"] for name, entry in state.items()}


def _logits(model: VAR, rows: TokenRows) -> torch.Tensor:
    """Eval-mode logits (4, L, V) of the first four rows."""
    annotated_BS = torch.ones(4, MODEL.num_structures, dtype=torch.bool)
    with torch.no_grad():
        return model.eval()(rows.x_NLC[:4], rows.domain_N[:4], rows.present_NS[:4], annotated_BS,
                            torch.zeros(4, dtype=torch.bool))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five steps in one process without FSDP (the reference), checkpoints at steps 2, 4 and 5."""
    for name in TORCHRUN_ENV:
        os.environ.pop(name, None)
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    train(TinyVarTask(), _config(max_steps=5, checkpoint_every=2, keep_last=5), run_dir)
    return run_dir


# ---------------------------------------------------------------------------------------------- tests


def test_fsdp_on_two_processes_trains_like_one_process_and_its_checkpoint_loads_on_the_cpu(
        plain_run: Path, tmp_path: Path, plain_process: None) -> None:
    run_dir = tmp_path / "fsdp"
    _torchrun(run_dir, {**BASE_CONFIG, "max_steps": 4, "fsdp": True, "activation_checkpointing": 0.5})
    sharded = load_checkpoint(run_dir, expect_kind="var")
    reference = load_checkpoint(plain_run / "checkpoints" / "step_000004")
    assert sharded.step == reference.step == 4 and sharded.meta["world_size"] == 2
    # full (gathered) tensors with the plain model's keys and shapes, and the same values after 4 updates
    _assert_states_close(sharded.state_dicts["model"], reference.state_dicts["model"], "model")
    _assert_states_close(sharded.state_dicts["ema"], reference.state_dicts["ema"], "ema")
    _assert_states_close(_exp_avg(sharded), _exp_avg(reference), "exp_avg")
    # a plain single-process model on the CPU takes the FSDP checkpoint and gives the reference logits
    loaded, expected = VAR(MODEL), VAR(MODEL)
    load_module_weights(loaded, sharded)
    load_module_weights(expected, reference)
    rows = TokenRows()
    torch.testing.assert_close(_logits(loaded, rows), _logits(expected, rows), rtol=0, atol=1e-4)
    engine.seed_everything(BASE_CONFIG["seed"])  # the engine's initial weights: the run moved away from them
    assert not torch.allclose(_logits(loaded, rows), _logits(VAR(MODEL), rows), atol=1e-3)


# VAR's head returns a view on the CPU in float32 (.float() is a no-op there); nothing writes into it in place
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_resume_on_another_number_of_processes_and_sharding(plain_run: Path, tmp_path: Path,
                                                            plain_process: None) -> None:
    # the plain run's step-2 checkpoint (whole tensors, optimizer state by parameter name) resumed by 2 FSDP2
    # processes to step 4
    run_dir = tmp_path / "resumed"
    shutil.copytree(plain_run / "checkpoints" / "step_000002", run_dir / "checkpoints" / "step_000002")
    (run_dir / "checkpoints" / "latest").write_text("step_000002\n")
    _torchrun(run_dir, {**BASE_CONFIG, "max_steps": 4, "fsdp": True}, resume=True)
    resumed = load_checkpoint(run_dir / "checkpoints" / "step_000004")
    reference = load_checkpoint(plain_run / "checkpoints" / "step_000004")
    _assert_states_close(resumed.state_dicts["model"], reference.state_dicts["model"], "model")
    _assert_states_close(resumed.state_dicts["ema"], reference.state_dicts["ema"], "ema")
    _assert_states_close(_exp_avg(resumed), _exp_avg(reference), "exp_avg")
    # and back: FSDP2 in one process (its own one-rank group) resumes the 2-process FSDP2 checkpoint
    single = train(TinyVarTask(), _config(max_steps=5, fsdp=True), run_dir, resume=True)
    assert single.step == 5 and load_checkpoint(run_dir).meta["world_size"] == 1
    _assert_states_close(load_checkpoint(single.checkpoint_path).state_dicts["model"],
                         load_checkpoint(plain_run).state_dicts["model"], "model at step 5")


def test_compiled_recomputed_fused_paths_train_like_the_eager_model(tmp_path: Path, plain_process: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    # aot_eager: the real Dynamo capture and AOT autograd of each block, without the C++ build of inductor
    # (minutes on 2 cores); the generated kernels' numerics are PyTorch's to test
    monkeypatch.setattr(engine, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.reset()
    counters.clear()
    eager = train(TinyVarTask(), _config(max_steps=3, ema_decay=None), tmp_path / "eager")
    fused = {"var": {**BASE_CONFIG["optim"]["var"], "fused": True}}  # the fused AdamW kernel (CPU has one too)
    fast = train(TinyVarTask(), _config(max_steps=3, ema_decay=None, compile=True, activation_checkpointing=1.0,
                                        optim=fused), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] == 1  # every block (different drop rates too) shares one graph
    torch._dynamo.reset()
    assert fast.metrics["loss"] == pytest.approx(eager.metrics["loss"], abs=1e-5)
    _assert_states_close(load_checkpoint(fast.checkpoint_path).state_dicts["model"],
                         load_checkpoint(eager.checkpoint_path).state_dicts["model"], "model")


def test_checkpointed_blocks_are_spread_and_keep_parameter_names() -> None:
    model = VAR(MODEL.__class__(**{**to_dict(MODEL), "depth": 8}))
    names = [name for name, _ in model.named_parameters()]
    assert engine.checkpoint_blocks(model, 0.5) == [0, 2, 4, 6]
    assert engine.checkpoint_blocks(VAR(MODEL), 0.0) == []
    assert [name for name, _ in model.named_parameters()] == names
    with pytest.raises(Exception, match="activation_checkpointing"):
        _config(activation_checkpointing=1.5)
    with pytest.raises(Exception, match="compile_scope"):
        _config(fsdp=True, compile=True, compile_scope="model")


def test_optimizer_state_by_name_round_trips_and_old_index_keyed_states_still_load() -> None:
    model = VAR(MODEL)
    optimizer = engine.build_optimizer(model, engine.OptimConfig(lr=1e-2), torch.device("cpu"))
    rows = TokenRows()
    logits = model(rows.x_NLC[:2], rows.domain_N[:2], rows.present_NS[:2], torch.ones(2, 3, dtype=torch.bool),
                   torch.zeros(2, dtype=torch.bool))
    logits.square().mean().backward()
    optimizer.step()
    by_name = optimizer_state_dict(model, optimizer)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(by_name["state"]) == sorted(names)  # every parameter stepped, keyed by its name
    torch.testing.assert_close(by_name["state"]["head.weight"]["exp_avg"],
                               optimizer.state[model.head.weight]["exp_avg"], rtol=0, atol=0)
    for state in (by_name, optimizer.state_dict()):  # by name, and index-keyed as earlier checkpoints hold
        fresh = engine.build_optimizer(model, engine.OptimConfig(lr=1e-2), torch.device("cpu"))
        load_optimizer_state_dict(model, fresh, state)
        torch.testing.assert_close(fresh.state[model.blocks[1].ffn.fc1.weight]["exp_avg_sq"],
                                   optimizer.state[model.blocks[1].ffn.fc1.weight]["exp_avg_sq"], rtol=0, atol=0)
    renamed = {**by_name, "state": {("x." + key if key == "head.bias" else key): value
                                    for key, value in by_name["state"].items()}}
    renamed["param_groups"] = [{**group, "params": ["x.head.bias" if name == "head.bias" else name
                                                    for name in group["params"]]} for group in by_name["param_groups"]]
    with pytest.raises(CheckpointError, match=r"trainer.pt: optimizer parameters differ: missing \['head.bias'\]"):
        load_optimizer_state_dict(model, optimizer, renamed)


# ---------------------------------------------------------------------------------------------- worker


def _main(run_dir: Path, config_json: str, mode: str) -> None:
    from medaug.train.distributed import setup, teardown

    torch.set_num_threads(1)
    config = from_dict(TrainConfig, json.loads(config_json), "config")
    info = setup(config.device, process_group=True)
    try:
        train(TinyVarTask(), config, run_dir, resume=mode == "resume")
    finally:
        teardown(info)


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
