"""Feature backbones (medaug.eval.features, medaug.eval.nets): every loader through its real loading code,
with random weights saved in the real layouts (pytorch-fid's and torchvision's state-dict names, TorchScript
files, a small ONNX export), checked against preprocessing formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medaug.errors import ConfigError
from medaug.eval.features import (
    BACKBONES,
    BackboneUnavailable,
    ChannelAveragingBackbone,
    extract_features,
    load_backbone,
)
from medaug.eval.nets import InceptionV3FID, ResNet50

# torchvision's published parameter counts: inception_v3 27,161,264 (with AuxLogits 3,326,696 and a
# 1000-way fc 2,049,000); resnet50 25,557,032 (fc 2,049,000). The trunks without those heads:
INCEPTION_TRUNK_PARAMETERS = 27_161_264 - 3_326_696 - 2_049_000
RESNET50_TRUNK_PARAMETERS = 25_557_032 - 2_049_000
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Full-size Inception/ResNet forwards on one torch thread: on a shared 2-core runner, two OpenMP
    threads spin-wait for each other and ran these tests 5-10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of ``module`` with random weights and BatchNorm statistics (so no layer is an identity)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith(("running_var", "bn.weight")) or ("bn" in key and key.endswith("weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif value.ndim >= 2:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state


def slices(seed: int = 0, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two model-space rows of 2 channels: row 0 has one channel (the other zero), row 1 both."""
    generator = torch.Generator().manual_seed(seed)
    image_BCHW = torch.rand(2, 2, side, side, generator=generator) * 2 - 1
    image_BCHW[0, 1] = 0
    return image_BCHW, torch.tensor([[True, False], [True, True]])


