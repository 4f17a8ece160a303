"""Triton prefix+causal attention vs its torch reference, in the interpreter (CPU).

Every case: fresh seeded random inputs, several sessions per launch with ragged lengths, K/V arenas
whose unused slots are NaN (an unmasked read turns the output NaN), and a NaN-poisoned output
buffer (an unwritten element fails). Tolerance = max|out - ref| / max|ref| against an fp32
reference, per dtype in TOL (tests/conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close

pytest.importorskip("triton")

from casa_live.kernels import casa_attention as ca
from casa_live.kernels import dispatch

# Interpreter on CPU by default; with a GPU and TRITON_INTERPRET=0 the same tests run the compiled
# kernels on CUDA (every tensor is created on KERNEL_DEVICE through the autouse fixture).


@pytest.fixture(autouse=True)
def _poison_workspace(monkeypatch):
    monkeypatch.setattr(ca, "POISON_WORKSPACE", True)
    torch.manual_seed(0)
    with torch.device(KERNEL_DEVICE):
        yield


def make_case(
    B: int, H: int, Hkv: int, D: int, T: int, plens: list[int] | None, qstarts: list[int] | None, dtype
) -> dict:
    """Padded inputs with NaN in every K/V slot the reference would not read for valid rows."""
    q = torch.randn(B, H, T, D, dtype=dtype)
    case = {"q": q, "pk": None, "pv": None, "plen": None, "sk": None, "sv": None, "qs": None}
    if plens is not None:
        P = max(plens) + 3  # capacity > every length: slack is poison
        pk, pv = torch.randn(2, B, Hkv, P, D, dtype=dtype)
        for b, n in enumerate(plens):
            pk[b, :, n:] = float("nan")
            pv[b, :, n:] = float("nan")
        case.update(pk=pk, pv=pv, plen=torch.tensor(plens))
    if qstarts is not None:
        S = max(qstarts) + T + 2
        sk, sv = torch.randn(2, B, Hkv, S, D, dtype=dtype)
        for b, s0 in enumerate(qstarts):
            sk[b, :, s0 + T :] = float("nan")
            sv[b, :, s0 + T :] = float("nan")
        case.update(sk=sk, sv=sv, qs=torch.tensor(qstarts))
    return case


def reference(c: dict) -> torch.Tensor:
    def clean(t):  # fp32, poison zeroed (SDPA multiplies masked V by 0: NaN would leak)
        return None if t is None else torch.nan_to_num(t.float(), nan=0.0)

    D = c["q"].shape[-1]
    return dispatch.prefix_causal_attention_torch(
        clean(c["q"]),
        clean(c["pk"]),
        clean(c["pv"]),
        c["plen"],
        clean(c["sk"]),
        clean(c["sv"]),
        c["qs"],
        D**-0.5,
    )


def run_triton(c: dict, **kw) -> torch.Tensor:
    B, H, T, D = c["q"].shape
    out = torch.full((B, T, H, D), float("nan"), dtype=c["q"].dtype)
    return ca.prefix_causal_attention_triton(
        c["q"], c["pk"], c["pv"], c["plen"], c["sk"], c["sv"], c["qs"], D**-0.5, out=out, **kw
    )


# (image tokens, text tokens, head_dim, (H, Hkv)): every image length meets every text length;
# head dims and GQA ratios 1/2/8 rotate through the grid so each appears several times.
HEADS = [(2, 2), (4, 2), (8, 1)]
GRID = [
    (n_img, n_txt, (64, 128)[(i + j) % 2], HEADS[(i + 2 * j) % 3])
    for i, n_img in enumerate((1, 7, 256))
    for j, n_txt in enumerate((1, 3, 65))
]


@pytest.mark.parametrize(("n_img", "n_txt", "D", "heads"), GRID)
def test_window_prefill_fp32(n_img, n_txt, D, heads):
    """CASA window prefill: queries = the window's text; 3 sessions with ragged image lengths."""
    H, Hkv = heads
    c = make_case(3, H, Hkv, D, n_txt, [n_img, max(0, n_img // 2), 1], [0, 0, 0], torch.float32)
    assert_close(run_triton(c), reference(c), torch.float32, "prefill")


@pytest.mark.parametrize(("n_img", "n_txt", "D", "heads"), GRID)
def test_window_decode_fp32(n_img, n_txt, D, heads):
    """CASA decode: one new token per session at ragged window offsets."""
    H, Hkv = heads
    c = make_case(3, H, Hkv, D, 1, [n_img, 1, max(0, n_img - 3)], [n_txt - 1, 0, n_txt // 2], torch.float32)
    assert_close(run_triton(c), reference(c), torch.float32, "decode")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n_img", "n_txt", "D", "heads"), [(256, 65, 128, (8, 1)), (7, 3, 64, (4, 2))])
def test_low_precision(dtype, n_img, n_txt, D, heads):
    H, Hkv = heads
    c = make_case(2, H, Hkv, D, n_txt, [n_img, n_img // 2 + 1], [0, 2], dtype)
    assert_close(run_triton(c), reference(c), dtype, f"{dtype}")


@pytest.mark.parametrize("splits", [3, 7])
def test_split_k_text_decode(splits):
    """Self-attention decode over a text cache (no prefix), flash-decoding with empty splits."""
    c = make_case(4, 8, 2, 64, 1, None, [299, 0, 130, 64], torch.float32)
    out = run_triton(c, num_splits=splits, block_n=16)
    assert_close(out, reference(c), torch.float32, f"splits={splits}")
    one = run_triton(c, num_splits=1, block_n=16)
    assert_close(out, one, torch.float32, "split invariance")


def test_split_k_casa_decode_bf16():
    c = make_case(3, 8, 1, 128, 1, [256, 7, 1], [64, 2, 0], torch.bfloat16)
    assert_close(run_triton(c, num_splits=4), reference(c), torch.bfloat16, "casa split bf16")


def test_prefix_only_and_empty_rows():
    """Plain cross-attention (no segment); a row with prefix_len 0 has no visible key -> zeros."""
    c = make_case(3, 4, 2, 64, 5, [7, 0, 1], None, torch.float32)
    out = run_triton(c)
    assert_close(out, reference(c), torch.float32, "prefix only")
    assert (out[1] == 0).all()


def test_small_and_odd_head_dims():
    """head_dim 8 and the tiny test model's 16 (padded to the GPU dot's K >= 16) and a non-power-of-two 80."""
    for D in (8, 16, 80):
        c = make_case(2, 4, 2, D, 3, [7, 2], [1, 0], torch.float32)
        assert_close(run_triton(c), reference(c), torch.float32, f"D={D}")


def test_strided_views():
    """q as a transposed view of a (B, T, H, D) projection output; K/V as views into a wider arena."""
    B, T, H, Hkv, D = 2, 5, 4, 2, 64
    q = torch.randn(B, T, H, D).transpose(1, 2)  # (B, H, T, D), non-contiguous
    arena = torch.randn(B, Hkv, 40, 2, D)  # interleaved k/v slots
    pk, pv = arena[:, :, :20, 0], arena[:, :, :20, 1]
    sk, sv = arena[:, :, 20:, 0], arena[:, :, 20:, 1]
    c = {
        "q": q,
        "pk": pk,
        "pv": pv,
        "plen": torch.tensor([20, 9]),
        "sk": sk,
        "sv": sv,
        "qs": torch.tensor([3, 0]),
    }
    assert_close(run_triton(c), reference(c), torch.float32, "strided")


def test_dispatch_forced_triton_matches_torch():
    c = make_case(2, 4, 2, 64, 3, [7, 1], [0, 4], torch.float32)
    c = {
        k: (torch.nan_to_num(v) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in c.items()
    }
    args = (c["q"], c["pk"], c["pv"], c["plen"], c["sk"], c["sv"], c["qs"], 0.125)
    with dispatch.force("triton"):
        out = dispatch.prefix_causal_attention(*args)
    with dispatch.force("torch"):
        ref = dispatch.prefix_causal_attention(*args)
    assert_close(out, ref, torch.float32, "dispatch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_packed_windows(dtype):
    """cu_seqlens entry: 4 sessions packed, ragged image / window / query counts, one launch."""
    H, Hkv, D = 8, 2, 64
    q_lens, p_lens, s_lens = [3, 1, 65, 1], [7, 0, 256, 1], [3, 40, 65, 1]
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(q_lens), H, D, dtype=dtype)
    # 5 NaN rows past the last session: a read past a row's cu_seqlens range shows up
    pk, pv = torch.randn(2, sum(p_lens) + 5, Hkv, D, dtype=dtype)
    sk, sv = torch.randn(2, sum(s_lens) + 5, Hkv, D, dtype=dtype)
    for t in (pk, pv, sk, sv):
        t[-5:] = float("nan")
    args = (q, cu(q_lens), max(q_lens), pk, pv, cu(p_lens), sk, sv, cu(s_lens), D**-0.5)
    out = torch.full_like(q, float("nan"))
    ca.prefix_causal_attention_varlen(*args, out=out)
    ref = ca.prefix_causal_attention_varlen_torch(
        *(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    )
    assert_close(out, ref, dtype, "varlen")


def test_deterministic():
    c = make_case(2, 8, 1, 64, 3, [33, 2], [5, 0], torch.float32)
    a, b = run_triton(c, num_splits=3), run_triton(c, num_splits=3)
    assert torch.equal(a, b)
