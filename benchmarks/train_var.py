"""MedVAR transformer training throughput through the engine ``medaug train var`` uses (issue 6).

Per configuration: images/s (global and per GPU), tokens/s, step time, peak memory (max allocated over
the timed steps, rank 0) and model FLOP utilisation: N = 12·width²·depth (the blocks' matmul weights)
plus the head (width·V); 6N FLOPs per token for training; 680 tokens per image; over the bf16 matmul
rate measured in the same run (8192³ products on random data). Attention scores are not counted (as in
DESIGN.md §5), so MFU slightly understates the work done.

Every configuration runs ``medaug.train.engine.train`` on a :class:`~medaug.train.var_task.VarTask`
(the real training step: cached tokens → teacher inputs through the tokenizer's quantizer → VAR →
weighted cross-entropy → fused AdamW), with the recipe ``recipes/models/var-<preset>.yaml`` and its
``train:`` settings, overridden per configuration. What differs from ``medaug train var``: the token
cache is random tokens (4096 rows; the cost of a step does not depend on the token values), the
quantizer is untrained, the model is built directly on the GPU, and the final checkpoint is not
written (writing 24 GB for d30 is not training throughput). Data loading is the engine's DataLoader
(2 workers, pinned memory) over the memory-mapped cache; ``loader`` in the output is its rate alone.

One call on a 2-GPU machine (``nvidia-h200-x2``): 2-GPU runs first and last, 1-GPU runs in between on
both GPUs at once (one queue per GPU, each pinned to half of the cores); compiled graphs are shared
through inductor's on-disk cache between runs of the same per-GPU shapes. A run that fails or is cut by
the time budget is recorded with its error; the others go on.

    python benchmarks/train_var.py --out $OUT/train_var.json            # the GPU plan (5.3 minutes on 2026-11-28)
    python benchmarks/train_var.py --tiny --out /tmp/train_var.json     # CPU smoke of every code path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

IMAGE_TOKENS = 680
TARGETS = {"d16_images_per_s_per_gpu": 300, "d16_peak_gb_batch128": 60, "scaling_2_gpus": 1.8}
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Job:
    """One configuration. ``batch`` is global; ``gpus`` processes (torchrun when > 1); ``est_s`` the wall
    time it is expected to take (for the schedule); ``device`` cpu for the smoke plan."""

    name: str
    preset: str = "d16"
    batch: int = 128
    gpus: int = 1
    fsdp: bool = False
    compile: bool = True
    scope: str = "blocks"
    ac: float = 0.0
    attn: str = "sdpa"
    warmup: int = 4
    timed: int = 16
    est_s: float = 70.0
    device: str = "cuda"
    kind: str = "train"  # train | micro


# ------------------------------------------------------------------------------------------------ plans


def h200_plan() -> dict[str, Any]:
    """The measured plan: phase 1 and 3 on both GPUs, phase 2 as two queues of one-GPU runs."""
    return {
        "phase1": [Job("d16_b256_ddp2", batch=256, gpus=2, est_s=90)],
        "queues": [
            [Job("d16_b128", batch=128, est_s=45), Job("d16_b64", batch=64, est_s=60),
             Job("d20_b64", preset="d20", batch=64, est_s=70), Job("d16_b64_eager", batch=64, compile=False, est_s=30),
             Job("d16_b128_flex", batch=128, attn="flex", est_s=80)],
            [Job("micro", kind="micro", est_s=40),
             Job("d30_b64_fsdp", preset="d30", batch=64, fsdp=True, ac=0.5, warmup=3, timed=8, est_s=110),
             Job("d24_b64", preset="d24", batch=64, warmup=3, timed=10, est_s=80),
             Job("d16_b128_model", batch=128, scope="model", est_s=90)],
        ],
        "phase3": [Job("d30_b128_fsdp2", preset="d30", batch=128, gpus=2, fsdp=True, ac=0.5, warmup=3, timed=8,
                       est_s=90)],
        "reserve_s": 110,
    }


def tiny_plan() -> dict[str, Any]:
    """Every code path on the CPU in about two minutes: DDP and FSDP2 (2 gloo processes), FSDP2 in one
    process, activation checkpointing, eager."""
    tiny = dict(preset="tiny", compile=False, warmup=2, timed=3, device="cpu", est_s=30)
    return {
        "phase1": [Job("tiny_b16_ddp2", batch=16, gpus=2, **tiny)],
        "queues": [[Job("tiny_b8", batch=8, **tiny), Job("tiny_b8_ac", batch=8, ac=1.0, **tiny)],
                   [Job("micro", kind="micro", device="cpu", est_s=10),
                    Job("tiny_b8_fsdp", batch=8, fsdp=True, **tiny)]],
        "phase3": [Job("tiny_b16_fsdp2", batch=16, gpus=2, fsdp=True, ac=0.5, **tiny)],
        "reserve_s": 60,
    }


def memory_fix(job: Job, result: dict[str, Any], limit_gb: float) -> Job | None:
    """A rerun of ``job`` with enough blocks recomputed to fit ``limit_gb``, when its peak was above it.

    Per block, the kept activations are (peak − 16 bytes per parameter) / depth; recompute a block and
    keep only its input. One block more than the estimate, for safety.
    """
    peak = result.get("peak_gb")
    if peak is None or peak <= limit_gb or job.ac >= 1.0:
        return None
    static_gb = 16 * result["parameters"] / 1e9
    depth = result["depth"]
    per_block = max((peak - static_gb) / depth, 1e-3)
    blocks = min(depth, int((peak - limit_gb) / per_block) + 2)
    return replace(job, name=f"{job.name}_ac{blocks}", ac=round(blocks / depth, 4), est_s=60)


# ------------------------------------------------------------------------------------------------ a job


def synthetic_task(job: Job, run_dir: Path):
    """A VarTask on a random token cache of 4096 rows (4 domains, 20 structures) and an untrained quantizer."""
    import numpy as np
    import torch

    from medaug import vocab
    from medaug.data.structures import StructureTable
    from medaug.models.quant import MultiScaleQuantizer, QuantizerConfig
    from medaug.models.var import VAR, var_preset
    from medaug.train.token_cache import CACHE_FORMAT, CACHE_VERSION, TOKENS_FILE, TokenCache
    from medaug.train.var_task import GeneratorContext, VarTask, load_var_recipe

    shape = var_preset(job.preset)  # the preset's tokenizer fields: VAR's 256² schedule (tiny: 4 scales)
    quantizer = MultiScaleQuantizer(QuantizerConfig(codebook_size=shape.codebook_size, latent_dim=shape.latent_dim,
                                                    patch_sides=shape.patch_sides))
    names = StructureTable.from_names([row["name"] for row in vocab.vocabulary_table()[:20]]).names
    domains = ("ct/abdomen", "mr/abdomen", "mr/brain", "mr/prostate")
    rows, length = 4096, sum(side * side for side in shape.patch_sides)
    rng = np.random.default_rng(0)
    np.save(run_dir / TOKENS_FILE, rng.integers(0, shape.codebook_size, (rows, length), dtype=np.int16))
    present = rng.random((rows, len(names))) < 0.3
    info = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "tokens_per_row": length,
            "patch_sides": list(shape.patch_sides), "structures": list(names), "domains": list(domains),
            "rows": rows, "rows_original": rows, "rows_flipped": 0, "flip": False, "key": "synthetic",
            "index_sha256": None}
    cache = TokenCache(run_dir, info, np.load(run_dir / TOKENS_FILE, mmap_mode="r"),
                       rng.integers(0, len(domains), rows), present, present | (rng.random(present.shape) < 0.3),
                       np.zeros(rows, dtype=bool), np.arange(rows), [f"synthetic-{i}" for i in range(rows)],
                       False, names)
    recipe = load_var_recipe(REPO / "recipes" / "models" / f"var-{job.preset}.yaml", job_overrides(job))
    context = GeneratorContext({name: {"channels": ["ct"]} for name in domains}, domains, StructureTable(names),
                               {"image_size": 256, "image_channels": 1}, {})

    class BenchTask(VarTask):
        def build_modules(self) -> dict[str, torch.nn.Module]:
            device = torch.device("cuda", torch.cuda.current_device()) if job.device == "cuda" else torch.device("cpu")
            with device:  # initialised where it trains (2B parameters initialise slowly on the CPU)
                return {"var": VAR(self.var_config)}

    return BenchTask(cache, quantizer, recipe, context), recipe


def job_overrides(job: Job) -> list[str]:
    """The recipe keys a job sets (everything else comes from recipes/models/var-<preset>.yaml)."""
    return [f"train.batch_size={job.batch}", f"train.max_steps={job.warmup + job.timed}",
            f"train.compile={str(job.compile).lower()}", f"train.compile_scope={job.scope}",
            f"train.fsdp={str(job.fsdp).lower()}", f"train.activation_checkpointing={job.ac}",
            f"model.attn_impl={job.attn}", "train.log_every=100000", "train.checkpoint_every=100000",
            "train.num_workers=2", f"train.device={job.device}", "train.ema_decay=null"]


class StepTimer:
    """The engine's progress callback (rank 0): synchronised clock and memory at the warm-up's end and at
    the last step; the first step's time (compilation) too."""

    def __init__(self, job: Job):
        import torch

        self.job, self.cuda = job, job.device == "cuda" and torch.cuda.is_available()
        self.started = time.perf_counter()
        self.marks: dict[str, float] = {}

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __call__(self, step: int, max_steps: int, metrics: dict[str, float]) -> None:
        import torch

        if step == 1:
            self._sync()
            self.marks["first_step_s"] = time.perf_counter() - self.started
        if step == self.job.warmup:
            self._sync()
            if self.cuda:
                self.marks["peak_gb_warmup"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()
            self.marks["t0"] = time.perf_counter()
        if step == self.job.warmup + self.job.timed:
            self._sync()
            self.marks["t1"] = time.perf_counter()
            if self.cuda:
                self.marks["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                self.marks["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9


def run_job(job: Job, out: Path) -> None:
    """Train ``job`` through the engine and write its figures (rank 0) to ``out``."""
    import torch

    from medaug.train import distributed as dist_utils
    from medaug.train import engine

    engine._Trainer.save = lambda self: None  # no final checkpoint (module doc); everything else as in training
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        task, recipe = synthetic_task(job, Path(folder))
        timer = StepTimer(job)
        result = engine.train(task, recipe.train, Path(folder) / "run", progress=timer)
    if dist_utils.get_rank() == 0:
        figures = _figures(job, task.var_config, timer.marks, result.metrics)
        out.write_text(json.dumps({**figures, "wall_s": round(time.perf_counter() - started, 1),
                                   "torch": torch.__version__}))


def _figures(job: Job, config: Any, marks: dict[str, float], metrics: dict[str, float]) -> dict[str, Any]:
    """Throughput, memory and model size of a finished run from the timer's marks."""
    seconds = marks["t1"] - marks["t0"]
    images_per_s = job.batch * job.timed / seconds
    peaks = [marks[key] for key in ("peak_gb_warmup", "peak_gb") if key in marks]
    return {**asdict(job), "depth": config.depth, "width": config.width, "parameters": _parameters(config),
            "block_params": config.num_block_params(), "flops_per_token": config.flops_per_token(True),
            "tokens_per_image": config.total_tokens, "images_per_s": round(images_per_s, 2),
            "images_per_s_per_gpu": round(images_per_s / job.gpus, 2),
            "tokens_per_s": round(images_per_s * config.total_tokens), "step_ms": round(1e3 * seconds / job.timed, 1),
            "first_step_s": round(marks.get("first_step_s", float("nan")), 1),
            "peak_gb": _round(marks.get("peak_gb")), "peak_gb_incl_warmup": _round(max(peaks) if peaks else None),
            "reserved_gb": _round(marks.get("reserved_gb")),
            "loss": round(metrics.get("loss", float("nan")), 4)}


def _parameters(config: Any) -> int:
    import torch

    from medaug.models.var import VAR

    with torch.device("meta"):
        return sum(parameter.numel() for parameter in VAR(config).parameters())


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_micro(job: Job, out: Path) -> None:
    """The bf16 matmul rate (8192³, random data) and block-causal attention forward+backward at d16's shapes
    (batch 128, 16 heads, 680 tokens, head dim 64): SDPA with the boolean mask per backend, FlexAttention
    (compiled, block mask), and SDPA without a mask (dense lower bound)."""
    import torch

    cuda = job.device == "cuda" and torch.cuda.is_available()
    figures: dict[str, Any] = {"matmul": _matmul_rate(cuda)}
    if cuda:
        figures["attention"] = _attention_variants()
    out.write_text(json.dumps(figures))


def _time_ms(fn: Any, cuda: bool, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, a synchronised clock otherwise)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return sorted(times)[len(times) // 2]


def _matmul_rate(cuda: bool) -> dict[str, Any]:
    import torch

    size = 8192 if cuda else 512
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    milliseconds = _time_ms(lambda: a @ b, cuda)
    return {"size": size, "dtype": str(dtype), "ms": round(milliseconds, 3),
            "tflops": round(2 * size**3 / milliseconds / 1e9, 1)}


def _attention_variants() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from medaug.models.var import block_causal_block_mask, flex_attend, masked_sdpa, var_preset

    config = var_preset("d16")
    levels = torch.tensor([k for k, n in enumerate(config.tokens_per_scale) for _ in range(n)], device="cuda")
    mask_LL = levels[None, :] <= levels[:, None]
    shape = (128, config.heads, config.total_tokens, config.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    density = mask_LL.float().mean().item()
    flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3] * 3.5  # fwd (2 matmuls) + bwd (5), dense

    def step(attend: Any) -> Any:
        return lambda: torch.autograd.backward(attend(q, k, v), grad)

    variants = {"sdpa_dense_no_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0),
                "sdpa_mask_default": masked_sdpa(mask_LL),  # what the model runs
                "flex_block_mask": flex_attend(block_causal_block_mask(levels))}
    results: dict[str, Any] = {"shape_BHLD": list(shape), "mask_density": round(density, 4)}
    for name, attend in variants.items():
        results[name] = _attention_entry(step(attend), flops, 1.0 if name == "sdpa_dense_no_mask" else density)
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel([backend]):
            results[f"sdpa_mask_{backend.name.lower()}"] = _attention_entry(step(variants["sdpa_mask_default"]),
                                                                            flops, density)
    return results


def _attention_entry(fn: Any, dense_flops: float, density: float) -> dict[str, Any]:
    try:
        milliseconds = _time_ms(fn, True)
    except Exception as error:  # noqa: BLE001 - a backend that refuses the mask is a result too
        return {"error": str(error).splitlines()[0][:200]}
    return {"fwd_bwd_ms": round(milliseconds, 3), "useful_tflops": round(dense_flops * density / milliseconds / 1e9, 1)}


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class Running:
    job: Job
    process: subprocess.Popen
    out: Path
    started: float
    timeout: float
    queue: int | None = None


@dataclass
class Schedule:
    """Runs jobs as subprocesses (one per GPU queue, torchrun for several GPUs) and collects their JSON."""

    work: Path
    log_path: Path
    deadline: float
    results: list[dict[str, Any]] = field(default_factory=list)

    def launch(self, job: Job, queue: int | None) -> Running:
        out = self.work / f"{job.name}.json"
        spec = json.dumps(asdict(job))
        script = [str(Path(__file__).resolve()), "--job", spec, "--job-out", str(out)]
        environment = {**os.environ, **NCCL_SAFETY, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
                       "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
                       "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
        cores = None
        if job.gpus > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(job.gpus),
                       *script]
            environment.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            command = [sys.executable, *script]
            if job.device == "cuda" and queue is not None:
                environment["CUDA_VISIBLE_DEVICES"] = str(queue)
                cores = _core_half(queue)
                environment.update(OMP_NUM_THREADS=str(len(cores)), TORCHINDUCTOR_COMPILE_THREADS=str(len(cores)))
            elif job.device == "cpu":
                environment["OMP_NUM_THREADS"] = "1"
        log = self.log_path.open("a")
        log.write(f"\n===== {job.name} ({time.strftime('%H:%M:%S')}) =====\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO,
                                   start_new_session=True,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        timeout = max(min(2.5 * job.est_s + 60, self.deadline - time.monotonic()), 10)
        return Running(job, process, out, time.monotonic(), timeout, queue)

    def finish(self, running: Running) -> dict[str, Any]:
        """Wait for ``running`` (killing its process group at its timeout); its figures or its error."""
        try:
            code = running.process.wait(timeout=max(running.started + running.timeout - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(running.process.pid, 9)
            running.process.wait()
            code = "timeout"
        wall = round(time.monotonic() - running.started, 1)
        if code == 0 and running.out.is_file():
            result = json.loads(running.out.read_text())
        else:
            result = {**asdict(running.job), "error": f"exit {code}", "log_tail": _tail(self.log_path, 1500)}
        result["process_wall_s"] = wall
        self.results.append(result)
        print(f"[{time.strftime('%H:%M:%S')}] {running.job.name}: {_summary(result)}", flush=True)
        return result

    def run_serial(self, jobs: list[Job]) -> None:
        for job in jobs:
            if time.monotonic() + 20 > self.deadline:
                self.results.append({**asdict(job), "error": "skipped: time budget"})
                continue
            self.finish(self.launch(job, None))

    def run_queues(self, queues: list[list[Job]], phase_end: float, limit_gb: float) -> None:
        """One queue per GPU, concurrently; a queue starts a job only when its estimate fits before ``phase_end``."""
        pending = [list(queue) for queue in queues]
        running: dict[int, Running] = {}
        while any(pending) or running:
            for index, queue in enumerate(pending):
                if index in running or not queue:
                    continue
                job = queue.pop(0)
                if time.monotonic() + job.est_s > phase_end:
                    self.results.append({**asdict(job), "error": "skipped: time budget"})
                    continue
                running[index] = self.launch(job, index)
            for index, current in list(running.items()):
                if current.process.poll() is None and time.monotonic() < current.started + current.timeout:
                    continue
                result = self.finish(running.pop(index))
                retry = memory_fix(current.job, result, limit_gb) if current.job.name.endswith("_b128") else None
                if retry is not None:
                    pending[index].insert(0, retry)
            time.sleep(0.5)


def _core_half(queue: int) -> set[int]:
    cores = sorted(os.sched_getaffinity(0))
    half = max(len(cores) // 2, 1)
    chosen = cores[queue * half:(queue + 1) * half]
    return set(chosen or cores)


def _tail(path: Path, characters: int) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-characters:]


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    if "matmul" in result:
        return f"matmul {result['matmul']['tflops']} TFLOP/s"
    return (f"{result['images_per_s_per_gpu']} img/s/GPU, {result['step_ms']} ms/step, peak {result['peak_gb']} GB, "
            f"first step {result['first_step_s']} s")


def loader_rate(batch: int = 128, batches: int = 200) -> dict[str, Any]:
    """Batches/s of the engine's DataLoader setup (2 workers, pinned memory off: CPU only) over a random
    token cache with the class-balanced sampler: what a training step waits for at most."""
    from torch.utils.data import DataLoader

    from medaug.data.samplers import SamplerConfig, build_sampler

    with tempfile.TemporaryDirectory() as folder:
        task, _ = synthetic_task(Job("loader", device="cpu"), Path(folder))
        sampler = build_sampler(SamplerConfig(by="structure", power=0.5), task.cache.domain_N, task.cache.present_NS,
                                1, 0, 0)
        loader = DataLoader(task.train_dataset(), batch_size=batch, sampler=sampler, num_workers=2, drop_last=True,
                            persistent_workers=True)
        iterator, count = iter(loader), 0
        next(iterator)
        began = time.perf_counter()
        while count < batches:
            try:
                next(iterator)
            except StopIteration:
                sampler.set_epoch(count)
                iterator = iter(loader)
                continue
            count += 1
        seconds = time.perf_counter() - began
        del iterator, loader
    return {"batch": batch, "batches_per_s": round(batches / seconds, 1),
            "images_per_s": round(batch * batches / seconds)}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """MFU per run (from the measured matmul rate) and the targets of DESIGN.md §5."""
    micro = next((item for item in results if item.get("kind") == "micro" or "matmul" in item), {})
    rate = (micro.get("matmul") or {}).get("tflops")
    runs = {item["name"]: item for item in results if "images_per_s" in item}
    for item in runs.values():
        if rate:
            per_gpu_flops = item["tokens_per_s"] / item["gpus"] * item["flops_per_token"]
            item["mfu"] = round(per_gpu_flops / (rate * 1e12), 3)
            item["model_tflops_per_gpu"] = round(per_gpu_flops / 1e12, 1)
    d16 = runs.get("d16_b128")
    best128 = min((item for name, item in runs.items() if name.startswith("d16_b128") and item["gpus"] == 1
                   and item.get("peak_gb") is not None and item["peak_gb"] <= TARGETS["d16_peak_gb_batch128"]),
                  key=lambda item: -item["images_per_s"], default=None)
    two = runs.get("d16_b256_ddp2")
    checks = {
        "d16_b128_images_per_s_per_gpu": d16 and d16["images_per_s_per_gpu"],
        "d16_b128_peak_gb": d16 and d16["peak_gb"],
        "d16_b128_within_60gb_best": best128 and {"name": best128["name"], "images_per_s": best128["images_per_s"],
                                                  "peak_gb": best128["peak_gb"]},
        "scaling_2_gpus": (two and d16) and round(two["images_per_s"] / d16["images_per_s"], 3),
        "d30_fsdp_1_gpu": "d30_b64_fsdp" in runs, "d30_fsdp_2_gpus": "d30_b128_fsdp2" in runs,
    }
    checks["pass"] = bool(best128 and best128["images_per_s"] >= TARGETS["d16_images_per_s_per_gpu"]
                          and checks["scaling_2_gpus"] and checks["scaling_2_gpus"] >= TARGETS["scaling_2_gpus"]
                          and checks["d30_fsdp_1_gpu"] and checks["d30_fsdp_2_gpus"])
    return {"matmul_tflops": rate, "targets": TARGETS, "checks": checks}


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'run':<22}{'GPUs':>5}{'batch':>6}{'img/s/GPU':>11}{'tok/s/GPU':>11}{'ms/step':>9}{'peak GB':>9}{'MFU':>7}")
    for item in results:
        if "images_per_s" not in item:
            if "error" in item:
                print(f"{item['name']:<22} {item['error']}")
            continue
        print(f"{item['name']:<22}{item['gpus']:>5}{item['batch']:>6}{item['images_per_s_per_gpu']:>11.1f}"
              f"{item['tokens_per_s'] / item['gpus']:>11.0f}{item['step_ms']:>9.1f}{item['peak_gb'] or 0:>9.1f}"
              f"{item.get('mfu', 0):>7.3f}")


def drive(args: argparse.Namespace) -> dict[str, Any]:
    import common

    plan = tiny_plan() if args.tiny else h200_plan()
    started = time.monotonic()
    deadline = started + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="train_var-"))
    log_path = Path(args.log) if args.log else work / "train_var.log"
    schedule = Schedule(work, log_path, deadline)
    loader = loader_rate(batch=8 if args.tiny else 128, batches=50 if args.tiny else 300)
    print(f"loader: {loader}", flush=True)
    schedule.run_serial(plan["phase1"])
    schedule.run_queues(plan["queues"], deadline - plan["reserve_s"], TARGETS["d16_peak_gb_batch128"])
    schedule.run_serial(plan["phase3"])
    report = {"benchmark": "train_var", "plan": "tiny (CPU smoke)" if args.tiny else "h200x2",
              "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.monotonic() - started, 1),
              "machine": common.machine(gpus=_gpu_names()), **common.commit("medaug", "benchmarks"),
              "loader": loader, **summarize(schedule.results), "runs": schedule.results}
    print_table(schedule.results)
    print(json.dumps(report["checks"]))
    return report


def _gpu_names() -> list[str]:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in found.stdout.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--log", help="append every run's output here (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="the CPU smoke plan (tiny model, gloo)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole plan")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = Job(**json.loads(args.job))
        (run_micro if job.kind == "micro" else run_job)(job, Path(args.job_out))
        return
    report = drive(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