def channel_mean(features_of_grey, image_BCHW: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    """The documented multi-channel rule: each present channel as a grey image, features averaged."""
    rows = []
    for b in range(image_BCHW.shape[0]):
        present = [features_of_grey(image_BCHW[b, c]) for c in range(image_BCHW.shape[1]) if mask_BC[b, c]]
        rows.append(torch.stack(present).mean(dim=0))
    return torch.stack(rows)


# ---------------------------------------------------------------- architectures and names


def test_inception_has_pytorch_fid_names_and_torchvision_size():
    state = InceptionV3FID().state_dict()
    parameters = sum(p.numel() for p in InceptionV3FID().parameters())
    assert parameters == INCEPTION_TRUNK_PARAMETERS
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7a.branch7x7x3_4.conv.weight"].shape == (192, 192, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert "Mixed_7c.branch_pool.bn.running_var" in state
    assert not any(key.startswith(("fc.", "AuxLogits.")) for key in state)


def test_resnet50_has_torchvision_names_and_size():
    state = ResNet50().state_dict()
    assert sum(p.numel() for p in ResNet50().parameters()) == RESNET50_TRUNK_PARAMETERS
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert "layer3.5.bn3.running_mean" in state and "layer3.6.conv1.weight" not in state


def test_fid_average_pools_leave_padding_out_and_the_last_block_max_pools():
    """The FID graph's patches: a constant input stays constant through the A block's pool branch only
    when padded zeros are left out of the mean; Mixed_7c's pool branch is a max pool."""
    net = InceptionV3FID().eval()
    block = net.Mixed_5b
    seen = {}
    block.branch_pool.conv.register_forward_hook(lambda module, inputs, output: seen.update(a=inputs[0]))
    net.Mixed_7c.branch_pool.conv.register_forward_hook(lambda module, inputs, output: seen.update(e=inputs[0]))
    x = torch.full((1, 192, 5, 5), 3.0)
    block(x)
    assert torch.allclose(seen["a"], x)  # count_include_pad=True would give 3·4/9 in the corners
    y = torch.arange(2 * 2048 * 3 * 3, dtype=torch.float32).view(1, 2048 * 2, 3, 3)[:, :2048]
    net.Mixed_7c(y)
    assert torch.equal(seen["e"], F.max_pool2d(y, 3, stride=1, padding=1))


# ---------------------------------------------------------------- inception-fid


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """pytorch-fid's layout: the trunk's state dict plus a 1008-way ``fc`` head, random values."""
    state = randomized(InceptionV3FID(), seed=1)
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


def test_inception_state_dict_matches_pytorch_fid_preprocessing(inception_file):
    path, state = inception_file
    backbone = load_backbone("inception-fid", path)
    image_BCHW, mask_BC = slices()
    features_BD = backbone(image_BCHW, mask_BC)
    assert backbone.name == "inception-fid" and backbone.dim == 2048
    assert features_BD.shape == (2, 2048) and features_BD.dtype == torch.float32 and features_BD.device.type == "cpu"

    reference = InceptionV3FID().eval()
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})

    def pytorch_fid(grey_HW):  # pytorch-fid: [0, 1] input, bilinear to 299, then 2x - 1, grey copied to RGB
        unit = ((grey_HW + 1) / 2)[None, None]
        resized = F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return reference((2 * resized - 1).repeat(1, 3, 1, 1))[0]

    expected = channel_mean(pytorch_fid, image_BCHW, mask_BC)
    assert torch.allclose(features_BD, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_inception_refuses_other_layouts(tmp_path, inception_file):
    resnet = tmp_path / "resnet.pth"
    torch.save(ResNet50().state_dict(), resnet)
    with pytest.raises(BackboneUnavailable, match="missing Conv2d_1a_3x3"):
        load_backbone("inception-fid", resnet)
    _, state = inception_file
    torchvision_style = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(torchvision_style, tmp_path / "tv.pth")
    with pytest.raises(BackboneUnavailable, match="unexpected AuxLogits.fc.weight"):
        load_backbone("inception-fid", tmp_path / "tv.pth")
    truncated = {k: (v[:1] if k == "Mixed_5b.branch1x1.conv.weight" else v) for k, v in state.items()}
    torch.save(truncated, tmp_path / "shape.pth")
    with pytest.raises(BackboneUnavailable, match=r"Mixed_5b.branch1x1.conv.weight is \(1, 192, 1, 1\)"):
        load_backbone("inception-fid", tmp_path / "shape.pth")


class _Pickled:  # a class torch.load(weights_only=True) refuses to unpickle
    pass


def test_missing_unsupplied_and_unpicklable_weights_are_unavailable(tmp_path):
    with pytest.raises(BackboneUnavailable, match="no weights supplied"):
        load_backbone("clip", None)
    with pytest.raises(BackboneUnavailable, match="not found"):
        load_backbone("radimagenet-resnet50", tmp_path / "absent.pth")
    with pytest.raises(BackboneUnavailable, match="is a folder"):
        load_backbone("inception-fid", tmp_path)
    torch.save({"weights": _Pickled()}, tmp_path / "object.pth")
    with pytest.raises(BackboneUnavailable, match="not a weights-only state dict"):
        load_backbone("inception-fid", tmp_path / "object.pth")
    with pytest.raises(ConfigError, match="allowed values: " + ", ".join(BACKBONES)):
        load_backbone("dinov2", tmp_path / "x.pt")


class StyleGanDetector(nn.Module):
    """StyleGAN's detector interface: ``forward(img, return_features)``; its "features" expose the input
    it got (8x8 average pool of the [0, 255] RGB image and its height), padded to 2048."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if not return_features:
            return torch.zeros(img.shape[0], 1008)
        pooled = F.adaptive_avg_pool2d(img, 8).flatten(1)  # (B, 192)
        height = torch.full([img.shape[0], 1], float(img.shape[2]))
        return F.pad(torch.cat([pooled, height], dim=1), (0, 2048 - 193))


def test_inception_torchscript_gets_stylegan_input(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(StyleGanDetector()).save(str(path))
    backbone = load_backbone("inception-fid", path)
    image_BCHW, mask_BC = slices(side=40)
    features_BD = backbone(image_BCHW, mask_BC)
    assert features_BD.shape == (2, 2048)

    def stylegan(grey_HW):  # uint8 range at the slice's own size, RGB
        rgb = (127.5 * (grey_HW + 1)).clamp(0, 255)[None, None].repeat(1, 3, 1, 1)
        return torch.cat([F.adaptive_avg_pool2d(rgb, 8).flatten(), torch.tensor([40.0])])

    expected = channel_mean(stylegan, image_BCHW, mask_BC)
    assert torch.allclose(features_BD[:, :193], expected, atol=1e-4)


class Logits(nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.mean(dim=(2, 3)).repeat(1, 336)  # (B, 1008): class scores, not pool features


def test_inception_torchscript_without_pool_features_is_unavailable(tmp_path):
    torch.jit.script(Logits()).save(str(tmp_path / "logits.pt"))
    with pytest.raises(BackboneUnavailable, match="returns 1008 values; expected the 2048"):
        load_backbone("inception-fid", tmp_path / "logits.pt")


# ---------------------------------------------------------------- radimagenet-resnet50


@pytest.fixture(scope="module")
def resnet_state():
    state = randomized(ResNet50(), seed=2)
    return {**state, "fc.weight": torch.randn(165, 2048) * 0.01, "fc.bias": torch.zeros(165)}


def test_radimagenet_matches_imagenet_normalisation(tmp_path, resnet_state):
    torch.save(resnet_state, tmp_path / "RadImageNet-ResNet50.pt")
    backbone = load_backbone("radimagenet-resnet50", tmp_path / "RadImageNet-ResNet50.pt")
    image_BCHW, mask_BC = slices(side=256)
    features_BD = backbone(image_BCHW, mask_BC)
    assert backbone.dim == 2048 and features_BD.shape == (2, 2048)

    reference = ResNet50().eval()
    reference.load_state_dict({k: v for k, v in resnet_state.items() if not k.startswith("fc.")})
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def radimagenet(grey_HW):  # [0, 1], bilinear (antialiased) to 224, ImageNet mean/std
        unit = ((grey_HW + 1) / 2)[None, None].repeat(1, 3, 1, 1)
        resized = F.interpolate(unit, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            return reference((resized - mean) / std)[0]

    expected = channel_mean(radimagenet, image_BCHW, mask_BC)
    assert torch.allclose(features_BD, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_radimagenet_reads_wrapped_and_sequential_layouts(tmp_path, resnet_state):
    """DataParallel's ``module.``, a ``state_dict`` wrapper, and RadImageNet's PyTorch example (an
    ``nn.Sequential`` of resnet50's children saved under ``backbone.``) give the same features."""
    sequential = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
    renamed = {}
    for key, value in resnet_state.items():
        head, _, rest = key.partition(".")
        index = next((i for i, name in sequential.items() if name == head), None)
        if index is not None:
            renamed[f"backbone.{index}.{rest}"] = value
    torch.save(resnet_state, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet_state.items()}}, tmp_path / "wrapped.pth")
    torch.save(renamed, tmp_path / "radimagenet_example.pt")
    image_BCHW, mask_BC = slices(side=64)
    plain = load_backbone("radimagenet-resnet50", tmp_path / "plain.pt")(image_BCHW, mask_BC)
    for name in ("wrapped.pth", "radimagenet_example.pt"):
        assert torch.equal(load_backbone("radimagenet-resnet50", tmp_path / name)(image_BCHW, mask_BC), plain)
    torch.save({k: v for k, v in resnet_state.items() if not k.startswith("layer4.2.")}, tmp_path / "short.pt")
    with pytest.raises(BackboneUnavailable, match=r"missing layer4\.2\.conv1\.weight.*torchvision's resnet50"):
        load_backbone("radimagenet-resnet50", tmp_path / "short.pt")


