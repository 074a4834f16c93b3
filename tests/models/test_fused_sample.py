"""The fast sampler's Triton kernel (issue 9): its CPU fallback, the kernel in Triton's interpreter against
explicit normalisation (cache poisoned with NaN outside the slots), FastSampler with it against the basic
sampler, and every Triton kernel of medaug compiled for Ampere and Hopper (what CPU CI can check of the GPU
build: the interpreter accepts programs the compiler rejects)."""

from __future__ import annotations

import os

import pytest
import torch

from medaug.models import fused_decode as fd
from medaug.models import fused_sample as fs
from medaug.models.sampling import FastSampler, generators_from_seeds, sample_tokens

from tests.models.test_fused_decode import run_interpreted
from tests.models.test_sampling import SIDES, _conditions, _config, _model_and_quantizer


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _qkv_case(generator: torch.Generator, rows: int, length: int, heads: int, dim: int, positions: int, start: int):
    qkv = torch.randn(rows, length, 3 * heads * dim, generator=generator) * 3
    scale = torch.rand(1, 1, heads, 1, generator=generator) * 4 + 1
    keys, values = torch.full((2, rows, positions, heads, dim), float("nan")).unbind(0)
    q = fs.fused_qkv(qkv, scale, keys[:, start:start + length], values[:, start:start + length])
    q_ref, k_ref, v_ref = qkv.view(rows, length, 3, heads, dim).unbind(2)
    outside = [p for p in range(positions) if not start <= p < start + length]
    return {"shape": list(q.shape) == [rows, heads, length, dim],
            "q_error": float((q - (_unit(q_ref) * scale).transpose(1, 2)).abs().max()),
            "k_error": float((keys[:, start:start + length] - _unit(k_ref)).abs().max()),
            "v_equal": bool(torch.equal(values[:, start:start + length], v_ref)),
            "outside_untouched": bool(keys[:, outside].isnan().all() and values[:, outside].isnan().all())}


def _check_qkv(result: dict) -> None:
    assert result.pop("q_error") < 1e-5 and result.pop("k_error") < 1e-6
    assert all(result.values()), result


def test_fused_qkv_checks_the_projection_width():
    keys = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="expected 3·3·8"):
        fs.fused_qkv(torch.zeros(2, 4, 3 * 3 * 8 + 8), torch.ones(1, 1, 3, 1), keys, keys.clone())


def test_without_kernels_fused_qkv_runs_the_torch_function():
    if fd._use_kernels(torch.zeros(1)):
        pytest.skip("TRITON_INTERPRET=1 is set: the interpreter test covers the kernel")
    _check_qkv(_qkv_case(torch.Generator().manual_seed(4), 2, 3, 4, 8, 6, 1))


# ---------------------------------------------------------------- the Triton kernel, interpreted
def interpreted_results() -> dict[str, object]:
    """Run with TRITON_INTERPRET=1 (the kernel on CPU tensors)."""
    assert fd._use_kernels(torch.zeros(1)), "TRITON_INTERPRET=1 and Triton are needed"
    generator = torch.Generator().manual_seed(27)
    # (token, head) rows not a multiple of the block; one token; slots mid-cache and at its end
    results: dict[str, object] = {
        "qkv_3x5x6x16": _qkv_case(generator, 3, 5, 6, 16, 12, 4),
        "qkv_2x1x4x64": _qkv_case(generator, 2, 1, 4, 64, 3, 2),
        "qkv_2x3x2x12": _qkv_case(generator, 2, 3, 2, 12, 5, 0),  # a head size the kernel's tiles cannot hold
    }
    model, quantizer = _model_and_quantizer(_config(), seed=1)
    condition = _conditions(3, seed=2)
    for cfg, top_k, top_p in ((1.5, 20, 0.9), (0.0, 0, 1.0)):
        settings = dict(cfg=cfg, top_k=top_k, top_p=top_p)
        basic = sample_tokens(model, quantizer, *condition, generators=generators_from_seeds([5, 6, 7]), **settings)
        sampler = FastSampler(model, quantizer, fused_kernels=True)
        fast = sampler.sample_tokens(*condition, generators=generators_from_seeds([5, 6, 7]), **settings)
        results[f"sampler_cfg{cfg}_equal"] = all(torch.equal(a, b) for a, b in zip(fast, basic))
        results["sampler_shapes"] = [list(t.shape) for t in fast] == [[3, s, s] for s in SIDES]
    return results


