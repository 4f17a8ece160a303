"""Shared test fixtures and helpers: the tolerance tables, `assert_close`, the toy checkpoint, the
device the kernel tests run on.

Fixtures are found by name; the helpers are imported as `from conftest import TOL, assert_close`
(tests/ is on sys.path, as for server_helpers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The kernel tests run in the Triton interpreter unless told otherwise (TRITON_INTERPRET=0 on a GPU
# runs the compiled kernels); set before any kernel module is imported, so KERNEL_DEVICE agrees.
os.environ.setdefault("TRITON_INTERPRET", "1")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"

# ---- tolerances ------------------------------------------------------------------------------------
# One table per kind of comparison, one value per dtype. No test passes a number of its own.

# Relative to the reference's largest magnitude, max|out - ref| / max|ref|: a kernel against its torch
# reference (same inputs, fp32 or same-dtype reference). A masking or indexing bug is O(1) here.
TOL = {
    # accumulation is fp32 on both sides, only the order differs (blocked online softmax, split-K
    # merge, fused reductions): ~1e-6 at these sizes, so 1e-5 is a 10x margin
    torch.float32: 1e-5,
    # fp16 unit roundoff is 2^-11 (4.9e-4): the output's final rounding plus P rounded to fp16 before
    # P @ V is about 2 ulps of the largest element, 2^-9 = 1.95e-3
    torch.float16: 2e-3,
    # bf16 ulp is 2^-7 (7.8e-3) and the interpreter's fp32 -> bf16 cast truncates (the GPU rounds to
    # nearest), so a value can land 1 ulp off before the output's own rounding: 2 ulps, 2^-6 = 1.56e-2
    torch.bfloat16: 1.6e-2,
}

# Absolute, max|out - ref|: fp32 model outputs (logits, vision features, pixel values, all O(1..10))
# from two implementations of one network: streaming with caches vs the dense reference, our import vs
# transformers, traced vs eager, a packed runner step vs the generic one.
ATOL = {
    # fp32 sums over at most a few hundred terms, in a different order, through a few layers give
    # ~1e-6; a wrong mask, position or cache slot gives > 1e-3 (the tests check that their
    # counterfactual inputs differ by more than that)
    torch.float32: 1e-5,
}

# Absolute, max|out - ref|: the same operations grouped differently, so only fp32 rounding of one
# matmul can differ (q/k/v from one fused matmul vs three, a CASA window's output when a frame it
# never sees is changed).
SAME_MATH_ATOL = {
    # one fp32 matmul over <= 64 terms of O(1) values rounds to ~1e-7; 1e-6 is a 10x margin
    torch.float32: 1e-6,
}


def _flat(x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.cat([t.detach().reshape(-1) for t in x])
    return x.detach()


def assert_close(
    out: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
    ref: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    what: str = "",
    *,
    atol: dict[torch.dtype, float] | None = None,
) -> None:
    """`out` matches `ref` within the tolerance for `dtype` (the precision the computation ran in).

    Without `atol`: max|out - ref| / max|ref| <= TOL[dtype]. With `atol` (ATOL or SAME_MATH_ATOL):
    max|out - ref| <= atol[dtype]. Lists/tuples of tensors are compared pairwise as one (same maxima).
    Shapes must match exactly (no broadcasting); dtypes must match, except that a relative check
    accepts an fp32 reference for a lower-precision `out`; a NaN in `out` fails (an unwritten or
    unmasked element). The failure message gives the max and mean absolute error, the max relative
    error and the tolerance.
    """
    if isinstance(out, (list, tuple)) or isinstance(ref, (list, tuple)):
        assert len(out) == len(ref), f"{what}: {len(out)} tensors != {len(ref)}"
    pairs = list(zip(out, ref)) if isinstance(out, (list, tuple)) else [(out, ref)]
    for o, r in pairs:
        assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        fp32_ref = atol is None and r.dtype == torch.float32
        assert o.dtype == r.dtype or fp32_ref, f"{what}: dtype {o.dtype} != {r.dtype}"
    out, ref = _flat(out).float(), _flat(ref).float()
    nan = int(out.isnan().sum())
    assert nan == 0, f"{what}: {nan} NaN in the output (unwritten element or unmasked read)"
    err = (out - ref).abs()
    max_abs, mean_abs = err.max().item(), err.mean().item()
    max_rel = max_abs / ref.abs().max().clamp_min(1e-6).item()
    stats = f"max abs err {max_abs:.3g}, mean abs err {mean_abs:.3g}, max rel err {max_rel:.3g}"
    if atol is None:
        assert max_rel <= TOL[dtype], f"{what}: {stats} > rel tol {TOL[dtype]:.3g} ({dtype})"
    else:
        assert max_abs <= atol[dtype], f"{what}: {stats} > abs tol {atol[dtype]:.3g} ({dtype})"


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight test-tiny checkpoint in our format (casa_live.model.checkpoint.toy), written
    once per session and shared read-only by every test that serves a model."""
    from casa_live.model.checkpoint.toy import toy_checkpoint

    return toy_checkpoint(tmp_path_factory.getbasetemp() / "toy")
