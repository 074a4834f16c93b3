"""Train a MONAI 2D UNet on real + synthetic medaug slices; report Dice on the real test split.

    python examples/train_unet_monai.py --real prepared/ --synthetic synthetic/ --ratio 0.5 \\
        --structure prostate --steps 2000
    torchrun --nproc_per_node 2 examples/train_unet_monai.py --real prepared/ --synthetic synthetic/ ...

The ``medaug.monai`` datasets in a plain MONAI loop:

* ``SliceDataset`` (real train and test slices) and ``SyntheticDataset`` (a ``medaug synthesize`` folder), with
  ``classes=`` turning vocabulary ids into consecutive class ids (``--structure prostate`` → 1 for the prostate and
  its zones, 0 background, 255 where a slice does not annotate the prostate);
* ``MixedDataset`` at ``--ratio`` synthetic; under torchrun each process reads its ``DistributedSampler`` share;
* dictionary transforms: ``RandAffined`` on image and label together (nearest for the label), ``RandGaussianNoised``
  on the image only; no left-right flip (it would swap laterality, DESIGN §4);
* a MONAI ``UNet``, Dice + cross-entropy that skip ignore (255) pixels, ``DiceMetric`` and HD95 on the real test split.

The UNet, the loss, the augmentation and the scoring come from ``medaug.eval.segmentation``, which
``medaug evaluate downstream`` uses too; this script adds the multi-process (torchrun) training loop.

Prints one JSON summary; with ``--out`` also writes ``summary.json`` and ``model.pt`` (the UNet's state dict).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.networks.nets import UNet
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, RandomSampler

from medaug.eval.segmentation import (
    IgnoringDiceCELoss,
    augment_transforms,
    build_unet,
    mean_over_classes,
    predict,
    score_segmentation,
)
from medaug.monai import MixedDataset, SliceDataset, SyntheticDataset, annotating_domains

log = logging.getLogger("train_unet_monai")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="prepared dataset folder (medaug prepare)")
    parser.add_argument("--synthetic", type=Path, help="synthetic folder (medaug synthesize); omit for real only")
    parser.add_argument("--ratio", "--synthetic-fraction", dest="ratio", type=float, default=0.5,
                        help="fraction of synthetic slices in each epoch, 0..1 (default 0.5)")
    parser.add_argument("--structure", action="append", help="structure to segment, a vocabulary name, repeatable "
                        "(default prostate); its sub-structures count as it")
    parser.add_argument("--domain", action="append", help="domain to train on, repeatable (default: every domain "
                        "whose slices annotate all the structures)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--features", default="16,32,64,128", help="UNet channels per level (default 16,32,64,128)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, help="folder for summary.json and model.pt")
    args = parser.parse_args(argv)
    args.structure = args.structure or ["prostate"]
    if not 0.0 <= args.ratio <= 1.0:
        parser.error(f"--ratio is {args.ratio}; expected a fraction in [0, 1]")
    return args


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, device


def build_datasets(args: argparse.Namespace, rank: int) -> tuple[Dataset, SliceDataset, list[str]]:
    """(train set: real, or real + synthetic mixed at --ratio; real test set; domains)."""
    domains = args.domain or annotating_domains(args.real, args.structure)
    if not domains:
        raise SystemExit(f"no domain of {args.real} annotates {args.structure}; pass --domain or other --structure")
    channels = "domain" if len(domains) == 1 else "max"
    options = {"domains": domains, "channels": channels, "classes": args.structure}
    real = SliceDataset(args.real, split="train", transform=augment_transforms(args.seed + rank), **options)
    test = SliceDataset(args.real, split="test", **options)
    if args.synthetic is None or args.ratio == 0.0:
        return real, test, domains
    synthetic = SyntheticDataset(args.synthetic, transform=augment_transforms(args.seed + rank + 10_000), **options)
    return MixedDataset(real, synthetic, synthetic_fraction=args.ratio, seed=args.seed), test, domains


def build_model(in_channels: int, num_classes: int, features: str) -> UNet:
    """``medaug.eval.segmentation.build_unet`` with the channels per level from ``features`` ("16,32,64,128")."""
    return build_unet(in_channels, num_classes, tuple(int(width) for width in features.split(",")))


def train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    train_set, test_set, domains = build_datasets(args, rank)
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    model = build_model(test_set.num_channels or 1, len(test_set.class_names), args.features).to(device)
    trained = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr)
    loss_fn = IgnoringDiceCELoss()
    started = time.perf_counter()
    losses, seen = run_steps(args, loader, sampler, train_set, trained, optimizer, loss_fn, device)
    summary = {
        "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1], "domains": domains,
        "classes": list(test_set.class_names), "train_real": getattr(train_set, "n_real", len(train_set)),
        "train_synthetic": getattr(train_set, "n_synthetic", 0), "seen_items": seen[1],
        "seen_synthetic_fraction": seen[0] / seen[1],
        "world_size": world, "device": str(device), "train_seconds": round(time.perf_counter() - started, 2),
    }
    summary.update(evaluate(model, test_set, args.batch_size, device, rank))
    if rank == 0:
        write_outputs(args.out, summary, model)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def run_steps(args: argparse.Namespace, loader: DataLoader, sampler: Any, train_set: Dataset, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
              device: torch.device) -> tuple[list[float], tuple[int, int]]:
    """``args.steps`` optimizer steps over as many epochs as needed; (losses, (synthetic seen, seen))."""
    losses: list[float] = []
    counts = torch.zeros(2, dtype=torch.float64)  # synthetic items, all items (summed over ranks)
    epoch = 0
    while len(losses) < args.steps:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if isinstance(train_set, MixedDataset):
            train_set.set_epoch(epoch)  # other synthetic samples each epoch (workers start after this)
        for batch in loader:
            image_BCHW, label_B1HW = batch["image"].to(device), batch["label"].to(device)
            loss = loss_fn(model(image_BCHW.as_tensor()), label_B1HW.as_tensor())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            counts += torch.tensor([float(batch["image"].meta["synthetic"].sum()), float(len(image_BCHW))],
                                   dtype=torch.float64)
            if len(losses) % args.log_every == 0:
                log.info("step %d loss %.4f", len(losses), losses[-1])
            if len(losses) == args.steps:
                break
        epoch += 1
    if dist.is_initialized():
        dist.all_reduce(counts)
    return losses, (int(counts[0]), int(counts[1]))


def evaluate(model: torch.nn.Module, test_set: SliceDataset, batch_size: int, device: torch.device,
             rank: int = 0) -> dict[str, Any]:
    """Dice and HD95 (mm) per class on the real test split (``medaug.eval.segmentation.score_segmentation``:
    Dice is the mean over the slices that contain the class, ignore pixels left out); rank 0 scores the whole
    split, other ranks return nothing.

    ``test_dice`` is the mean over classes; a class in no test slice has Dice None.
    """
    if rank != 0:
        return {}
    predicted = predict(model, test_set, batch_size, device)
    scores = score_segmentation(predicted.pred_NHW, predicted.label_NHW, test_set.class_names, predicted.spacing_N2)
    rounded = {key: {name: None if entry[key] is None else round(entry[key], 6) for name, entry in scores.items()}
               for key in ("dice", "hd95_mm")}
    return {"test_slices": len(test_set), "test_dice_per_class": rounded["dice"],
            "test_hd95_mm_per_class": rounded["hd95_mm"], "test_dice": mean_over_classes(scores, "dice")}


def write_outputs(out: Path | None, summary: dict[str, Any], model: torch.nn.Module) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = train(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
