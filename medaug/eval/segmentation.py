"""A 2D segmentation UNet on medaug slices: build, train, predict, score (issue 11; ``medaug evaluate downstream``).

The machinery that ``examples/train_unet_monai.py`` and :mod:`medaug.eval.downstream` share:

* :func:`build_unet`: MONAI's 2D ``UNet`` with one output per class plus background;
* :class:`IgnoringDiceCELoss`: Dice + cross-entropy that leave pixels labelled 255 out of both terms;
* :func:`augment_transforms`: ``RandAffined`` on image and label together (nearest for the label) and
  ``RandGaussianNoised`` on the image; no left-right flip (it would swap laterality, DESIGN §4);
* :func:`train_segmenter`: a fixed number of optimizer steps on one process, with a learning curve;
* :func:`predict` and :func:`score_segmentation`: class ids on a dataset, then Dice (MONAI ``DiceMetric``)
  and HD95 in mm (MONAI ``HausdorffDistanceMetric``, percentile 95, each slice's pixel spacing);
* :func:`mask_fidelity`: how well a UNet trained on real slices agrees with the generated masks.

Datasets are those of :mod:`medaug.monai` with ``classes=`` (labels are consecutive class ids, 0 background,
255 ignore) or anything yielding the same items. Everything is deterministic on the CPU: the same seed gives
the same weights and numbers (the seed fixes the weight initialisation, the sampler's generator and the
transforms' random state; DataLoader workers default to 0).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, list_data_collate
from monai.data.utils import worker_init_fn
from monai.losses import MaskedDiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks import one_hot
from monai.networks.nets import UNet
from monai.transforms import Compose, RandAffined, RandGaussianNoised, apply_transform
from torch.utils.data import DataLoader, Dataset, RandomSampler

from medaug.errors import ConfigError
from medaug.vocab import IGNORE

log = logging.getLogger(__name__)

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
HD_PERCENTILE = 95.0
_SCORE_CHUNK = 64  # slices one-hot encoded at a time while scoring


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: cuda when available, else cpu; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_unet(in_channels: int, num_classes: int, channels: Sequence[int] = DEFAULT_CHANNELS) -> UNet:
    """A MONAI 2D UNet: ``in_channels`` image channels in, ``num_classes`` structures + background out.

    ``channels``: feature maps per level (at least two levels), halving the resolution between levels;
    one residual unit per block.
    """
    widths = tuple(int(width) for width in channels)
    if len(widths) < 2 or min(widths) < 1:
        raise ConfigError("channels", f"is {list(widths)}; expected two or more positive widths, e.g. [16, 32, 64]")
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes + 1, channels=widths,
                strides=(2,) * (len(widths) - 1), num_res_units=1)


class IgnoringDiceCELoss(torch.nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` with pixels labelled 255 left out of both terms.

    Dice: ``MaskedDiceLoss`` (softmax first, then the mask); cross-entropy: ``ignore_index``. Equal to
    ``DiceCELoss`` when no pixel is ignored. Inputs: logits (B, K, H, W) float, label (B, 1, H, W) class ids.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)

    def forward(self, logits_BKHW: torch.Tensor, label_B1HW: torch.Tensor) -> torch.Tensor:
        valid_B1HW = label_B1HW != IGNORE
        target_B1HW = torch.where(valid_B1HW, label_B1HW, 0)
        dice = self.dice(logits_BKHW, target_B1HW, mask=valid_B1HW)
        if not bool(valid_B1HW.any()):
            return dice
        return dice + F.cross_entropy(logits_BKHW, label_B1HW[:, 0].long(), ignore_index=IGNORE)


def augment_transforms(seed: int) -> Compose:
    """Geometry on image and label together (the label resampled nearest), intensity noise on the image only.

    Rotation up to ±15°, scale ±10 %, shift up to 4 pixels (prob 0.8); Gaussian noise std 0.05 in model
    space (prob 0.5). The random state is seeded with ``seed``.
    """
    transforms = Compose([
        RandAffined(keys=["image", "label"], prob=0.8, rotate_range=0.26, scale_range=(0.1, 0.1),
                    translate_range=(4, 4), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(keys="image", prob=0.5, std=0.05),
    ])
    transforms.set_random_state(seed)
    return transforms


class AugmentedDataset(Dataset):
    """``base``'s items through ``transform`` (a whole batch read in one call when ``base`` can).

    ``set_epoch`` passes on to ``base`` (a :class:`~medaug.monai.MixedDataset` moves on to other synthetic
    items); the transform is an attribute, so MONAI's ``worker_init_fn`` reseeds it per DataLoader worker.
    """

    def __init__(self, base: Dataset, transform: Any):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        return apply_transform(self.transform, self.base[index])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        items = self.base.__getitems__(list(indices)) if hasattr(self.base, "__getitems__") else [
            self.base[index] for index in indices]
        return [apply_transform(self.transform, item) for item in items]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


def dataset_class_names(dataset: Dataset) -> tuple[str, ...]:
    """The ``class_names`` of a dataset, or of the dataset it wraps (``Subset``, :class:`AugmentedDataset`,
    ``MixedDataset``); raises ConfigError when none has them."""
    stack = [dataset]
    while stack:
        current = stack.pop(0)
        names = getattr(current, "class_names", None)
        if names:
            return tuple(names)
        stack += [getattr(current, key) for key in ("dataset", "base", "real", "synthetic") if hasattr(current, key)]
    raise ConfigError("train_set", "has no class_names; expected a medaug.monai dataset built with classes=[...] "
                      "or pass class_names")


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def _loader(dataset: Dataset, batch_size: int, sampler: Any = None, workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader batching MONAI items; workers (if any) reseed the transforms from the loader's generator."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=list_data_collate, worker_init_fn=worker_init_fn if workers else None,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _Schedule:
    steps: int
    eval_every: int | None

    def due(self, step: int) -> bool:
        """A learning-curve point after this step: every ``eval_every`` steps and after the last one."""
        return step == self.steps or (self.eval_every is not None and step % self.eval_every == 0)


def train_segmenter(
    train_set: Dataset,
    *,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    eval_set: Dataset | None = None,
    eval_every: int | None = None,
    augment: bool = True,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    class_names: Sequence[str] | None = None,
    num_workers: int = 0,
) -> tuple[UNet, list[dict[str, Any]]]:
    """Train :func:`build_unet` for exactly ``steps`` AdamW steps with :class:`IgnoringDiceCELoss`.

    Items are drawn in a seeded random order, epoch after epoch (``set_epoch`` is called on datasets that
    have it); ``augment`` applies :func:`augment_transforms` (seeded by ``seed``). ``class_names`` default to
    the dataset's. Returns (the model in eval mode, curve): one point ``{step, loss, val_dice}`` every
    ``eval_every`` steps and after the last, ``loss`` the mean training loss since the previous point,
    ``val_dice`` the mean over classes of :func:`score_segmentation`'s Dice on ``eval_set`` (None without).
    The global torch RNG state is restored afterwards.
    """
    if steps < 1 or batch_size < 1:
        raise ConfigError("steps", f"steps {steps}, batch_size {batch_size}; expected both >= 1")
    names = tuple(class_names) if class_names else dataset_class_names(train_set)
    device = resolve_device(device)
    data = AugmentedDataset(train_set, augment_transforms(seed)) if augment else train_set
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        in_channels = int(_plain(train_set[0]["image"]).shape[0])
        model = build_unet(in_channels, len(names), channels).to(device)
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
        loader = _loader(data, batch_size, sampler, num_workers, seed)
        curve = _run_steps(model, loader, data, _Schedule(steps, eval_every), lr, device, (eval_set, names, batch_size))
    return model.eval(), curve


def _run_steps(model: torch.nn.Module, loader: DataLoader, data: Dataset, schedule: _Schedule, lr: float,
               device: torch.device, evaluation: tuple[Dataset | None, Sequence[str], int]) -> list[dict[str, Any]]:
    """``schedule.steps`` optimizer steps over as many epochs as needed; returns the learning curve."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = IgnoringDiceCELoss()
    losses: list[float] = []
    curve: list[dict[str, Any]] = []
    epoch = 0
    model.train()
    while len(losses) < schedule.steps:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        for batch in loader:
            image_BCHW, label_B1HW = _plain(batch["image"]).to(device), _plain(batch["label"]).to(device)
            loss = loss_fn(model(image_BCHW), label_B1HW)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if schedule.due(len(losses)):
                curve.append(_curve_point(model, losses, curve, evaluation, device))
            if len(losses) == schedule.steps:
                break
        epoch += 1
    return curve


