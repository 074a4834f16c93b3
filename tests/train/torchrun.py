"""Launch a command under ``torch.distributed.run`` for the 2-process gloo tests.

On a loaded 2-core machine a gloo worker has (rarely, ~1 in 50 CI runs seen) died at shutdown with
``terminate called without an active exception`` (SIGABRT from a C++ thread destructor) after the work was
done; that one signature is retried once. Any other failure, or the same one twice, fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SHUTDOWN_ABORT = "terminate called without an active exception"


def run_torchrun(command: list[str], fresh_dir: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; ``fresh_dir`` (the run folder) is emptied before each attempt."""
    for attempt in range(2):
        if fresh_dir is not None:
            shutil.rmtree(fresh_dir, ignore_errors=True)
            fresh_dir.mkdir(parents=True)
        finished = subprocess.run(command, capture_output=True, text=True, **kwargs)
        if finished.returncode == 0 or SHUTDOWN_ABORT not in finished.stderr or "SIGABRT" not in finished.stderr:
            break
    return finished
