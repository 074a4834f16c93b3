"""The fused decode path (issue 9): its float32 torch form computes VQVAE.decode, its GroupNorm algebra is
GroupNorm, and its Triton kernels (run in Triton's interpreter on the CPU) compute their torch references."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medaug.models import fused_decode as fd
from medaug.models.vqvae import FastDecoder, fold_upsamples

from tests.models.test_sampling_fast import _decode_reference, _vqvae

REPO = Path(__file__).resolve().parents[2]


def _channels_last(x_BCHW: torch.Tensor) -> torch.Tensor:
    return x_BCHW.contiguous(memory_format=torch.channels_last)


def _randomized(vqvae):
    """``vqvae`` with N(0, 1) GroupNorm affines and convolution biases (the bias folding sees real values)."""
    generator = torch.Generator().manual_seed(26)
    with torch.no_grad():
        for module in vqvae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return vqvae


def _fused_path(vqvae, fold: bool) -> fd.FusedDecodePath:
    decoder = fold_upsamples(copy.deepcopy(vqvae.decoder)) if fold else copy.deepcopy(vqvae.decoder)
    path = fd.FusedDecodePath(copy.deepcopy(vqvae.post_quant_conv), decoder).eval()
    return path.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("fold", [True, False], ids=["folded-upsamples", "nearest-upsamples"])
def test_fused_decode_path_in_float32_is_the_decode_path(fold):
    # widths 16-16-32-32-64: blocks that change width (1×1 skips reading a tensor whose bias is pending after
    # an upsample), attention at the lowest level, the output norm + SiLU + conv
    vqvae = _randomized(_vqvae())
    f_hat_BCHW = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = vqvae.decoder(vqvae.post_quant_conv(f_hat_BCHW))
        out = _fused_path(vqvae, fold)(f_hat_BCHW)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_phase_form_is_the_upsample():
    # an independent path: nearest ×2 then the 3×3 conv (Upsample), against its folded transposed conv and
    # against the phase form (2×2 conv on the 1-padded input with 4·C outputs, interleaved)
    from medaug.models.vqvae import FoldedUpsample, Upsample

    torch.manual_seed(27)
    upsample = Upsample(6)
    x_BCHW = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    upsample = upsample.double()
    with torch.no_grad():
        expected = upsample(x_BCHW)
        folded = FoldedUpsample(upsample)
        weight = fd.phase_weight(folded.weight)
        assert weight.shape == (4 * 6, 6, 2, 2)
        y_BQHW = F.conv2d(x_BCHW, weight, None, 1, 1) + folded.bias.repeat(4)[:, None, None]
        assert fd.phase_shape(y_BQHW) == (2, 6, 10, 10)
        torch.testing.assert_close(fd.interleave_phases(y_BQHW), expected)


def test_the_phase_form_is_kept_only_where_the_kernels_alone_read_the_map():
    # widths 16-16-32-32-64: the upsamples into 64-wide-at-8² and 16-wide-at-64² feed blocks of equal width
    # (identity skips); the other two feed blocks with a 1×1 skip conv, which needs the map in memory
    from medaug.models.vqvae import FoldedUpsample, ResnetBlock

    vqvae = _vqvae()
    path = _fused_path(vqvae, fold=True)
    layers = list(path.decoder)
    folded = [i for i, layer in enumerate(layers) if isinstance(layer, FoldedUpsample)]
    identity = [i for i in folded if isinstance(layers[i + 1], ResnetBlock) and isinstance(layers[i + 1].skip,
                                                                                          torch.nn.Identity)]
    assert len(folded) == 4 and len(identity) == 2
    assert sorted(int(key) for key in path.phase_weights) == identity
    plain = fd.FusedDecodePath(copy.deepcopy(vqvae.post_quant_conv), fold_upsamples(copy.deepcopy(vqvae.decoder)),
                               phase_upsample=False)
    assert len(plain.phase_weights) == 0


def _moments_numpy(v_BCHW: np.ndarray, splits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, split of the row-major pixels, and channel: mean and sum of squared deviations (float64)."""
    batch, channels = v_BCHW.shape[:2]
    rows = v_BCHW.reshape(batch, channels, splits, -1)  # (B, C, S, P/S)
    mean = rows.mean(-1)
    m2 = ((rows - mean[..., None]) ** 2).sum(-1)
    return mean.transpose(0, 2, 1), m2.transpose(0, 2, 1)  # (B, S, C)


