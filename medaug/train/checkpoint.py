"""The one checkpoint format for every medaug model: safetensors weights, JSON metadata, a weights-only trainer file.

A checkpoint is a folder ``run_dir/checkpoints/step_000123/``:

* ``model.safetensors``: the main module's state dict (unwrapped, uncompiled); other trained modules as
  ``<name>.safetensors``; ``ema.safetensors`` (the main module's EMA, same keys) when EMA is on;
* ``trainer.pt``: optimizer states, schedule state, RNG states (as tensors), data position and step,
  readable with ``torch.load(weights_only=True)``;
* ``meta.json``: ``{"format": "medaug-checkpoint", "schema_version": 1, "kind", "step",
  "medaug_version", "created_at", "files": {name: sha256}, ...}`` plus the caller's metadata (train
  config, model config, domains, vocabulary...).

It is written under a temporary name and renamed; ``checkpoints/latest`` (a text file naming the newest
complete folder) is updated last, so a kill at any moment leaves the previous checkpoint usable.
Loading verifies format, schema version, kind and every file's sha256 before reading anything, and
never unpickles: safetensors for weights, ``weights_only=True`` for the trainer file.

Sharded training (FSDP2) saves the same files: :func:`module_state_dict` gathers the full weights onto
rank 0's CPU, and :func:`optimizer_state_dict` stores optimizer states by parameter name, whole (not per
shard). So a checkpoint does not depend on how it was trained: it loads into a plain module on the CPU
(sampling), into DDP or FSDP2 runs on any number of GPUs (:func:`load_module_weights` and
:func:`load_optimizer_state_dict` shard it again), and a run can resume on another number of GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medaug.errors import CheckpointError
from medaug.io.atomic import PART_PREFIX, atomic_output
from medaug.train.distributed import is_sharded

log = logging.getLogger(__name__)

FORMAT = "medaug-checkpoint"
SCHEMA_VERSION = 1
META_FILE = "meta.json"
TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIR = "checkpoints"
ENGINE_KEYS = ("format", "schema_version", "kind", "step", "medaug_version", "created_at", "files")
RESERVED_STEMS = ("meta", "trainer")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: ``meta`` (meta.json), ``state_dicts`` by file stem ("model", "ema", other
    module names) on the CPU, and ``trainer_state`` (None when not loaded or not present)."""

    path: Path
    meta: dict[str, Any]
    state_dicts: dict[str, dict[str, Tensor]]
    trainer_state: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    """``step_000123``: the folder name of the checkpoint taken after ``step`` updates."""
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------- saving


def _saveable(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliases such as tied weights)."""
    result, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(where, f"state key {key!r} is a {type(value).__name__}; expected tensors only")
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if is_dataclass(value) and not isinstance(value, type):
        from medaug.config.base import to_dict

        return to_dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON (:func:`to_json_text`) to ``path`` atomically (temporary name, rename)."""
    from medaug.io.atomic import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        temporary.write_text(to_json_text(payload, str(path)))


def to_json_text(data: Any, where: str) -> str:
    """JSON text of ``data`` (Paths, NumPy values and config dataclasses converted); CheckpointError if impossible."""
    try:
        return json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(where, f"metadata is not JSON ({error}); expected plain data") from None


def _write_files(folder: Path, state_dicts: dict[str, dict[str, Tensor]],
                 trainer_state: dict[str, Any] | None) -> dict[str, str]:
    """Write the weight files and trainer.pt into ``folder``; returns {file name: sha256}."""
    files = {}
    for stem, state in state_dicts.items():
        if stem in RESERVED_STEMS:
            raise CheckpointError(f"{stem}.safetensors", f"{stem!r} is reserved; expected another module name")
        name = f"{stem}.safetensors"
        save_file(_saveable(state, name), str(folder / name), metadata={"format": "pt"})
        files[name] = sha256_file(folder / name)
    if trainer_state is not None:
        torch.save(trainer_state, folder / TRAINER_FILE)
        files[TRAINER_FILE] = sha256_file(folder / TRAINER_FILE)
    return files


def _build_meta(kind: str, step: int, files: dict[str, str], metadata: dict[str, Any]) -> dict[str, Any]:
    from medaug import __version__

    clashes = [key for key in metadata if key in ENGINE_KEYS]
    if clashes:
        raise CheckpointError(META_FILE, f"metadata key {clashes[0]!r} is the engine's; expected other keys")
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": kind, "step": step,
            "medaug_version": __version__, "created_at": created_at, "files": files, **metadata}