def _curve_point(model: torch.nn.Module, losses: list[float], curve: list[dict[str, Any]],
                 evaluation: tuple[Dataset | None, Sequence[str], int], device: torch.device) -> dict[str, Any]:
    eval_set, names, batch_size = evaluation
    since = curve[-1]["step"] if curve else 0
    point = {"step": len(losses), "loss": float(np.mean(losses[since:])), "val_dice": None}
    if eval_set is not None and len(eval_set):
        predicted = predict(model, eval_set, batch_size, device)
        point["val_dice"] = mean_over_classes(dice_per_class(predicted.pred_NHW, predicted.label_NHW, names), "dice")
    log.debug("step %d loss %.4f val dice %s", point["step"], point["loss"], point["val_dice"])
    return point


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class Predictions:
    """Class ids a model predicts for every item of a dataset, in the dataset's order, and what scoring needs.

    ``pred_NHW``/``label_NHW``: uint8 class ids (label 255 = ignore); ``spacing_N2``: float64 pixel spacing
    [row, col] in mm of each slice; ``domains``: each slice's domain.
    """

    pred_NHW: torch.Tensor
    label_NHW: torch.Tensor
    spacing_N2: np.ndarray
    domains: list[str]


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, batch_size: int = 16,
            device: str | torch.device = "cpu") -> Predictions:
    """Argmax class ids of ``model`` on every item of ``dataset`` (in order, no augmentation), with the
    items' labels, spacings (``label.meta["spacing"]``, mm) and domains. The model's train/eval mode is kept."""
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    preds, labels, spacings, domains = [], [], [], []
    for batch in _loader(dataset, batch_size):
        logits_BKHW = model(_plain(batch["image"]).to(device))
        preds.append(logits_BKHW.argmax(dim=1).to("cpu", torch.uint8))
        labels.append(_plain(batch["label"])[:, 0].to(torch.uint8))
        spacings.append(np.asarray(_plain(batch["label"].meta["spacing"]), dtype=np.float64).reshape(-1, 2))
        domains += list(batch["domain"])
    model.train(was_training)
    if not preds:
        empty = torch.zeros((0, 0, 0), dtype=torch.uint8)
        return Predictions(empty, empty.clone(), np.zeros((0, 2)), [])
    return Predictions(torch.cat(preds), torch.cat(labels), np.concatenate(spacings), domains)


