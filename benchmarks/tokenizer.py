"""Benchmark: the 256² paired image + mask tokenizer on one GPU (issue 4).

Measures, with the recipe ``recipes/models/tokenizer-256.yaml`` (VAR-sized: base 160, codebook 4096 x 32,
scales 1..16):

* training images/s and peak memory, bf16 autocast, fused AdamW, at batch 32 and 64, through the real
  :class:`medaug.train.tokenizer.TokenizerTask` ``training_step`` (VQ-VAE forward, L1 + SSIM, marginal CE
  + Dice, quantizer loss; and, in a second phase, the hinge GAN with its adaptive weight and the
  discriminator update), on batches of real prepared phantom slices kept on the GPU (data loading is
  not timed: the read benchmark covers it);
* encode (image + mask → per-scale indices) and decode (indices → image + mask) images/s at batch 256,
  bf16 autocast, and decode with bf16 weights.

Prints one JSON object (``--json-out`` also writes it). Needs a CUDA device; the prepared data is made
from medaug's phantoms in a temporary folder (about 30 s on 16 cores).

    PYTHONPATH=. python benchmarks/tokenizer.py --json-out $OUT/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare_phantoms(folder: Path) -> Path:
    """Phantoms of the three domains, prepared at 256² (the tokenizer's size)."""
    from medaug.config.recipes import load_prepare_recipe
    from medaug.phantoms import write_phantoms
    from medaug.prepare.pipeline import run_prepare

    write_phantoms(folder / "phantoms", n=3, seed=0, formats=("nifti",))
    recipe = (REPO / "recipes/demo.yaml").read_text().replace("../out/demo/phantoms", str(folder / "phantoms"))
    (folder / "demo.yaml").write_text(recipe)
    run_prepare(load_prepare_recipe(folder / "demo.yaml"), folder / "prepared", workers=8)
    return folder / "prepared"


def gpu_batch(task, batch_size: int, device: torch.device) -> dict:
    loader = torch.utils.data.DataLoader(task.train_dataset(), batch_size=batch_size, shuffle=True, drop_last=True)
    batch = next(iter(loader))
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()}


def time_training(task, batch_size: int, gan: bool, steps: int, warmup: int, device) -> dict:
    torch.manual_seed(0)
    modules = {name: module.to(device) for name, module in task.build_modules().items()}
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=True) for name, module in modules.items()}

    def update(name: str, loss: torch.Tensor) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    batch = gpu_batch(task, batch_size, device)
    first_step = task.recipe.losses.gan_start_step if gan else 0
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            task.training_step(modules, batch, first_step + step, update)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "batch": batch_size,
        "gan": gan,
        "images_per_s": round(batch_size * steps / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }
    del modules, optimizers, batch
    torch.cuda.empty_cache()
    return result


def time_codec(task, batch_size: int, repeats: int, device) -> dict:
    """Encode and decode images/s at ``batch_size`` (bf16 autocast; decode also with bf16 weights)."""
    model = task.build_modules()["vqvae"].to(device).eval()
    small = gpu_batch(task, 16, device)
    reps = -(-batch_size // 16)
    batch = {k: torch.cat([v] * reps)[:batch_size] if torch.is_tensor(v) else v for k, v in small.items()}
    results = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        encode = lambda: model.img_to_indices(batch["image"], batch["channel_mask"], batch["label"])  # noqa: E731
        indices = encode()
        results["encode_images_per_s"] = _rate(encode, batch_size, repeats, device)
        decode = lambda: model.indices_to_img(indices)  # noqa: E731
        results["decode_images_per_s"] = _rate(decode, batch_size, repeats, device)
    # bf16 weights for the decoder (the quantizer's code lookup stays float32, as in training)
    model.post_quant_conv.to(torch.bfloat16)
    model.decoder.to(torch.bfloat16)
    with torch.no_grad():
        decode_bf16 = lambda: model.decode(model.quantizer.indices_to_features(indices).to(torch.bfloat16))  # noqa: E731
        results["decode_bf16_weights_images_per_s"] = _rate(decode_bf16, batch_size, repeats, device)
    results["batch"] = batch_size
    return results


def _rate(function, batch_size: int, repeats: int, device) -> float:
    function()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize(device)
    return round(batch_size * repeats / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="a prepared dataset at 256² (default: phantoms)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tokenizer.py needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from medaug.train.tokenizer import TokenizerTask, load_tokenizer_recipe

    with tempfile.TemporaryDirectory() as folder:
        data = args.data or prepare_phantoms(Path(folder))
        recipe = load_tokenizer_recipe(REPO / "recipes/models/tokenizer-256.yaml")
        task = TokenizerTask(data, recipe)
        parameters = {name: sum(p.numel() for p in module.parameters()) for name, module in task.build_modules().items()}
        training = []
        for batch in (32, 64):
            for gan in (False, True):
                training.append(time_training(task, batch, gan, args.steps, args.warmup, device))
                print(json.dumps(training[-1]), file=sys.stderr, flush=True)
        try:
            codec = time_codec(task, 256, max(3, args.steps // 4), device)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            codec = {"error": f"{type(error).__name__}: {error}"}
    report = {
        "benchmark": "tokenizer",
        "recipe": "recipes/models/tokenizer-256.yaml",
        "parameters": parameters,
        "image_channels": task.channels,
        "structures": task.table.num_structures,
        "training": training,
        "codec": codec,
        "machine": {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "python": platform.python_version()},
        "commit": _commit(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


def _commit() -> str:
    return common.commit()["commit"] or "unknown"


if __name__ == "__main__":
    main()