def _replace_folder(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` to ``final``; an existing ``final`` (a re-run of the same step) goes first."""
    if final.exists():
        stale = final.with_name(f"{PART_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale)
        return
    os.replace(temporary, final)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    kind: str,
    state_dicts: dict[str, dict[str, Tensor]],
    trainer_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write ``checkpoints_dir/step_<step>/`` atomically, point ``latest`` at it, keep the last ``keep_last``.

    ``state_dicts``: by file stem ("model" for the main module, "ema", other module names).
    ``trainer_state``: plain data and tensors only (it must load with ``weights_only=True``).
    ``metadata``: JSON-able keys added to meta.json (may not reuse the engine's keys).
    Returns the final folder. Call on one rank only.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    temporary = checkpoints_dir / f"{PART_PREFIX}{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        files = _write_files(temporary, state_dicts, trainer_state)
        meta = _build_meta(kind, step, files, metadata or {})
        (temporary / META_FILE).write_text(to_json_text(meta, str(final / META_FILE)))
        _replace_folder(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    with atomic_output(checkpoints_dir / LATEST_FILE) as latest:
        latest.write_text(final.name + "\n")
    if keep_last is not None:
        prune_checkpoints(checkpoints_dir, keep_last)
    log.info("checkpoint %s written", final)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders (``step_*`` with a meta.json), oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names) and stale temporaries."""
    latest = latest_checkpoint(checkpoints_dir.parent)
    complete = list_checkpoints(checkpoints_dir)
    removed = [path for path in complete[: max(len(complete) - keep_last, 0)] if path != latest]
    removed += [path for path in checkpoints_dir.glob(f"{PART_PREFIX}*") if path.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (``run_dir/checkpoints/latest``), or None if there is none.

    When ``latest`` is absent (a kill between the folder rename and its update) the highest complete
    ``step_*`` folder is used.
    """
    checkpoints_dir = Path(run_dir) / CHECKPOINTS_DIR
    pointer = checkpoints_dir / LATEST_FILE
    if pointer.is_file():
        path = checkpoints_dir / pointer.read_text().strip()
        if not (path / META_FILE).is_file():
            raise CheckpointError(pointer, f"names {path.name!r}, which has no {META_FILE}; "
                                           "expected a complete checkpoint folder")
        return path
    complete = list_checkpoints(checkpoints_dir)
    return complete[-1] if complete else None


def update_checkpoint_meta(path: Path, updates: dict[str, Any]) -> None:
    """Add or replace keys of a checkpoint's meta.json (e.g. evaluation results), atomically.

    The engine's own keys (format, schema_version, kind, step, files...) cannot be changed this way.
    """
    meta_path = Path(path) / META_FILE
    meta = _read_meta(meta_path)
    clashes = [key for key in updates if key in ENGINE_KEYS]
    if clashes:
        raise CheckpointError(meta_path, f"key {clashes[0]!r} is the engine's; expected other keys")
    text = to_json_text({**meta, **updates}, str(meta_path))
    with atomic_output(meta_path) as temporary:
        temporary.write_text(text)


# --------------------------------------------------------------------------------------------- loading


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise CheckpointError(meta_path, "missing; expected the checkpoint's metadata file")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(meta_path, f"is not valid JSON ({error}); expected a JSON object") from None
    if not isinstance(meta, dict):
        raise CheckpointError(meta_path, f"top level is {type(meta).__name__}; expected a JSON object")
    return meta


def _check_header(meta: dict[str, Any], meta_path: Path, expect_kind: str | None) -> None:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} format", f"is {meta.get('format')!r}; expected {FORMAT!r}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{meta_path} schema_version", f"is {meta.get('schema_version')!r}; expected "
                                                             f"{SCHEMA_VERSION} (the version this medaug reads)")
    if expect_kind is not None and meta.get("kind") != expect_kind:
        raise CheckpointError(f"{meta_path} kind", f"is {meta.get('kind')!r}; expected {expect_kind!r}")
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(meta_path, "lacks an integer 'step' or a 'files' mapping; expected both")


def _check_files(folder: Path, files: dict[str, Any], skip: set[str]) -> None:
    for name, digest in files.items():
        if name in skip:
            continue
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(path, "missing; meta.json lists it in 'files'")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(path, f"sha256 is {actual[:12]}..., meta.json records {str(digest)[:12]}...; "
                                        "expected an unmodified file (corrupt or tampered)")


def _first_difference(actual: Any, expected: Any, where: str) -> str | None:
    """Dotted path of the first place ``actual`` differs from ``expected``, or None when equal."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            found = _first_difference(actual.get(key), expected.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    return None if actual == expected else where


def _check_expected(meta: dict[str, Any], expect: dict[str, Any], meta_path: Path) -> None:
    normalized = json.loads(to_json_text(expect, str(meta_path)))  # tuples to lists, Paths to text
    for key, value in normalized.items():
        where = _first_difference(meta.get(key), value, key)
        if where is None:
            continue
        actual = _lookup(meta, where)
        wanted = _lookup(normalized, where)
        raise CheckpointError(f"{meta_path} {where}", f"is {actual!r}; expected {wanted!r}")


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _load_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(path, f"is not a readable safetensors file ({error}); expected tensors") from None


def _load_trainer(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means: refuse the file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(path, f"refused by torch.load(weights_only=True) ({first_line[:160]}); "
                                    "expected tensors and plain data only") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}; expected a dict")
    return state


def load_checkpoint(
    path: Path,
    expect_kind: str | None = None,
    expect: dict[str, Any] | None = None,
    trainer: bool = True,
) -> Checkpoint:
    """Verify and load a checkpoint folder (or a run folder: its latest checkpoint).

    Checks, in order: meta.json format and ``schema_version``, ``kind`` against ``expect_kind``, the
    keys of ``expect`` (e.g. ``{"model_config": {...}}``) against meta.json, then every listed file's
    presence and sha256. ``trainer=False`` skips ``trainer.pt`` (inference needs no optimizer state).
    Raises CheckpointError naming the file or field that does not match.
    """
    folder = _resolve_folder(Path(path))
    meta_path = folder / META_FILE
    meta = _read_meta(meta_path)
    _check_header(meta, meta_path, expect_kind)
    if expect:
        _check_expected(meta, expect, meta_path)
    files = meta["files"]
    _check_files(folder, files, skip=set() if trainer else {TRAINER_FILE})
    state_dicts = {Path(name).stem: _load_weights(folder / name) for name in files if name.endswith(".safetensors")}
    trainer_state = _load_trainer(folder / TRAINER_FILE) if trainer and TRAINER_FILE in files else None
    return Checkpoint(folder, meta, state_dicts, trainer_state)


def _resolve_folder(path: Path) -> Path:
    if (path / META_FILE).is_file() or not (path / CHECKPOINTS_DIR).is_dir():
        if not path.is_dir():
            raise CheckpointError(path, "not found; expected a checkpoint folder (with meta.json) or a run folder")
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(path / CHECKPOINTS_DIR, "holds no complete checkpoint; expected step_* folders")
    return latest


def _describe_mismatch(module: nn.Module, state: dict[str, Tensor]) -> str | None:
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
              for key in own if key in state and state[key].shape != own[key].shape]
    parts = [f"{label} {', '.join(items[:3])}{f' (+{len(items) - 3} more)' if len(items) > 3 else ''}"
             for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape of", shapes))
             if items]
    return "; ".join(parts) or None


def load_module_weights(module: nn.Module, checkpoint: Checkpoint | Path, name: str = "model") -> None:
    """Copy ``checkpoint``'s ``<name>.safetensors`` into ``module`` (strict: same keys and shapes).

    ``module`` may be DDP-wrapped, compiled or FSDP2-sharded (then every rank calls this and keeps its
    shard of the full weights); the weights go into the module inside.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(Path(checkpoint), trainer=False)
    where = checkpoint.path / f"{name}.safetensors"
    if name not in checkpoint.state_dicts:
        raise CheckpointError(where, f"not in the checkpoint; expected one of {sorted(checkpoint.state_dicts)}")
    from medaug.train.engine import unwrap

    target = unwrap(module)
    state = checkpoint.state_dicts[name]
    problem = _describe_mismatch(target, state)
    if problem:
        raise CheckpointError(where, f"{problem}; expected the model config the checkpoint was saved with")
    if is_sharded(target):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # set_model_state_dict replaces the values of the dict it is given: pass a copy
        set_model_state_dict(target, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
        return
    target.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------ full states of sharded modules


def module_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict of the module inside ``module`` (DDP, compile), as :func:`save_checkpoint` stores it.

    For an FSDP2-sharded module the full tensors are gathered: every rank must call this; rank 0 gets
    them on the CPU, the other ranks an empty dict.
    """
    from medaug.train.engine import unwrap

    target = unwrap(module)
    if not is_sharded(target):
        return target.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _group_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Names of the optimizer's parameters, group by group in its own order (``optimizer.state_dict()``
    numbers them 0, 1, ... in this order)."""
    from medaug.train.engine import unwrap

    names = {id(parameter): name for name, parameter in unwrap(module).named_parameters()}
    return [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]


def _by_name(state: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    """An index-keyed optimizer state dict keyed by parameter name instead."""
    names = [name for group in groups for name in group]
    param_groups = [{**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[index]: value for index, value in state["state"].items()}, "param_groups": param_groups}


def _by_index(state: dict[str, Any], groups: list[list[str]], where: str) -> dict[str, Any]:
    """A name-keyed optimizer state dict keyed by this optimizer's indices, its groups in this optimizer's
    parameter order (``Optimizer.load_state_dict`` pairs saved and current parameters by position)."""
    if len(state["param_groups"]) != len(groups):
        raise CheckpointError(where, f"optimizer has {len(state['param_groups'])} parameter groups; expected "
                                     f"{len(groups)} (the model the checkpoint was saved with)")
    index = {name: i for i, name in enumerate(name for group in groups for name in group)}
    param_groups = []
    for saved, current in zip(state["param_groups"], groups):
        if set(saved["params"]) != set(current):
            missing = sorted(set(current) - set(saved["params"]))
            unexpected = sorted(set(saved["params"]) - set(current))
            raise CheckpointError(where, f"optimizer parameters differ: missing {missing[:3]}, unexpected "
                                         f"{unexpected[:3]}; expected the model the checkpoint was saved with")
        param_groups.append({**saved, "params": [index[name] for name in current]})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": param_groups}


def optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter name (``module``'s names), with whole (unsharded) tensors.

    For an FSDP2-sharded module every rank must call this (it gathers); rank 0 gets the state on the CPU.
    Before the first step the state is empty and only the groups are returned (nothing to gather).
    """
    from medaug.train.engine import unwrap

    target = unwrap(module)
    if is_sharded(target) and optimizer.state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(target, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _by_name(optimizer.state_dict(), _group_names(target, optimizer))


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              where: str = TRAINER_FILE) -> None:
    """Restore :func:`optimizer_state_dict` output (or a plain ``optimizer.state_dict()`` keyed by index).

    ``module`` may be sharded differently from the run that saved it (FSDP2 on any number of ranks, DDP,
    one process): states are matched by parameter name and re-sharded. Raises CheckpointError naming
    ``where`` when the parameter names differ.
    """
    from medaug.train.engine import unwrap

    target = unwrap(module)
    saved = [key for group in state["param_groups"] for key in group["params"]]
    if all(isinstance(key, int) for key in saved):  # index-keyed (checkpoints of earlier versions)
        optimizer.load_state_dict(state)
        return
    by_index = _by_index(state, _group_names(target, optimizer), where)  # checks the names
    if not is_sharded(target):
        optimizer.load_state_dict(by_index)
    elif state["state"]:  # an empty state (saved before the first step) leaves the fresh optimizer as it is
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        copy = {"state": {key: dict(value) for key, value in state["state"].items()},
                "param_groups": [dict(group) for group in state["param_groups"]]}
        set_optimizer_state_dict(target, optimizer, copy, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------ RNG states


def capture_rng_state(device: torch.device) -> dict[str, Tensor]:
    """Python, NumPy, torch CPU (and CUDA ``device``) generator states as tensors (weights_only-safe)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python": torch.tensor([version, *python_state], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([numpy_pos, numpy_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss[0] if gauss else None))
    position, has_gauss = state["numpy_extra"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, position, has_gauss, float(state["numpy_gauss"].item())))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "FORMAT",
    "SCHEMA_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "load_module_weights",
    "load_optimizer_state_dict",
    "module_state_dict",
    "optimizer_state_dict",
    "update_checkpoint_meta",
    "capture_rng_state",
    "restore_rng_state",
    "sha256_file",
    "step_dir_name",
]
