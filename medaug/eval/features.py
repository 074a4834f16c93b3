"""Feature backbones for distribution metrics, loaded from local files only (nothing is ever downloaded).

Every backbone maps a batch as :class:`~medaug.data.dataset.PreparedSliceDataset` yields it (image
(B, C_max, H, W) float32 in model space [-1, 1], absent channels zero; channel_mask (B, C_max) bool) to
(B, dim) float32 features on the CPU. A weights file that is not supplied, missing or of the wrong layout
raises :class:`BackboneUnavailable`: reports name the backbone as unavailable, never substitute another.

=======================  ============================  =====  =========================================
name                     weights (``path``)            dim    input convention
=======================  ============================  =====  =========================================
``inception-fid``        pytorch-fid's state dict      2048   pytorch-fid: [0, 1] image resized bilinearly
                         ``pt_inception-2015-12-05-*``        (align_corners=False, no antialias) to 299²,
                         ``.pth`` (torch-fidelity uses        then 2x - 1 → [-1, 1]; final average pool
                         the same file), or a
                         TorchScript file                     StyleGAN2-ADA / StyleGAN3 / EDM's scripted
                         (StyleGAN's                          detector: (B, 3, H, W) float32 in [0, 255] at
                         ``inception-2015-12-05.pt``)         the slice's own size (the module resizes
                                                              itself), called with ``return_features=True``
                                                              when its forward takes that argument
``radimagenet-resnet50`` state dict with torchvision's 2048   RadImageNet (as ImageNet): [0, 1] image
                         ResNet-50 names (``fc.`` head        resized bilinearly with antialias to 224²,
                         optional; ``module.`` /              normalized with ImageNet mean (0.485, 0.456,
                         ``backbone.`` prefixes and the       0.406) / std (0.229, 0.224, 0.225); global
                         RadImageNet example's                average pool of layer4
                         ``Sequential`` numbering are
                         accepted)
``clip``                 TorchScript image encoder (or a D    CLIP: [0, 1] image resized bicubically with
                         full CLIP module with                antialias to the model's side (224² unless
                         ``encode_image``) or an ONNX         the ONNX input shape or the module's
                         image encoder (onnxruntime)          ``input_resolution`` says otherwise), clamped
                                                              to [0, 1], normalized with CLIP's mean
                                                              (0.48145466, 0.4578275, 0.40821073) / std
                                                              (0.26862954, 0.26130258, 0.27577711);
                                                              embeddings L2-normalized (as CMMD uses them)
``medaug``               a ``medaug train features`` run      from   medaug's own encoder: all channels at once
                         (or checkpoint) folder               run    with the channel mask, resized to the
                                                                     encoder's side (area average for integer
                                                                     factors, else bilinear with antialias)
=======================  ============================  =====  =========================================

Grey and multi-channel slices: the external backbones were trained on RGB photographs, so each present
channel of a slice runs as its own grey image (copied to R, G and B) and the slice's feature is the mean of
its channels' features (CLIP: of the unit-normalized channel embeddings, normalized again); the feature
size is fixed whatever the domain. The medaug encoder reads every channel of a slice together, as it was
trained. Model space [-1, 1] maps to [0, 1] as (x + 1) / 2 (CT: the domain's window; MR: its percentiles).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medaug.errors import ConfigError, MedaugError
from medaug.eval.nets import INCEPTION_FEATURES, RESNET50_FEATURES, InceptionV3FID, ResNet50

log = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("inception-fid", "radimagenet-resnet50", "clip", "medaug")
FID_SIZE = 299
IMAGENET_SIZE = 224
CLIP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPTIONAL_HEADS = ("fc.",)
WRAPPER_PREFIXES = ("module.", "backbone.", "model.")
# RadImageNet's PyTorch example saves nn.Sequential(*list(resnet50().children())[:9]) under "backbone."
SEQUENTIAL_RESNET_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


class BackboneUnavailable(MedaugError):
    """A backbone's weights were not supplied, are missing, or are not in a layout this loader reads."""