# ---------------------------------------------------------------- clip


class PoolEncoder(nn.Module):
    """A stand-in image encoder whose embedding is a 4x4 average pool of its (normalized) input (square
    side ``side``), so the test sees exactly what the loader fed it; a linear layer keeps it a real network."""

    def __init__(self, side: int = 224):
        super().__init__()
        self.kernel = side // 4
        self.mix = nn.Linear(48, 48)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(48))
            self.mix.bias.zero_()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mix(F.avg_pool2d(pixel_values, self.kernel).flatten(1))


def clip_expected(image_BCHW, mask_BC, side):
    """CLIP preprocessing written out, the pool encoder, unit-norm per channel, mean, unit norm again."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def clip(grey_HW):
        unit = ((grey_HW + 1) / 2)[None, None].repeat(1, 3, 1, 1)
        resized = F.interpolate(unit, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        embedding = F.adaptive_avg_pool2d((resized.clamp(0, 1) - mean) / std, 4).flatten()
        return embedding / embedding.norm()

    averaged = channel_mean(clip, image_BCHW, mask_BC)
    return averaged / averaged.norm(dim=1, keepdim=True)


def export_onnx(path, side: int | None, inputs: int = 1):
    import warnings

    side_in = side or 224
    dynamic = {"pixel_values": {0: "batch"} if side else {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        if inputs == 1:
            torch.onnx.export(PoolEncoder(side_in), (torch.zeros(1, 3, side_in, side_in),), str(path), dynamo=False,
                              input_names=["pixel_values"], output_names=["image_embeds"], dynamic_axes=dynamic)
        else:
            torch.onnx.export(TwoInputs(), (torch.zeros(1, 3, 8, 8), torch.zeros(1, 4)), str(path), dynamo=False,
                              input_names=["pixel_values", "input_ids"], output_names=["out"])
    return path


class TwoInputs(nn.Module):
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return pixel_values.mean(dim=(2, 3)) + input_ids[:, :3]


@pytest.mark.parametrize("side", [None, 336], ids=["dynamic-224", "static-336"])
def test_clip_onnx_matches_clip_preprocessing(tmp_path, side):
    path = export_onnx(tmp_path / "clip-visual.onnx", side)
    backbone = load_backbone("clip", path)
    image_BCHW, mask_BC = slices(side=64)
    features_BD = backbone(image_BCHW, mask_BC)
    assert backbone.dim == 48 and features_BD.shape == (2, 48)
    assert torch.allclose(features_BD, clip_expected(image_BCHW, mask_BC, side or 224), atol=1e-5)
    assert torch.allclose(features_BD.norm(dim=1), torch.ones(2), atol=1e-6)


def test_clip_torchscript_and_refusals(tmp_path):
    scripted = tmp_path / "clip.pt"
    torch.jit.script(PoolEncoder()).save(str(scripted))
    image_BCHW, mask_BC = slices(side=48)
    features_BD = load_backbone("clip", scripted)(image_BCHW, mask_BC)
    assert torch.allclose(features_BD, clip_expected(image_BCHW, mask_BC, 224), atol=1e-5)
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(BackboneUnavailable, match="neither TorchScript nor a readable ONNX model"):
        load_backbone("clip", tmp_path / "noise.onnx")
    with pytest.raises(BackboneUnavailable, match="expected one image input"):
        load_backbone("clip", export_onnx(tmp_path / "text-and-image.onnx", 8, inputs=2))


# ---------------------------------------------------------------- extraction


class ListDataset:
    """Items as PreparedSliceDataset yields them, without ``read_batch``."""

    def __init__(self, images_NCHW, masks_NC):
        self.images, self.masks = images_NCHW, masks_NC

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "channel_mask": self.masks[i], "domain": "x"}


def test_extract_features_orders_rows_and_averages_present_channels():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(7, 2, 8, 8, generator=generator) * 2 - 1
    masks = torch.tensor([[True, False], [True, True]] * 3 + [[True, True]])
    backbone = ChannelAveragingBackbone("means", 2, lambda grey: torch.cat([grey.mean(dim=(1, 2, 3))[:, None],
                                                                            grey.amax(dim=(1, 2, 3))[:, None]], 1),
                                        torch.device("cpu"), "-", "test")
    features = extract_features(backbone, ListDataset(images, masks), batch_size=3, indices=[6, 0, 3, 3])
    expected = []
    for i in [6, 0, 3, 3]:
        channels = [c for c in range(2) if masks[i, c]]
        expected.append([np.mean([images[i, c].mean().item() for c in channels]),
                         np.mean([images[i, c].max().item() for c in channels])])
    assert features.dtype == np.float64 and features.shape == (4, 2)
    np.testing.assert_allclose(features, expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="row 0 has no present channel"):
        backbone(images[:1], torch.zeros(1, 2, dtype=torch.bool))
