"""Feature networks for evaluation, written in plain torch (no torchvision): architecture only.

* :class:`InceptionV3FID`: Inception-v3 as the FID reference implementation uses it (TensorFlow's
  ``inception-2015-12-05`` graph, ported to PyTorch by pytorch-fid as ``pt_inception-2015-12-05``).
  Parameter and buffer names are exactly those of that state dict (torchvision's ``Inception3`` names:
  ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch5x5_1.bn.running_mean``...), so the file loads strictly;
  its 1008-way ``fc`` head is not part of the module (the loader drops it). The FID variants differ from
  torchvision's blocks where TensorFlow's graph did: average pools in the A, C and first E blocks leave
  padded zeros out of the mean (``count_include_pad=False``), and the last E block max-pools its pool
  branch. Input (B, 3, 299, 299) in [-1, 1]; output (B, 2048), the final average pool.
* :class:`ResNet50`: torchvision's ResNet-50 (v1.5: the stride sits in each bottleneck's 3x3 conv) with
  torchvision's names (``conv1``, ``bn1``, ``layer1.0.downsample.0``...), without ``fc``. Input
  (B, 3, H, W) normalized by the weights' convention; output (B, 2048) global average pool.
* :class:`FeatureNet`: medaug's own slice encoder (a small ResNet with GroupNorm) with a domain head and a
  structure-present head per region; :meth:`FeatureNet.embed` gives the pooled features evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medaug.errors import ConfigError

INCEPTION_FEATURES = 2048
RESNET50_FEATURES = 2048


# ---------------------------------------------------------------- Inception-v3 (FID)


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 0.001, TensorFlow's) → ReLU, as torchvision's Inception names it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's 3x3 average pool leaves padded zeros out of the mean (pytorch-fid's patch)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 → 17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (Mixed_6b/c/d/e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 → 8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches (Mixed_7b: average pool, Mixed_7c: max pool, as TensorFlow's graph)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ConfigError("pool", f"is {pool!r}; expected 'avg' (Mixed_7b) or 'max' (Mixed_7c)")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:  # pytorch-fid: TensorFlow's FID graph max-pools here, unlike the paper
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 trunk (module docstring). ``forward``: (B, 3, H, W) in [-1, 1] → (B, 2048);
    FID feeds it 299x299 (the pool features of other sizes are not comparable with published FIDs)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def forward(self, x_B3HW: Tensor) -> Tensor:
        assert x_B3HW.ndim == 4 and x_B3HW.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x_B3HW.shape)}"
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_B3HW)))  # (B, 64, 147, 147) at 299²
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


# ---------------------------------------------------------------- ResNet-50 (torchvision names)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride here: ResNet v1.5) → 1x1 (x4 channels), BatchNorm after each, identity or projection."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50`` trunk (module docstring): (B, 3, H, W) → (B, 2048) global average pool."""

    layers = (3, 4, 6, 3)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for stage, blocks in enumerate(self.layers):
            width, stride = 64 * 2**stage, 1 if stage == 0 else 2
            layer = [Bottleneck(in_channels, width, stride)]
            in_channels = width * Bottleneck.expansion
            layer += [Bottleneck(in_channels, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))

    def forward(self, x_B3HW: Tensor) -> Tensor:
        assert x_B3HW.ndim == 4 and x_B3HW.shape[1] == 3, f"expected (B, 3, H, W), got {tuple(x_B3HW.shape)}"
        x = F.relu(self.bn1(self.conv1(x_B3HW)))  # (B, 64, H/2, W/2)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)  # ends (B, 2048, H/32, W/32)
        return x.mean(dim=(2, 3))  # (B, 2048)


# ---------------------------------------------------------------- medaug's own encoder