@pytest.mark.parametrize("splits", [1, 5, 35], ids=["one-split", "5-splits", "35-splits"])
def test_moments_reference_against_numpy(splits):
    generator = torch.Generator().manual_seed(22)
    x_BCHW = _channels_last(torch.randn(2, 6, 5, 7, generator=generator) * 3 + 1)
    h_BCHW = _channels_last(torch.randn(2, 6, 5, 7, generator=generator))
    bias_C = torch.randn(6, generator=generator)
    out, mean_BSC, m2_BSC = fd.moments_reference(x_BCHW, h_BCHW, bias_C, True, splits)
    v = (x_BCHW + h_BCHW + bias_C[:, None, None]).double().numpy()
    mean_np, m2_np = _moments_numpy(v, splits)
    np.testing.assert_allclose(out.double().numpy(), v, rtol=1e-6, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(mean_BSC.numpy(), mean_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m2_BSC.numpy(), m2_np, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("groups", "splits"), [(4, 1), (4, 5), (12, 7)], ids=["3-per-group", "5-splits", "1-per-group"])
def test_group_scale_shift_is_group_norm_with_a_pending_bias_folded(groups, splits):
    generator = torch.Generator().manual_seed(23)
    norm = torch.nn.GroupNorm(groups, 12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=generator))
        norm.bias.copy_(torch.randn(12, generator=generator))
    # per-channel offsets and spreads, so the group statistics differ from any channel's
    stored_BCHW = torch.randn(3, 12, 5, 7, generator=generator) * torch.rand(1, 12, 1, 1, generator=generator) * 4
    stored_BCHW = _channels_last(stored_BCHW + torch.randn(1, 12, 1, 1, generator=generator))
    bias_C = torch.randn(12, generator=generator) * 2
    _, mean_BSC, m2_BSC = fd.moments_reference(stored_BCHW, None, bias_C, False, splits)
    with torch.no_grad():
        scale_BC, shift_BC = fd.group_scale_shift(norm, mean_BSC, m2_BSC, 35 // splits, bias_C)
    out = fd.scale_shift_act_reference(stored_BCHW, scale_BC, shift_BC, silu=True)
    x_BCHW = (stored_BCHW + bias_C[:, None, None]).double()
    expected = F.silu(F.group_norm(x_BCHW, groups, norm.weight.double(), norm.bias.double(), eps=1e-6))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_splits_and_channel_blocks():
    settings = fd.KernelSettings(block_pixels=128, warps=4, stages=1)
    assert [fd.block_channels(c) for c in (160, 320, 640, 32, 24, 23, 8)] == [32, 64, 64, 32, 32, 32, 8]
    splits = fd.pixel_splits(256, 160, 256 * 256, settings)
    assert 256 * 5 * splits >= fd.FUSED_PROGRAMS > 256 * 5 * splits // 2  # the smallest power of two reaching it
    assert fd.pixel_splits(256, 640, 16 * 16, settings) == 2  # a split keeps a whole 128-pixel tile
    assert fd.pixel_splits(1, 16, 6 * 6, settings) == 1
    assert fd.tile_pixels(48, settings) == 16 and fd.tile_pixels(1024, settings) == 128
    with pytest.raises(ValueError, match="splits is 3; expected a positive divisor of the 64 pixels"):
        fd.channel_moments(_channels_last(torch.zeros(1, 4, 8, 8)), splits=3)


def test_fast_decoder_runs_the_fused_path_from_its_minimum_batch():
    vqvae, f_hat_BCHW, image_ref, logits_ref = _decode_reference(4, seed=24)
    decoder = FastDecoder(vqvae, compile=False, fused_norm=True, channel_stats_min_batch=3)
    assert decoder.stats_path is None and decoder.fused_path is not None  # the fused path replaces it
    for rows in (4, 1, 3, 2):
        path, run_rows = decoder._path_for(rows)
        # fused chunks run padded to a multiple of 32 rows (copies of the last image), the others as they are
        assert (path is decoder.fused_path) == (rows >= 3) and run_rows == (32 if rows >= 3 else rows)
        image_BCHW, logits_BKHW = decoder.decode(f_hat_BCHW[:rows])
        torch.testing.assert_close(image_BCHW, image_ref[:rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits_BKHW, logits_ref[:rows], rtol=1e-4, atol=1e-4)
    assert FastDecoder(vqvae, compile=False).fused_path is None  # off by default on the CPU
    unpadded = FastDecoder(vqvae, compile=False, fused_norm=True, channel_stats_min_batch=3, padded_rows=False)
    assert unpadded._path_for(35) == (unpadded.fused_path, 35)
    capped = FastDecoder(vqvae, compile=False, fused_norm=True, channel_stats_min_batch=3, max_chunk=40)
    assert [capped._path_for(rows)[1] for rows in (3, 32, 33, 40)] == [32, 32, 40, 40]  # never past a chunk


def test_small_decodes_replay_their_captured_graph_and_run_without_one_when_capture_fails(monkeypatch, caplog):
    # CUDA graphs need a GPU (the benchmark checks replayed outputs equal the plain ones there); here a stand-in
    # graph replays the captured function on its static input, to check what the decoder copies in and hands out
    from medaug.models import vqvae as vqvae_module

    vqvae, f_hat_BCHW, _, _ = _decode_reference(4, seed=28)
    decoder = FastDecoder(vqvae, compile=False, fused_norm=False, small_graph=True)
    assert not FastDecoder(vqvae, compile=False).small_graph  # the default: compiled on CUDA only
    forward, captured = decoder._forward, []

    class StandIn:
        def __init__(self, static_BCHW, out_BCHW):
            self.static_BCHW, self.out_BCHW = static_BCHW, out_BCHW

        def replay(self):
            self.out_BCHW.copy_(forward(self.static_BCHW))

    def capture(function, x_BCHW):
        static_BCHW = x_BCHW.clone()
        out_BCHW = function(static_BCHW)
        captured.append(x_BCHW.shape[0])
        return vqvae_module._DecodeGraph(StandIn(static_BCHW, out_BCHW), static_BCHW, out_BCHW)

    monkeypatch.setattr(FastDecoder, "_capture", staticmethod(capture))
    with torch.no_grad():
        expected = [forward(f_hat_BCHW[i:i + 2]) for i in (0, 2)]
        first = decoder._replayed(forward, f_hat_BCHW[:2])  # runs it, then captures
        second = decoder._replayed(forward, f_hat_BCHW[2:])  # replays on the new input
        third = decoder._replayed(forward, f_hat_BCHW[:2])
    assert captured == [2]
    torch.testing.assert_close(first, expected[0])
    torch.testing.assert_close(second, expected[1])
    torch.testing.assert_close(third, expected[0])
    assert third.data_ptr() != decoder._graphs[2].output.data_ptr()  # a copy: the next replay cannot change it

    def failing(function, x_BCHW):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FastDecoder, "_capture", staticmethod(failing))
    with torch.no_grad(), caplog.at_level("WARNING"):
        out = decoder._replayed(forward, f_hat_BCHW[:1])
        again = decoder._replayed(forward, f_hat_BCHW[:1])
    assert decoder._graphs[1] is None and "no CUDA graph for 1 rows" in caplog.text
    torch.testing.assert_close(out, forward(f_hat_BCHW[:1]))
    torch.testing.assert_close(again, out)


def test_the_fused_path_is_the_default_only_on_gpus_that_run_it(monkeypatch):
    assert not fd.fused_default("cpu")
    monkeypatch.setattr(fd, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert fd.fused_default("cuda") == expected
    monkeypatch.setattr(fd, "triton_available", lambda: False)
    assert not fd.fused_default("cuda:0")


# ---------------------------------------------------------------- the Triton kernels, interpreted
def interpreted_errors() -> dict[str, float]:
    """Largest relative error of each kernel against its torch reference (float32 inputs; run with
    TRITON_INTERPRET=1, where the kernels run on CPU tensors). Outputs start poisoned with NaN."""
    assert fd._use_kernels(torch.zeros(1)), "TRITON_INTERPRET=1 and Triton are needed"
    generator = torch.Generator().manual_seed(25)
    errors: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    torch_empty, torch_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *args, **kwargs: torch_empty(*args, **kwargs).fill_(float("nan"))
    torch.empty_like = lambda *args, **kwargs: torch_empty_like(*args, **kwargs).fill_(float("nan"))
    try:
        # 24 channels: one masked block of 32; 160: five blocks of 32; splits that hold several tiles and one
        for channels, height, width, splits in ((24, 8, 16, 2), (160, 16, 16, 1), (40, 4, 12, 3)):
            shape = (2, channels, height, width)
            x = _channels_last(torch.randn(shape, generator=generator) * 2 + 0.5)
            h = _channels_last(torch.randn(shape, generator=generator))
            bias = torch.randn(channels, generator=generator)
            scale = torch.rand(2, channels, generator=generator) + 0.5
            shift = torch.randn(2, channels, generator=generator)
            tag = f"{channels}x{height}x{width}/{splits}"
            for name, args in (("moments", (None, None, False)), ("moments_bias", (None, bias, False)),
                               ("add_moments", (h, bias, True))):
                out, mean, m2 = fd.channel_moments(x, args[0], args[1], write=args[2], splits=splits)
                out_ref, mean_ref, m2_ref = fd.moments_reference(x, args[0], args[1], args[2], splits)
                errors[f"{name}_mean_{tag}"] = rel(mean, mean_ref)
                errors[f"{name}_m2_{tag}"] = rel(m2, m2_ref)
                if out_ref is not None:
                    errors[f"{name}_out_{tag}"] = rel(out, out_ref)
            for silu in (True, False):
                out = fd.scale_shift_act(x, scale, shift, silu=silu, splits=splits)
                errors[f"scale_shift_silu{int(silu)}_{tag}"] = rel(out, fd.scale_shift_act_reference(x, scale, shift, silu))
        # the phase form of an upsampled map (4·C channels on an (S + 1)² grid), read in place
        # (rows, columns) of the half-size grid; 3 images and non-square maps check the per-image strides
        for channels, (side_h, side_w), splits, batch in ((24, (4, 4), 2, 2), (160, (8, 8), 1, 2), (16, (3, 5), 3, 3)):
            y = _channels_last(torch.randn(batch, 4 * channels, side_h + 1, side_w + 1, generator=generator) * 2 + 0.5)
            h = _channels_last(torch.randn(batch, channels, 2 * side_h, 2 * side_w, generator=generator))
            bias = torch.randn(channels, generator=generator)
            scale = torch.rand(batch, channels, generator=generator) + 0.5
            shift = torch.randn(batch, channels, generator=generator)
            tag = f"phase_{channels}x{side_h}x{side_w}/{splits}"
            for name, args in (("moments", (None, bias, False)), ("add_moments", (h, bias, True))):
                out, mean, m2 = fd.channel_moments(y, args[0], args[1], write=args[2], splits=splits, phase=True)
                out_ref, mean_ref, m2_ref = fd.moments_reference(fd.interleave_phases(y), args[0], args[1], args[2],
                                                                 splits)
                errors[f"{name}_mean_{tag}"] = rel(mean, mean_ref)
                errors[f"{name}_m2_{tag}"] = rel(m2, m2_ref)
                if out_ref is not None:
                    errors[f"{name}_out_{tag}"] = rel(out, out_ref)
            out = fd.scale_shift_act(y, scale, shift, silu=True, splits=splits, phase=True)
            errors[f"scale_shift_{tag}"] = rel(out, fd.scale_shift_act_reference(fd.interleave_phases(y), scale, shift,
                                                                                 True))
        vqvae = _randomized(_vqvae())
        for name, shape in (("decode_path", (2, 8, 4, 4)), ("decode_path_non_square", (2, 8, 4, 6))):
            f_hat_BCHW = torch.randn(shape, generator=generator)
            with torch.no_grad():
                expected = vqvae.decoder(vqvae.post_quant_conv(f_hat_BCHW))
                errors[name] = rel(_fused_path(vqvae, fold=True)(f_hat_BCHW), expected)
    finally:
        torch.empty, torch.empty_like = torch_empty, torch_empty_like
    return errors


def run_interpreted(module: str, function: str) -> Any:
    """``module.function()`` in a subprocess with TRITON_INTERPRET=1 (Triton reads it when kernels are made, so
    not in this process); its JSON result."""
    script = f"import json; from {module} import {function}; print(json.dumps({function}()))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not fd.triton_available(), reason="Triton is not installed (CI installs it with the test extra)")
def test_triton_kernels_compute_their_references_in_the_interpreter():
    errors = run_interpreted("tests.models.test_fused_decode", "interpreted_errors")
    assert len(errors) == 3 * 9 + 3 * 6 + 2
    bad = {name: error for name, error in errors.items() if not error < 1e-5}  # NaN (unwritten) fails too
    assert not bad, bad