@pytest.mark.skipif(not fd.triton_available(), reason="Triton is not installed (CI installs it with the test extra)")
def test_triton_kernel_computes_its_reference_in_the_interpreter():
    results = run_interpreted("tests.models.test_fused_sample", "interpreted_results")
    for name in ("qkv_3x5x6x16", "qkv_2x1x4x64", "qkv_2x3x2x12"):
        _check_qkv(results.pop(name))
    assert results == {"sampler_cfg1.5_equal": True, "sampler_shapes": True, "sampler_cfg0.0_equal": True}


def test_the_sampler_kernel_is_on_where_the_fused_decoder_is(monkeypatch):
    model, quantizer = _model_and_quantizer(_config(), seed=1)
    assert not FastSampler(model, quantizer).fused_kernels  # the CPU
    assert FastSampler(model, quantizer, fused_kernels=True).fused_kernels
    monkeypatch.setattr("medaug.models.sampling.fused_default", lambda device: True)
    assert FastSampler(model, quantizer).fused_kernels


# ---------------------------------------------------------------- compiled for the GPU (no GPU needed)
def _compile_cases() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    qkv = ("qkv", fs._qkv_kernel,
           {"qkv_ptr": "*bf16", "scale_ptr": "*fp32", "keys_ptr": "*bf16", "values_ptr": "*bf16", "q_ptr": "*bf16",
            "rows": "i32", "length": "i32", "cache_row_stride": "i64"},
           {"HEADS": 16, "DIM": 64, "BLOCK_M": fs.QKV_ROWS})
    common = {"pixels": "i32", "channels": "i32", "split_pixels": "i32", "splits": "i32", "channel_blocks": "i32",
              "width": "i32", "grid_h": "i32", "grid_w": "i32"}
    cases = [qkv]
    for phase in (False, True):  # the phase form's address arithmetic is only traced when PHASE is set
        cases.append((f"moments_phase{int(phase)}", fd._moments_kernel,
                      {"x_ptr": "*bf16", "h_ptr": "*bf16", "bias_ptr": "*fp32", "out_ptr": "*bf16",
                       "mean_ptr": "*fp32", "m2_ptr": "*fp32", **common},
                      {"HAS_H": True, "HAS_BIAS": True, "WRITE": True, "PHASE": phase, "BLOCK_P": 128, "BLOCK_C": 32,
                       "STAGES": 3}))
        cases.append((f"scale_shift_act_phase{int(phase)}", fd._scale_shift_act_kernel,
                      {"x_ptr": "*bf16", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "out_ptr": "*bf16", **common},
                      {"SILU": True, "PHASE": phase, "BLOCK_P": 256, "BLOCK_C": 32, "STAGES": 1}))
    return cases


@pytest.mark.skipif(not fd.triton_available(), reason="Triton is not installed (CI installs it with the test extra)")
@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
def test_every_triton_kernel_compiles_for_the_gpu(capability, tmp_path, monkeypatch):
    """Triton's frontend and ptxas (shipped in its wheel) run without a GPU: a kernel the interpreter runs but
    the compiler rejects fails here rather than on the first GPU run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces triton.jit kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for name, kernel, signature, constants in _compile_cases():
        source = ASTSource(kernel, {**signature, **{key: "constexpr" for key in constants}}, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
        assert compiled.asm["ptx"] and compiled.asm["cubin"], name