@dataclass(frozen=True)
class FeatureNetConfig:
    """medaug's slice encoder.

    ``image_size``: side in pixels the net reads (slices of other sizes are resized to it); a multiple of
    ``stem_stride · 2^(stages - 1)``, the side of a region-grid cell. ``widths``: channels per stage; each
    stage after the first halves the resolution; the feature size is ``widths[-1]``. ``blocks_per_stage``:
    residual blocks per stage. ``stem_stride``: 1, 2 or 4 (a cheap early downsampling for large slices).
    ``max_norm_groups``: GroupNorm groups (at most; fewer when a width does not divide). ``dropout``: on
    the last feature map, in training only. ``image_channels``, ``num_domains`` and ``num_structures``
    come from the prepared dataset.
    """

    image_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    stem_stride: int = 2
    max_norm_groups: int = 8
    dropout: float = 0.0
    image_channels: int = 1
    num_domains: int = 1
    num_structures: int = 0

    def __post_init__(self) -> None:
        if not self.widths or any(width < 1 for width in self.widths):
            raise ConfigError("model.widths", f"is {list(self.widths)}; expected positive channel counts")
        if self.stem_stride not in (1, 2, 4):
            raise ConfigError("model.stem_stride", f"is {self.stem_stride}; allowed values: 1, 2, 4")
        cell = self.stem_stride * 2 ** (len(self.widths) - 1)
        if self.image_size < cell or self.image_size % cell:
            raise ConfigError("model.image_size", f"is {self.image_size}; expected a multiple of stem_stride x "
                                                  f"2^(stages - 1) = {cell}")
        if self.blocks_per_stage < 1:
            raise ConfigError("model.blocks_per_stage", f"is {self.blocks_per_stage}; expected >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"is {self.dropout}; expected a value in [0, 1)")

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _groups(channels: int, max_groups: int) -> int:
    """The most groups <= ``max_groups`` that divide ``channels``."""
    return next(groups for groups in range(min(max_groups, channels), 0, -1) if channels % groups == 0)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → 3x3 conv, twice, plus a (projected) shortcut; ``stride`` 2 halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, max_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, max_groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels, max_groups), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class FeatureNet(nn.Module):
    """medaug's slice encoder with a domain head and a structure-present head per region.

    Input: ``image_BCHW`` (B, C, S, S) float in [-1, 1] (C = ``image_channels``, S = ``image_size``) with
    absent channels zero, and ``channel_mask_BC`` (B, C) bool; the mask enters as C constant planes so the
    net knows which zeros are "no channel". The last stage's map (B, F, h, w) (GroupNorm + SiLU) gives:

    * :meth:`embed`: its global average, (B, F): the features evaluation uses;
    * domain logits (B, D): a linear head on those features;
    * region logits (B, K, h, w): a 1x1 conv, "structure k is in this cell" (K = ``num_structures``);
    * structure logits (B, K): the log-sum-exp over cells of the region logits. A structure is in the
      slice when it is in some cell; the smooth maximum (multiple-instance pooling) lets a structure of a
      few pixels decide the slice's label, where a linear head on averaged features dilutes it.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        widths, groups = config.widths, config.max_norm_groups
        # stride 4: a 4x4 patchify stem (a 3x3 kernel would skip pixels), else 3x3
        kernel, padding = (4, 0) if config.stem_stride == 4 else (3, 1)
        self.stem = nn.Conv2d(2 * config.image_channels, widths[0], kernel, stride=config.stem_stride, padding=padding)
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(ResidualBlock(in_channels, width, stride, groups))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.domain_head = nn.Linear(in_channels, config.num_domains)
        self.region_head = nn.Conv2d(in_channels, max(config.num_structures, 1), 1)

    @property
    def grid_side(self) -> int:
        """Side h = w of the region grid: ``image_size / (stem_stride · 2^(stages - 1))``."""
        return self.config.image_size // (self.config.stem_stride * 2 ** (len(self.config.widths) - 1))

    def feature_map(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> Tensor:
        """(B, F, h, w): the last stage after GroupNorm and SiLU."""
        batch, channels, height, width = image_BCHW.shape
        assert channels == self.config.image_channels, f"expected {self.config.image_channels} channels, got {channels}"
        mask_BC11 = channel_mask_BC.to(image_BCHW.dtype)[:, :, None, None]
        planes_BCHW = mask_BC11.expand(batch, channels, height, width)
        x = self.stem(torch.cat([image_BCHW * mask_BC11, planes_BCHW], dim=1))  # (B, w0, S/stride, S/stride)
        x = self.blocks(x)  # (B, F, h, w)
        return F.silu(self.norm_out(x))

    def embed(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> Tensor:
        """(B, F) features: the global average of :meth:`feature_map`."""
        return self.feature_map(image_BCHW, channel_mask_BC).mean(dim=(2, 3))

    def forward(self, image_BCHW: Tensor, channel_mask_BC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(domain logits (B, D), structure logits (B, K), region logits (B, K, h, w))."""
        map_BFhw = self.dropout(self.feature_map(image_BCHW, channel_mask_BC))
        domain_BD = self.domain_head(map_BFhw.mean(dim=(2, 3)))
        region_BKhw = self.region_head(map_BFhw)
        structure_BK = torch.logsumexp(region_BKhw.flatten(2), dim=2)  # (B, K) smooth max over cells
        return domain_BD, structure_BK, region_BKhw


__all__ = [
    "INCEPTION_FEATURES",
    "RESNET50_FEATURES",
    "Bottleneck",
    "FeatureNet",
    "FeatureNetConfig",
    "InceptionV3FID",
    "ResNet50",
]
