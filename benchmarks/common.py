"""What every benchmark reports about where and on what code it ran (imported as ``common`` by the
scripts in this folder: ``python benchmarks/X.py`` puts the folder first on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lscpu() -> dict[str, str]:
    """``lscpu`` as a dict (empty where the command is missing)."""
    fields = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return fields


def machine(**extra) -> dict:
    """The machine's label, CPU model and count, Python version, plus ``extra``."""
    return {
        "label": "2-core CPU sandbox (x86_64)" if os.cpu_count() == 2 else platform.node(),
        "cpu": lscpu().get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **extra,
    }


def commit(*paths: str, dirty_key: str = "working_tree_dirty") -> dict:
    """``{"commit": HEAD, dirty_key: uncommitted changes under paths (all when none)}``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", *paths], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": head.stdout.strip(), dirty_key: bool(status.stdout.strip())}


def report(benchmark: str, started: float, json_out: Path | None, **fields) -> dict:
    """The result of ``benchmark``: name, date, machine, commit, wall seconds since ``started`` (a
    ``time.perf_counter()`` value) and ``fields``; printed as JSON and written to ``json_out`` when given."""
    import json
    import time

    result = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **commit(),
              "wall_s": round(time.perf_counter() - started, 1), **fields}
    text = json.dumps(result, indent=2, default=str)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
    print(text)
    return result
