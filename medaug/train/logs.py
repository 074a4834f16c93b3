"""Training logs: one JSON object per line in ``run_dir/log.jsonl``, mirrored to TensorBoard when present.

Named ``logs`` so that it does not shadow the standard library's ``logging``. Only rank 0 makes a
:class:`RunLogger` (the engine passes ``enabled=False`` elsewhere). TensorBoard is optional: without the
``tensorboard`` package the JSONL log is the whole record and one log line says so.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from medaug.io.atomic import atomic_output

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _open_tensorboard(folder: Path) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging off: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(folder))


def truncate_log(path: Path, last_step: int) -> int:
    """Drop records with ``step > last_step`` (written after the checkpoint a run resumes from).

    Returns the number of records dropped. Lines that are not JSON (a line cut by a kill) go too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        with atomic_output(path) as temporary:
            temporary.write_text("".join(f"{line}\n" for line in kept))
    return dropped


class RunLogger:
    """Append-only metric log of one run; every method is a no-op when ``enabled`` is False."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / LOG_FILE
        self._file = None
        self._writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)  # line-buffered: each record reaches the file whole
            self._writer = _open_tensorboard(run_dir / TENSORBOARD_DIR) if tensorboard else None

    def write(self, step: int, values: dict[str, Any]) -> None:
        """One record ``{"step": step, **values}``; numeric values also go to TensorBoard."""
        if not self.enabled or self._file is None:
            return
        record = {"step": step, **{key: _finite_or_text(value) for key, value in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _finite_or_text(value: Any) -> Any:
    # JSON has no NaN/Infinity; keep them readable instead of writing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


__all__ = ["RunLogger", "truncate_log", "LOG_FILE"]
