"""The sampler's Triton kernels (issue 9): the float64 draw reference against the sampler's torch draw, the
CPU fallbacks, and the kernels themselves in Triton's interpreter against independent computations
(explicit normalisation; a float64 draw with ties ordered by index), then FastSampler with the kernels on
against the basic sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medaug.models import fused_decode as fd
from medaug.models import fused_sample as fs
from medaug.models.sampling import FastSampler, generators_from_seeds, sample_tokens

from tests.models.test_sampling import SIDES, _conditions, _config, _model_and_quantizer

REPO = Path(__file__).resolve().parents[2]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_float64_draw_reference_agrees_with_the_samplers_torch_draw():
    """Continuous logits (no ties): the independent float64 draw picks the sampler's token in every row."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 50, generator=generator) * 2
    uniform = torch.rand(400, generator=generator)
    for top_k, top_p, temperature in ((10, 0.8, 1.0), (0, 1.0, 1.0), (50, 0.5, 0.7), (1, 1.0, 1.0), (60, 0.99, 1.5)):
        torch_tokens = fs.draw_reference(logits, uniform, top_k, top_p, temperature)
        exact = fs.draw_exact(logits.numpy(), uniform.numpy(), top_k, top_p, temperature)
        assert np.array_equal(torch_tokens.numpy(), exact), (top_k, top_p, temperature)
    # u = 0 draws the most likely token; top-k 1 and a tiny top-p keep it alone
    assert np.array_equal(fs.draw_exact(logits.numpy(), np.zeros(400), 0, 1.0), logits.argmax(1).numpy())
    assert np.array_equal(fs.draw_exact(logits.numpy(), uniform.numpy(), 0, 1e-6), logits.argmax(1).numpy())


def test_without_kernels_the_entry_points_run_their_torch_references():
    if fd._use_kernels(torch.zeros(1)):
        pytest.skip("TRITON_INTERPRET=1 is set: the interpreter test covers the kernels")
    generator = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 3, 3 * 4 * 8, generator=generator)
    scale = torch.rand(1, 1, 4, 1, generator=generator) + 1
    keys, values = torch.full((2, 2, 6, 4, 8), float("nan")).unbind(0)
    q = fs.fused_qkv(qkv, scale, keys[:, 1:4], values[:, 1:4])
    q_ref, k_ref, v_ref = qkv.view(2, 3, 3, 4, 8).unbind(2)
    torch.testing.assert_close(q, (_unit(q_ref) * scale).transpose(1, 2))
    torch.testing.assert_close(keys[:, 1:4], _unit(k_ref))
    assert torch.equal(values[:, 1:4], v_ref) and keys[:, [0, 4, 5]].isnan().all()
    logits = torch.randn(2, 5, 30, generator=generator)
    uniform = torch.rand(2, 9, generator=generator)
    tokens = fs.fused_filter_draw(logits, uniform, 3, 7, 0.9)
    expected = fs.draw_exact(logits.flatten(0, 1).numpy(), uniform[:, 3:8].flatten().numpy(), 7, 0.9)
    assert np.array_equal(tokens.numpy(), expected)


# ---------------------------------------------------------------- the Triton kernels, interpreted
INTERPRETED_CHECK = r"""
import json
from tests.models.test_fused_sample import interpreted_results
print(json.dumps(interpreted_results()))
"""


