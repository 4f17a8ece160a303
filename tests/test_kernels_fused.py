"""Fused RMSNorm(+residual) and RoPE kernels vs their torch references, in the interpreter (CPU).

Outputs are NaN-poisoned buffers where the kernel writes in place, and fresh `empty` otherwise
checked for NaN; tolerance = max|out - ref| / max|ref| per dtype (TOL in tests/conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close

pytest.importorskip("triton")

from casa_live.kernels import dispatch, rmsnorm, rope

# Interpreter on CPU by default; with a GPU and TRITON_INTERPRET=0 the same tests run the compiled
# kernels on CUDA (every tensor is created on KERNEL_DEVICE through the autouse fixture).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with torch.device(KERNEL_DEVICE):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [16, 100, 2048])
def test_rmsnorm(dtype, n):
    x = torch.randn(3, 5, n, dtype=dtype) * 3
    w = (1 + 0.1 * torch.randn(n)).to(dtype)
    y, h = rmsnorm.rmsnorm_triton(x, w, 1e-6)
    ry, _ = rmsnorm.rmsnorm_torch(x, w, 1e-6)
    assert h is None
    assert_close(y, ry, dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_residual(dtype):
    """h = x + residual is returned exactly as torch rounds it; y = RMSNorm(h)."""
    x = torch.randn(7, 300, dtype=dtype)
    r = torch.randn(7, 300, dtype=dtype)
    w = torch.rand(300, dtype=dtype)
    y, h = rmsnorm.rmsnorm_triton(x, w, 1e-5, residual=r)
    ry, rh = rmsnorm.rmsnorm_torch(x, w, 1e-5, residual=r)
    if dtype == torch.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest): 1 ulp apart
        assert_close(h, rh, dtype, "residual sum")
    else:
        assert torch.equal(h, rh)
    assert_close(y, ry, dtype, "add+rmsnorm")


def test_rmsnorm_strided_rows_and_fp32_weight():
    x = torch.randn(4, 6, 64)[:, ::2]  # rows with a non-trivial stride
    w = torch.randn(64)
    y, _ = rmsnorm.rmsnorm_triton(x.to(torch.bfloat16), w, 1e-6)
    ry, _ = rmsnorm.rmsnorm_torch(x.to(torch.bfloat16), w, 1e-6)
    assert y.dtype == torch.float32  # weight * normed promotes, as torch does
    assert_close(y, ry, torch.bfloat16, "promoted")  # bf16 rounding of normed dominates


def _cos_sin(B: int, T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 500, (B, T, 1)).float()
    freqs = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.cat([pos * freqs, pos * freqs], dim=-1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("D", "H", "Hkv", "T"), [(16, 4, 2, 3), (64, 8, 1, 9), (128, 16, 2, 1)])
def test_rope_qk(dtype, D, H, Hkv, T):
    B = 2
    q = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)  # the projection's strided view
    k = torch.randn(B, T, Hkv, D, dtype=dtype).transpose(1, 2)
    cos, sin = _cos_sin(B, T, D)
    qo, ko = rope.apply_rope_triton(q, k, cos, sin)
    rq, rk = rope.apply_rope_torch(q, k, cos, sin)
    assert_close(qo, rq, dtype, "rope q")
    assert_close(ko, rk, dtype, "rope k")


def test_rope_inplace_single_tensor_broadcast_table():
    """k only (the frame's image keys), one cos/sin table for the whole batch, written in place."""
    k = torch.full((3, 2, 7, 64), float("nan"))
    src = torch.randn(3, 2, 7, 64)
    k.copy_(src)
    cos, sin = _cos_sin(1, 7, 64)
    rk, _ = rope.apply_rope_torch(src, None, cos.expand(3, -1, -1), sin.expand(3, -1, -1))
    out, none = rope.apply_rope_triton(k, None, cos, sin, inplace=True)
    assert none is None and out.data_ptr() == k.data_ptr()
    assert_close(k, rk, torch.float32, "rope in place")


def test_rope_matches_model_formula():
    from casa_live.model.rope import apply_rope as model_apply_rope

    q = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16)
    cos, sin = _cos_sin(2, 5, 16)
    with dispatch.force("torch"):
        ref, _ = dispatch.apply_rope(q, None, cos, sin)
    assert torch.equal(ref, model_apply_rope(q, cos, sin))
    with dispatch.force("triton"):
        out, _ = dispatch.apply_rope(q, None, cos, sin)
    assert_close(out, ref, torch.bfloat16, "dispatch rope")


def test_dispatch_rmsnorm_forced():
    x, r, w = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    with dispatch.force("triton"):
        y, h = dispatch.rms_norm(x, w, 1e-6, residual=r)
    with dispatch.force("torch"):
        ry, rh = dispatch.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, rh)
    assert_close(y, ry, torch.float32, "dispatch rmsnorm")
