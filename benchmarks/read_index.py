"""Benchmark: read a prepared dataset (image + mask) in random order through a torch DataLoader.

DESIGN §5 target: >= 5,000 slices/s on 2 cores, cold and warm page cache both reported.

    python benchmarks/read_index.py                     # builds 20 volumes x 100 slices, 256², 2 channels
    python benchmarks/read_index.py --data DIR          # an existing prepared dataset
    python benchmarks/read_index.py --out benchmarks/results/read_index-cpu2.json

Protocol. ``batched_loader`` (whole batches per worker call), batch 64, 2 workers with
``torch.set_num_threads(1)``, a fresh random permutation per epoch. Cold: the shard files' pages are
dropped (``posix_fadvise(DONTNEED)``; the share still resident is measured with ``mincore`` and
reported), then fresh workers read one epoch; ``disk`` reports a cold sequential single-stream read
of the same files for context. Warm: one untimed epoch, then timed epochs with
persistent workers. ``steady`` rates exclude the first batch (worker start-up); ``epoch`` rates include
it. The main process only receives batches (what a training loop gets before its device copy); warm
``main_copies_each_batch`` also copies every batch into preallocated tensors in the main process, the
cost of a staging or device copy.
Prints one JSON object; the machine is shared, so the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

try:
    import medaug  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medaug.data.dataset import PreparedSliceDataset, batched_loader
from medaug.data.shards import SHARDS_DIR, ShardWriter, write_assembled_index

TARGET_SLICES_PER_S = 5000


def synthetic_rows(volume_id: str, slices: int, channels: int) -> list[dict]:
    """Index rows for a synthetic volume (values plausible, not meaningful)."""
    return [
        {
            "volume_id": volume_id, "dataset": "benchmark", "subject": volume_id, "patient_group": volume_id,
            "split": "train", "domain": "mr/benchmark", "modality": "MR",
            "channels": [f"c{c}" for c in range(channels)], "source_image": [f"{volume_id}.nii.gz"],
            "slice_index": k, "plane": "axial", "spacing_mm": [1.0, 1.0], "slice_thickness_mm": 1.0,
            "affine": np.eye(4), "intensity": [{"kind": "mr_percentile", "low": 0.0, "high": 1.0}] * channels,
            "body_fraction": 0.5, "structures_annotated": ["brain"], "structures_present": ["brain"],
            "structure_pixels": [1000], "fingerprint": None,
        }
        for k in range(slices)
    ]


def build_dataset(root: Path, volumes: int, slices: int, channels: int, size: int) -> None:
    """Write ``volumes`` synthetic volumes with :class:`ShardWriter` and assemble the index."""
    writer = ShardWriter(root)
    rng = np.random.default_rng(0)
    for number in range(volumes):
        volume_id = f"{number:016x}"
        images_NCHW = rng.uniform(-1, 1, size=(slices, channels, size, size)).astype(np.float16)
        labels_NHW = rng.integers(0, 8, size=(slices, size, size), dtype=np.uint8)
        writer.write_volume(volume_id, images_NCHW, labels_NHW, synthetic_rows(volume_id, slices, channels))
    write_assembled_index(root)


def shard_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / SHARDS_DIR).glob("*.npy") if not p.name.startswith("."))


def drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (clean pages only, hence the fsync)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def resident_fraction(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (``mincore`` on a read-only map)."""
    libc = ctypes.CDLL(None, use_errno=True)
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
            pages = -(-size // mmap.PAGESIZE)
            vector = np.zeros(pages, dtype=np.uint8)
            address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
            status = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), ctypes.c_void_p(vector.ctypes.data))
            if status != 0:
                return float("nan")
            resident += int((vector & 1).sum())
            total += pages
    return resident / max(total, 1)


def disk_rate(paths: list[Path]) -> dict:
    """Cold sequential read of every shard file, one stream of 4 MiB reads: context for the cold figure
    (not a bound: parallel page-fault reads from two workers can go faster)."""
    drop_page_cache(paths)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"sequential_read_gb_per_s": round(total / seconds / 1e9, 3), "bytes": total}