def interpreted_results() -> dict[str, object]:
    """Run with TRITON_INTERPRET=1 (the kernels on CPU tensors): per check, the largest error or the share of
    rows that agree, and the fast sampler's tokens against the basic sampler's."""
    assert fd._use_kernels(torch.zeros(1)), "TRITON_INTERPRET=1 and Triton are needed"
    generator = torch.Generator().manual_seed(27)
    results: dict[str, object] = {}
    # qkv: 3 rows of 5 tokens, 6 heads of 16 (rows of (token, head) not a multiple of the block), slots at
    # positions 4..8 of a 12-position cache poisoned with NaN
    rows, length, heads, dim = 3, 5, 6, 16
    qkv = torch.randn(rows, length, 3 * heads * dim, generator=generator) * 3
    scale = torch.rand(1, 1, heads, 1, generator=generator) * 4 + 1
    keys, values = torch.full((2, rows, 12, heads, dim), float("nan")).unbind(0)
    q = fs.fused_qkv(qkv, scale, keys[:, 4:9], values[:, 4:9])
    q_ref, k_ref, v_ref = qkv.view(rows, length, 3, heads, dim).unbind(2)
    results["qkv_shape"] = list(q.shape)
    results["q_error"] = float((q - (_unit(q_ref) * scale).transpose(1, 2)).abs().max())
    results["k_error"] = float((keys[:, 4:9] - _unit(k_ref)).abs().max())
    results["v_equal"] = bool(torch.equal(values[:, 4:9], v_ref))
    results["outside_untouched"] = bool(keys[:, [*range(4), 9, 10, 11]].isnan().all()
                                        and values[:, [*range(4), 9, 10, 11]].isnan().all())
    # draw: continuous logits, logits with many ties (multiples of 0.5), a vocabulary that is not a power of two
    batch, length, vocab = 2, 8, 100
    uniform = torch.rand(batch, 30, generator=generator)
    uniform[0, 3:8] = torch.tensor([0.0, 1e-7, 0.5, 0.99999994, 0.999])
    cases = {"continuous": torch.randn(batch, length, vocab, generator=generator) * 2,
             "ties": torch.randint(-4, 4, (batch, length, vocab), generator=generator).float() * 0.5}
    settings = ((900, 0.96, 1.0), (10, 0.7, 1.0), (0, 1.0, 1.0), (1, 0.5, 1.0), (17, 1.0, 0.7), (0, 0.3, 1.3),
                (99, 0.99, 1.0))
    variants = {"radix_compact": (True, True), "bisect_compact": (False, True), "radix_whole_row": (True, False)}
    defaults = fs.RADIX_TOP_K, fs.COMPACT
    for variant, (fs.RADIX_TOP_K, fs.COMPACT) in variants.items():
        for case, logits in cases.items():
            for top_k, top_p, temperature in settings if variant == "radix_compact" else settings[:3]:
                tokens = fs.fused_filter_draw(logits, uniform, 3, top_k, top_p, temperature)
                exact = fs.draw_exact(logits.flatten(0, 1).numpy(), uniform[:, 3:3 + length].flatten().numpy(),
                                      top_k, top_p, temperature)
                results[f"draw_{variant}_{case}_k{top_k}_p{top_p}_t{temperature}"] = float(np.mean(tokens.numpy()
                                                                                                == exact))
    fs.RADIX_TOP_K, fs.COMPACT = defaults
    # the fast sampler with the kernels: the basic sampler's tokens (float32)
    model, quantizer = _model_and_quantizer(_config(), seed=1)
    condition = _conditions(3, seed=2)
    for cfg, top_k, top_p in ((1.5, 20, 0.9), (0.0, 0, 1.0)):
        settings_ = dict(cfg=cfg, top_k=top_k, top_p=top_p)
        basic = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([5, 6, 7]), **settings_)
        sampler = FastSampler(model, quantizer, fused_kernels=True)
        fast = sampler.sample_tokens(*condition, generators=generators_from_seeds([5, 6, 7]), **settings_)
        results[f"sampler_cfg{cfg}_equal"] = all(torch.equal(a, b) for a, b in zip(fast, basic))
        results["sampler_shapes"] = [list(t.shape) for t in fast] == [[3, s, s] for s in SIDES]
    return results


@pytest.mark.skipif(not fd.triton_available(), reason="Triton is not installed (CI installs it with the test extra)")
def test_triton_kernels_compute_their_references_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("qkv_shape") == [3, 6, 5, 16]
    assert results.pop("q_error") < 1e-5 and results.pop("k_error") < 1e-6
    draws = {name: results.pop(name) for name in list(results) if name.startswith("draw_")}
    assert len(draws) == 14 + 2 * 6 and all(share == 1.0 for share in draws.values()), draws
    assert all(results.values()), results  # v written, outside the slots untouched, sampler tokens equal


def test_the_sampler_kernels_are_on_where_the_fused_decoder_is(monkeypatch):
    model, quantizer = _model_and_quantizer(_config(), seed=1)
    assert not FastSampler(model, quantizer).fused_kernels  # the CPU
    assert FastSampler(model, quantizer, fused_kernels=True).fused_kernels
    monkeypatch.setattr("medaug.models.sampling.fused_default", lambda device: True)
    assert FastSampler(model, quantizer).fused_kernels