# ---------------------------------------------------------------------------------------------- scoring


def _masked(pred_NHW: torch.Tensor, label_NHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as int64 with background (0) where the label is 255: ignored pixels count on neither side."""
    pred, label = torch.as_tensor(pred_NHW).long(), torch.as_tensor(label_NHW).long()
    if pred.shape != label.shape:
        raise ConfigError("pred", f"has shape {tuple(pred.shape)}, label {tuple(label.shape)}; "
                          "expected equal (N, H, W)")
    valid = label != IGNORE
    return torch.where(valid, pred, 0), torch.where(valid, label, 0)


def dice_per_slice(pred_NHW: torch.Tensor, label_NHW: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) float Dice of classes 1..num_classes per slice (MONAI ``DiceMetric``); NaN where the
    label has none of the class (``ignore_empty``). Pixels labelled 255 are left out."""
    pred, label = _masked(pred_NHW, label_NHW)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = [torch.zeros((0, num_classes))]
    for start in range(0, len(pred), _SCORE_CHUNK):
        chunk = slice(start, start + _SCORE_CHUNK)
        scores.append(metric(y_pred=one_hot(pred[chunk, None], num_classes + 1),
                             y=one_hot(label[chunk, None], num_classes + 1)).float())
    return torch.cat(scores)


def dice_per_class(pred_NHW: torch.Tensor, label_NHW: torch.Tensor,
                   classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class name (class k = ``classes[k - 1]``): ``dice`` (mean over the slices whose label holds the
    class; None when none does) and ``n_dice`` (those slices)."""
    dice_NK = dice_per_slice(pred_NHW, label_NHW, len(classes))
    scores = {}
    for k, name in enumerate(classes):
        values = dice_NK[:, k][~torch.isnan(dice_NK[:, k])]
        scores[name] = {"dice": float(values.mean()) if len(values) else None, "n_dice": int(len(values))}
    return scores


def hd95_per_slice(pred_NHW: torch.Tensor, label_NHW: torch.Tensor, class_id: int,
                   spacing_N2: np.ndarray) -> tuple[np.ndarray, int]:
    """HD95 in mm of one class on the slices where both prediction and label hold it (MONAI
    ``HausdorffDistanceMetric``, percentile 95, symmetric, each slice's spacing [row, col] mm), and the count
    of slices where exactly one side holds it (HD95 undefined there: skipped). Pixels labelled 255 are left out."""
    pred, label = _masked(pred_NHW, label_NHW)
    has_pred_N, has_label_N = (pred == class_id).flatten(1).any(1), (label == class_id).flatten(1).any(1)
    rows = torch.nonzero(has_pred_N & has_label_N).flatten()
    skipped = int((has_pred_N ^ has_label_N).sum())
    metric = HausdorffDistanceMetric(include_background=False, percentile=HD_PERCENTILE, reduction="none")
    distances = [np.zeros(0)]
    for start in range(0, len(rows), _SCORE_CHUNK):
        chunk = rows[start:start + _SCORE_CHUNK]
        pred_N1HW, label_N1HW = (pred[chunk] == class_id).long()[:, None], (label[chunk] == class_id).long()[:, None]
        spacing = [tuple(float(s) for s in spacing_N2[int(row)]) for row in chunk]
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal call of get_mask_edges
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            values = metric(y_pred=one_hot(pred_N1HW, 2), y=one_hot(label_N1HW, 2), spacing=spacing)
        distances.append(values[:, 0].double().numpy())
    return np.concatenate(distances), skipped


def score_segmentation(pred_NHW: torch.Tensor, label_NHW: torch.Tensor, classes: Sequence[str],
                       spacing_N2: np.ndarray | Sequence[float]) -> dict[str, dict[str, Any]]:
    """Dice and HD95 per class of predicted against true class ids (N, H, W) (0 background, class k =
    ``classes[k - 1]``, label 255 = ignore: left out of both metrics).

    ``spacing_N2``: pixel spacing [row, col] mm per slice, or one pair for all. Per class name:
    ``dice``/``n_dice`` (:func:`dice_per_class`: mean over slices whose label holds the class),
    ``hd95_mm``/``n_hd95`` (mean over slices where both sides hold it) and ``hd95_skipped`` (slices where
    only one side does). Means are None when no slice counts.
    """
    label = torch.as_tensor(label_NHW)
    spacing = np.broadcast_to(np.asarray(spacing_N2, dtype=np.float64), (len(label), 2))
    scores = dice_per_class(pred_NHW, label, classes)
    for k, name in enumerate(classes, start=1):
        distances, skipped = hd95_per_slice(pred_NHW, label, k, spacing)
        scores[name].update(hd95_mm=float(distances.mean()) if distances.size else None, n_hd95=int(distances.size),
                            hd95_skipped=skipped)
    return scores


def mean_over_classes(scores: dict[str, dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the classes that have a value (None when none has)."""
    values = [entry[key] for entry in scores.values() if entry.get(key) is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------- mask fidelity


def same_domain_partners(domains: Sequence[str], seed: int) -> np.ndarray:
    """(N,) int64: for every slice another slice of its domain (a fixed derangement per domain, seeded),
    -1 for a slice alone in its domain."""
    generator = np.random.default_rng(seed)
    domains_N = np.asarray(list(domains), dtype=object)
    partners_N = np.full(len(domains_N), -1, dtype=np.int64)
    for domain in sorted(set(domains_N.tolist())):
        rows = np.flatnonzero(domains_N == domain)
        if rows.size < 2:
            continue
        order = rows[generator.permutation(rows.size)]
        partners_N[order] = np.roll(order, -1)  # a cycle through the shuffled rows: nobody keeps its own
    return partners_N


def mask_fidelity(model: torch.nn.Module, real_test: Dataset, synthetic: Dataset, classes: Sequence[str],
                  batch_size: int = 16, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per structure: Dice of ``model``'s predictions on the synthetic images against the generated masks
    (``synthetic_dice``), on the real test images against their masks (``real_test_dice``), and a shuffled
    baseline (``shuffled_real_dice``): the real test predictions against the masks of other real test slices
    of the same domain (:func:`same_domain_partners`), the agreement that image-independent features such as
    the usual position of an organ already give. Counts: slices scored (``n_synthetic``, ``n_real``,
    ``n_shuffled``). Both datasets label with the same ``classes``."""
    on_synthetic = predict(model, synthetic, batch_size, device)
    on_real = predict(model, real_test, batch_size, device)
    partners = same_domain_partners(on_real.domains, seed)
    paired = np.flatnonzero(partners >= 0)
    shuffled_label_NHW = on_real.label_NHW[torch.from_numpy(partners[paired])]
    scored = {"synthetic": dice_per_class(on_synthetic.pred_NHW, on_synthetic.label_NHW, classes),
              "real": dice_per_class(on_real.pred_NHW, on_real.label_NHW, classes),
              "shuffled": dice_per_class(on_real.pred_NHW[torch.from_numpy(paired)], shuffled_label_NHW, classes)}
    return {name: {"synthetic_dice": scored["synthetic"][name]["dice"], "real_test_dice": scored["real"][name]["dice"],
                   "shuffled_real_dice": scored["shuffled"][name]["dice"],
                   "n_synthetic": scored["synthetic"][name]["n_dice"], "n_real": scored["real"][name]["n_dice"],
                   "n_shuffled": scored["shuffled"][name]["n_dice"]}
            for name in classes}


__all__ = [
    "AugmentedDataset",
    "DEFAULT_CHANNELS",
    "IgnoringDiceCELoss",
    "Predictions",
    "augment_transforms",
    "build_unet",
    "dataset_class_names",
    "dice_per_class",
    "dice_per_slice",
    "hd95_per_slice",
    "mask_fidelity",
    "mean_over_classes",
    "predict",
    "resolve_device",
    "same_domain_partners",
    "score_segmentation",
    "train_segmenter",
]