class CopyOut:
    """Copies each batch into preallocated tensors: what a training loop's staging/device copy costs."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, batch: dict) -> None:
        for key in ("image", "label"):
            tensor = batch[key]
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape[1:] != tensor.shape[1:] or len(buffer) < len(tensor):
                buffer = self.buffers[key] = torch.empty_like(tensor)
            buffer[: len(tensor)].copy_(tensor)


def time_epoch(loader: torch.utils.data.DataLoader, consume=None) -> dict[str, float]:
    """Slices/s over one pass: ``epoch`` (from iterator creation) and ``steady`` (after the first batch)."""
    start = time.perf_counter()
    first_done = None
    slices = first = 0
    for batch in loader:
        slices += len(batch["image"])
        if consume is not None:
            consume(batch)
        if first_done is None:
            first_done, first = time.perf_counter(), slices
    end = time.perf_counter()
    return {"slices": slices, "epoch": slices / (end - start), "steady": (slices - first) / (end - first_done)}


def set_one_thread(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: PreparedSliceDataset, epoch: int, batch_size: int, workers: int, persistent: bool):
    generator = torch.Generator().manual_seed(epoch)
    return batched_loader(dataset, batch_size, generator=generator, num_workers=workers,
                          worker_init_fn=set_one_thread, persistent_workers=persistent)


def measure_cold(dataset: PreparedSliceDataset, repeats: int, batch_size: int, workers: int) -> dict:
    files = shard_files(dataset.root)
    runs, resident = [], []
    for repeat in range(repeats):
        drop_page_cache(files)
        resident.append(resident_fraction(files))
        runs.append(time_epoch(make_loader(dataset, 1000 + repeat, batch_size, workers, persistent=False)))
    return summarize(runs) | {"resident_fraction_after_drop": resident}


def measure_warm(dataset: PreparedSliceDataset, repeats: int, batch_size: int, workers: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    loader = batched_loader(dataset, batch_size, generator=generator, num_workers=workers,
                            worker_init_fn=set_one_thread, persistent_workers=True)
    time_epoch(loader)  # warms the page cache and the workers
    runs = [time_epoch(loader) for _ in range(repeats)]
    copied = [time_epoch(loader, CopyOut()) for _ in range(repeats)]
    return summarize(runs) | {
        "resident_fraction": resident_fraction(shard_files(dataset.root)),
        "main_copies_each_batch": summarize(copied),
    }


def summarize(runs: list[dict[str, float]]) -> dict:
    return {
        "steady_slices_per_s_median": round(statistics.median(r["steady"] for r in runs)),
        "epoch_slices_per_s_median": round(statistics.median(r["epoch"] for r in runs)),
        "steady_slices_per_s_runs": [round(r["steady"]) for r in runs],
        "slices_per_epoch": runs[0]["slices"],
    }


def machine() -> dict:
    fields = common.lscpu()
    return common.machine(
        hypervisor=fields.get("Hypervisor vendor"),
        arch=platform.machine(),
        kernel=platform.release(),
        torch=torch.__version__,
        numpy=np.__version__,
    )


def commit() -> dict:
    return common.commit()


def run(args: argparse.Namespace, root: Path) -> dict:
    if args.data is None:
        build_dataset(root, args.volumes, args.slices, args.channels, args.size)
    load_before = os.getloadavg()
    results = {}
    for dtype_name in args.dtypes:
        dataset = PreparedSliceDataset(root, dtype=getattr(torch, dtype_name))
        results[dtype_name] = {
            "cold": measure_cold(dataset, args.repeats, args.batch_size, args.workers),
            "warm": measure_warm(dataset, args.repeats, args.batch_size, args.workers),
        }
    disk = disk_rate(shard_files(root))
    disk["bytes_per_slice"] = round(disk["bytes"] / len(dataset))
    primary = results[args.dtypes[0]]
    disk["cold_read_gb_per_s"] = round(primary["cold"]["steady_slices_per_s_median"] * disk["bytes_per_slice"] / 1e9, 3)
    figures = {phase: primary[phase]["steady_slices_per_s_median"] for phase in ("cold", "warm")}
    return {
        "benchmark": "read_index",
        "what": "image+mask slices/s, random order, DataLoader batch "
                f"{args.batch_size}, {args.workers} workers, 1 thread each; steady = after the first batch",
        "dataset": {"shards": len(set(dataset.rows.column("shard").to_pylist())), "slices": len(dataset),
                    "channels": dataset.channels_out, "size": [dataset.height, dataset.width],
                    "image_dtype_on_disk": "float16", "label_dtype": "uint8", "built": args.data is None},
        "image_dtype_delivered": args.dtypes[0],
        "target_slices_per_s": TARGET_SLICES_PER_S,
        "slices_per_s": figures,
        "pass": all(value >= TARGET_SLICES_PER_S for value in figures.values()),
        "by_dtype": results,
        "disk": disk,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "notes": [
            "pass/fail uses the steady rates; epoch rates include forking fresh workers, slow on this VM",
            "cold = shard pages dropped from this machine's page cache (resident_fraction_after_drop); "
            "a virtual disk may still be cached by its host",
            "main_copies_each_batch: the main process also copies each batch (staging/device copy cost)",
        ],
        "machine": machine(),
        **commit(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="an existing prepared dataset (default: build one)")
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"],
                        help="image dtypes delivered; the first decides pass/fail")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medaug-read-index-") as scratch:
        report = run(args, args.data if args.data is not None else Path(scratch))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