class Backbone(Protocol):
    """(B, C_max, H, W) model-space images + (B, C_max) channel mask → (B, dim) float32 CPU features."""

    name: str
    dim: int

    def __call__(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> Tensor: ...


# ---------------------------------------------------------------- preprocessing (public: tests check them)


def to_unit_range(image: Tensor) -> Tensor:
    """Model space [-1, 1] → [0, 1] ((x + 1) / 2, clamped), float32."""
    return ((image.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def _rgb(grey_N1HW: Tensor) -> Tensor:
    return grey_N1HW.expand(-1, 3, -1, -1)  # (N, 3, H, W)


def _normalize(rgb_N3HW: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_13 = torch.tensor(mean, dtype=rgb_N3HW.dtype, device=rgb_N3HW.device).view(1, 3, 1, 1)
    std_13 = torch.tensor(std, dtype=rgb_N3HW.dtype, device=rgb_N3HW.device).view(1, 3, 1, 1)
    return (rgb_N3HW - mean_13) / std_13


def fid_inception_input(grey_N1HW: Tensor) -> Tensor:
    """pytorch-fid's input: [0, 1] image, bilinear resize to 299² (align_corners=False), 2x - 1 → (N, 3, 299, 299)."""
    unit = F.interpolate(to_unit_range(grey_N1HW), size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
    return _rgb(2.0 * unit - 1.0)


def stylegan_inception_input(grey_N1HW: Tensor) -> Tensor:
    """StyleGAN's scripted FID detector input: (N, 3, H, W) float32 in [0, 255] at the slice's own size."""
    return _rgb(255.0 * to_unit_range(grey_N1HW))


def imagenet_input(grey_N1HW: Tensor, size: int = IMAGENET_SIZE) -> Tensor:
    """RadImageNet/ImageNet input: [0, 1] image, bilinear antialiased resize to ``size``², ImageNet mean/std."""
    unit = F.interpolate(to_unit_range(grey_N1HW), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)
    return _normalize(_rgb(unit), IMAGENET_MEAN, IMAGENET_STD)


def clip_input(grey_N1HW: Tensor, size: int = CLIP_SIZE) -> Tensor:
    """CLIP input: [0, 1] image, bicubic antialiased resize to ``size``² clamped to [0, 1], CLIP mean/std."""
    unit = F.interpolate(to_unit_range(grey_N1HW), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0.0, 1.0)
    return _normalize(_rgb(unit), CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------- backbones


def _check_batch(image_BCHW: Tensor, channel_mask_BC: Tensor) -> None:
    if image_BCHW.ndim != 4 or channel_mask_BC.shape != image_BCHW.shape[:2]:
        raise ConfigError("image_BCHW", f"shape {tuple(image_BCHW.shape)} with channel mask "
                          f"{tuple(channel_mask_BC.shape)}; expected (B, C, H, W) and (B, C)")
    empty = (~channel_mask_BC.bool().any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ConfigError("channel_mask", f"row {int(empty[0])} has no present channel; expected at least one")


@dataclass
class ChannelAveragingBackbone:
    """An RGB-photograph backbone applied per present channel (module docstring).

    ``embed``: grey images (N, 1, H, W) in [-1, 1] on ``device`` → (N, dim) (preprocessing included).
    ``unit_norm``: L2-normalize each channel's embedding and the channel mean (CLIP). ``weights``: the file
    loaded; ``preprocessing``: one line for reports.
    """

    name: str
    dim: int
    embed: Callable[[Tensor], Tensor]
    device: torch.device
    weights: str
    preprocessing: str
    unit_norm: bool = False

    @torch.inference_mode()
    def __call__(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> Tensor:
        _check_batch(image_BCHW, channel_mask_BC)
        mask_BC = channel_mask_BC.bool().cpu()
        rows_N, channels_N = mask_BC.nonzero(as_tuple=True)
        grey_N1HW = image_BCHW.cpu()[rows_N, channels_N].unsqueeze(1).to(self.device, torch.float32)
        features_ND = self.embed(grey_N1HW).float().cpu()
        assert features_ND.shape == (len(rows_N), self.dim), f"{self.name}: got {tuple(features_ND.shape)}"
        if self.unit_norm:
            features_ND = F.normalize(features_ND, dim=1)
        sums_BD = torch.zeros(mask_BC.shape[0], self.dim).index_add_(0, rows_N, features_ND)
        mean_BD = sums_BD / mask_BC.sum(dim=1, keepdim=True).float()
        return F.normalize(mean_BD, dim=1) if self.unit_norm else mean_BD


@dataclass
class MedaugBackbone:
    """medaug's own encoder (:class:`~medaug.eval.nets.FeatureNet`) on whole multi-channel slices."""

    net: nn.Module
    dim: int
    image_size: int
    image_channels: int
    device: torch.device
    weights: str
    name: str = "medaug"
    preprocessing: str = "model space [-1, 1], all channels with their mask, resized to the encoder's side"

    @torch.inference_mode()
    def __call__(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> Tensor:
        _check_batch(image_BCHW, channel_mask_BC)
        image_BCHW, mask_BC = fit_channels(image_BCHW.float(), channel_mask_BC.bool(), self.image_channels)
        image_BCHW = fit_size(image_BCHW, self.image_size)
        features_BD = self.net.embed(image_BCHW.to(self.device), mask_BC.to(self.device))
        return features_BD.float().cpu()


def fit_channels(image_BCHW: Tensor, mask_BC: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (or drop absent) channels to ``channels``; a present channel beyond it is an error."""
    have = image_BCHW.shape[1]
    if have < channels:
        pad = channels - have
        return F.pad(image_BCHW, (0, 0, 0, 0, 0, pad)), F.pad(mask_BC, (0, pad), value=False)
    if have > channels and bool(mask_BC[:, channels:].any()):
        raise ConfigError("channel_mask", f"rows have {have} channels; the medaug encoder was trained on "
                                          f"{channels}; expected data of the domains it was trained on")
    return image_BCHW[:, :channels], mask_BC[:, :channels]


def fit_size(image_BCHW: Tensor, size: int) -> Tensor:
    """Square slices resized to ``size``²: area average for an integer factor down (as training data is
    downsampled), else bilinear with antialias."""
    height, width = image_BCHW.shape[-2:]
    if (height, width) == (size, size):
        return image_BCHW
    if height == width and height % size == 0:
        return F.avg_pool2d(image_BCHW, height // size)
    return F.interpolate(image_BCHW, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------- state dicts


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip with ``constants.pkl`` or ``code/``), False for other files."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path, name: str) -> dict[str, Tensor]:
    """A flat state dict from ``torch.load(weights_only=True)`` (a ``state_dict``/``model`` wrapper is opened)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means: refuse the file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise BackboneUnavailable(path, f"{name}: not a weights-only state dict ({first}); expected a .pth/.pt "
                                        "saved with torch.save(model.state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise BackboneUnavailable(path, f"{name}: holds a {type(loaded).__name__} that is not a tensor dict; "
                                        "expected a state dict")
    return dict(loaded)


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without DataParallel/wrapper prefixes (``module.``, ``backbone.``, ``model.``), repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def sequential_to_resnet_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``0.weight`` → ``conv1.weight``, ``4.0.conv1.weight`` → ``layer1.0.conv1.weight`` (RadImageNet's
    PyTorch example numbering); other keys unchanged."""
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        renamed[f"{SEQUENTIAL_RESNET_NAMES[head]}.{rest}" if head in SEQUENTIAL_RESNET_NAMES else key] = value
    return renamed


def load_strict(module: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> nn.Module:
    """Load ``state`` into ``module`` after dropping optional heads and ``num_batches_tracked``; any other
    missing/unexpected key or shape difference raises BackboneUnavailable naming the first few."""
    state = {key: value for key, value in state.items()
             if not key.startswith(OPTIONAL_HEADS) and not key.endswith("num_batches_tracked")}
    own = {key: value for key, value in module.state_dict().items() if not key.endswith("num_batches_tracked")}
    problems = [f"missing {key}" for key in own if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in own]
    problems += [f"{key} is {tuple(state[key].shape)} not {tuple(own[key].shape)}"
                 for key in own if key in state and state[key].shape != own[key].shape]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BackboneUnavailable(path, f"{name}: {'; '.join(problems[:3])}{more}; expected the layout "
                                        f"{LAYOUTS[name]}")
    module.load_state_dict(state, strict=False)
    return module.eval().requires_grad_(False)


LAYOUTS = {
    "inception-fid": "of pytorch-fid's pt_inception-2015-12-05 state dict",
    "radimagenet-resnet50": "of torchvision's resnet50 state dict",
}


# ---------------------------------------------------------------- TorchScript and ONNX helpers


def _jit_load(path: Path, device: torch.device, name: str) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as error:  # noqa: BLE001 - a broken archive of any kind: unavailable
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise BackboneUnavailable(path, f"{name}: not a loadable TorchScript file ({first})") from None


def _forward_arguments(module: torch.jit.ScriptModule, method: str = "forward") -> list[str]:
    try:
        return [argument.name for argument in getattr(module, method).schema.arguments]
    except (AttributeError, RuntimeError):
        return []


def _features_2d(output: Any) -> Tensor:
    """A module's output as (N, D): the last of a list/tuple, spatial 1x1 dims flattened."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not isinstance(output, Tensor):
        raise TypeError(f"returned {type(output).__name__}; expected a tensor")
    return output.flatten(1) if output.ndim > 2 else output


def _probe_dim(embed: Callable[[Tensor], Tensor], device: torch.device, path: Path, name: str) -> int:
    """Feature size from one forward of a mid-grey 64² slice; a failing forward means the wrong layout."""
    try:
        with torch.inference_mode():
            out = embed(torch.zeros(1, 1, 64, 64, device=device))
    except Exception as error:  # noqa: BLE001 - any failure of the file's own code: unavailable
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise BackboneUnavailable(path, f"{name}: a test forward failed ({first})") from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise BackboneUnavailable(path, f"{name}: returns shape {tuple(out.shape)}; expected (batch, features)")
    return int(out.shape[1])


# ---------------------------------------------------------------- loaders


def load_inception_fid(path: Path, device: torch.device) -> ChannelAveragingBackbone:
    """FID Inception-v3 from pytorch-fid's state dict or a StyleGAN-style TorchScript detector (module docstring)."""
    name = "inception-fid"
    if is_torchscript(path):
        return _inception_torchscript(path, device)
    net = load_strict(InceptionV3FID(), strip_prefixes(read_state_dict(path, name)), path, name).to(device)
    return ChannelAveragingBackbone(name, INCEPTION_FEATURES, lambda grey: net(fid_inception_input(grey)), device,
                                    str(path), "pytorch-fid: bilinear to 299², [-1, 1], grey → RGB, channel mean")


def _inception_torchscript(path: Path, device: torch.device) -> ChannelAveragingBackbone:
    name = "inception-fid"
    module = _jit_load(path, device, name)
    options = {"return_features": True} if "return_features" in _forward_arguments(module) else {}

    def embed(grey_N1HW: Tensor) -> Tensor:
        return _features_2d(module(stylegan_inception_input(grey_N1HW), **options))

    dim = _probe_dim(embed, device, path, name)
    if dim != INCEPTION_FEATURES:
        raise BackboneUnavailable(path, f"{name}: the TorchScript module returns {dim} values; expected the "
                                        f"{INCEPTION_FEATURES} pool features (StyleGAN's detector, "
                                        "return_features=True)")
    return ChannelAveragingBackbone(name, dim, embed, device, str(path),
                                    "StyleGAN TorchScript detector: [0, 255] at native size, grey → RGB, channel mean")


def load_radimagenet_resnet50(path: Path, device: torch.device) -> ChannelAveragingBackbone:
    """RadImageNet ResNet-50 from a state dict with torchvision's names (module docstring)."""
    name = "radimagenet-resnet50"
    state = sequential_to_resnet_names(strip_prefixes(read_state_dict(path, name)))
    net = load_strict(ResNet50(), state, path, name).to(device)
    return ChannelAveragingBackbone(name, RESNET50_FEATURES, lambda grey: net(imagenet_input(grey)), device, str(path),
                                    "RadImageNet: bilinear to 224², ImageNet mean/std, grey → RGB, channel mean")


def load_clip(path: Path, device: torch.device) -> ChannelAveragingBackbone:
    """A CLIP image encoder from TorchScript or ONNX (module docstring); embeddings unit-normalized."""
    embed, size = _clip_torchscript(path, device) if is_torchscript(path) else _clip_onnx(path, device)
    dim = _probe_dim(embed, device, path, "clip")
    return ChannelAveragingBackbone("clip", dim, embed, device, str(path),
                                    f"CLIP: bicubic to {size}², CLIP mean/std, grey → RGB, unit-norm channel mean",
                                    unit_norm=True)


def _clip_torchscript(path: Path, device: torch.device) -> tuple[Callable[[Tensor], Tensor], int]:
    module = _jit_load(path, device, "clip")
    size = _input_resolution(module)
    encode = module.encode_image if hasattr(module, "encode_image") else module

    def embed(grey_N1HW: Tensor) -> Tensor:
        return _features_2d(encode(clip_input(grey_N1HW, size)))

    return embed, size


def _input_resolution(module: nn.Module) -> int:
    """``input_resolution`` of a CLIP module (OpenAI's TorchScript keeps it on the model or ``visual``), else 224."""
    for owner in (module, getattr(module, "visual", None)):
        value = getattr(owner, "input_resolution", None) if owner is not None else None
        if isinstance(value, Tensor) and value.numel() == 1:
            return int(value.item())
        if isinstance(value, int):
            return value
    return CLIP_SIZE


def _clip_onnx(path: Path, device: torch.device) -> tuple[Callable[[Tensor], Tensor], int]:
    try:
        import onnxruntime
    except ImportError:
        raise BackboneUnavailable(path, "clip: onnxruntime is not installed; expected `pip install "
                                        "onnxruntime`") from None
    session = _onnx_session(onnxruntime, path, device)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, "3"):
        described = [(item.name, item.shape) for item in inputs]
        raise BackboneUnavailable(path, f"clip: ONNX inputs {described}; expected one image input (batch, 3, H, W)")
    size = _onnx_side(inputs[0].shape)
    input_name, dtype = inputs[0].name, np.float16 if inputs[0].type == "tensor(float16)" else np.float32
    output_name = _onnx_output(session)

    def embed(grey_N1HW: Tensor) -> Tensor:
        pixels = clip_input(grey_N1HW, size).cpu().numpy().astype(dtype)
        (output,) = session.run([output_name], {input_name: pixels})
        return _features_2d(torch.from_numpy(np.asarray(output, dtype=np.float32)))

    return embed, size


def _onnx_session(onnxruntime: Any, path: Path, device: torch.device) -> Any:
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own error types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise BackboneUnavailable(path, f"clip: neither TorchScript nor a readable ONNX model ({first})") from None


def _onnx_side(shape: Sequence[Any]) -> int:
    """The static square side of an ONNX image input, else CLIP's 224."""
    height, width = shape[2], shape[3]
    if isinstance(height, int) and height == width and height > 0:
        return height
    return CLIP_SIZE


def _onnx_output(session: Any) -> str:
    """``image_embeds`` (Hugging Face's export) when present, else the first output."""
    names = [output.name for output in session.get_outputs()]
    return "image_embeds" if "image_embeds" in names else names[0]


def load_medaug(path: Path, device: torch.device) -> MedaugBackbone:
    """medaug's encoder from a ``medaug train features`` run or checkpoint folder."""
    from medaug.train.features_task import load_feature_net

    if not path.is_dir():
        raise BackboneUnavailable(path, "medaug: expected a `medaug train features` run or checkpoint folder")
    try:
        net, _ = load_feature_net(path, device)
    except MedaugError as error:
        raise BackboneUnavailable(path, f"medaug: {error}") from None
    config = net.config
    return MedaugBackbone(net, config.feature_dim, config.image_size, config.image_channels, device, str(path))


LOADERS: dict[str, Callable[[Path, torch.device], Backbone]] = {
    "inception-fid": load_inception_fid,
    "radimagenet-resnet50": load_radimagenet_resnet50,
    "clip": load_clip,
    "medaug": load_medaug,
}


def load_backbone(name: str, path: str | Path | None, device: str | torch.device = "cpu") -> Backbone:
    """The backbone ``name`` (one of :data:`BACKBONES`) from local weights ``path`` on ``device``.

    Raises :class:`BackboneUnavailable` (one line) when ``path`` is None, missing or of the wrong layout,
    and ConfigError for an unknown name. Nothing is downloaded.
    """
    if name not in LOADERS:
        raise ConfigError("backbone", f"is {name!r}; allowed values: {', '.join(BACKBONES)}")
    if path is None:
        raise BackboneUnavailable(name, "no weights supplied (--backbone NAME=PATH); weights are never downloaded")
    path = Path(path).expanduser()
    if not path.exists():
        raise BackboneUnavailable(path, f"{name}: not found; expected a local weights file or folder")
    if name != "medaug" and not path.is_file():
        raise BackboneUnavailable(path, f"{name}: is a folder; expected a weights file")
    backbone = LOADERS[name](path, torch.device(device))
    log.info("backbone %s (%d features) from %s", name, backbone.dim, path)
    return backbone


# ---------------------------------------------------------------- extraction


def _read_batch(dataset: Any, positions: np.ndarray) -> dict[str, Any]:
    """A batch dict from ``dataset.read_batch`` when it has one, else its items stacked."""
    if hasattr(dataset, "read_batch"):
        return dataset.read_batch(positions.tolist())
    items = [dataset[int(position)] for position in positions]
    return {"image": torch.stack([item["image"] for item in items]),
            "channel_mask": torch.stack([torch.as_tensor(item["channel_mask"]) for item in items])}


def extract_features(backbone: Backbone, dataset: Any, batch_size: int = 64,
                     indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """(N, dim) float64 features of ``dataset``'s rows (all, or ``indices`` in that order), ``batch_size``
    rows per forward. ``dataset``: a PreparedSliceDataset (or anything with ``read_batch``/items holding
    ``image`` (C, H, W) and ``channel_mask`` (C,))."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"is {batch_size}; expected an integer >= 1")
    positions = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    features_ND = np.empty((len(positions), backbone.dim), dtype=np.float64)
    for start in range(0, len(positions), batch_size):
        batch = _read_batch(dataset, positions[start:start + batch_size])
        features_BD = backbone(batch["image"].float(), batch["channel_mask"].bool())
        features_ND[start:start + len(features_BD)] = features_BD.double().numpy()
        log.debug("%s: features of %d/%d rows", backbone.name, start + len(features_BD), len(positions))
    return features_ND


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneUnavailable",
    "ChannelAveragingBackbone",
    "MedaugBackbone",
    "clip_input",
    "extract_features",
    "fid_inception_input",
    "imagenet_input",
    "load_backbone",
    "stylegan_inception_input",
    "to_unit_range",
]
