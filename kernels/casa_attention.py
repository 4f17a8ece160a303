"""Triton "prefix + causal segment" attention: CASA window prefill/decode and text-cache decode.

Semantics (kernels/reference.py holds the torch references, re-exported here):

    out[b, h, i] = softmax_j(q[b, h, i] . key_j * scale) . value_j
        over j in  prefix[b, :prefix_len[b]]        (all visible: the frame's image tokens)
                 + seg[b, :q_start[b] + i + 1]      (causal: window text, or the text KV cache)

Two layouts share one kernel:
- padded (the model's): q (B, H, T, D); prefix_k/v (B, Hkv, P, D); seg_k/v (B, Hkv, S, D);
  prefix_len, q_start (B,) device tensors. Any strides with a unit last dim.
- varlen (`prefix_causal_attention_varlen`, flash-attn style cu_seqlens): q (Nq, H, D) packed rows;
  prefix_k/v (Np, Hkv, D), seg_k/v (Ns, Hkv, D); cu_seqlens_* (B + 1,) int32/int64. The causal
  segment is bottom-right aligned: query i of row b sees seg[:seg_len - q_len + i + 1].

Design (see docs/kernels.md):
- Grid (query blocks, B * Hkv, NUM_SPLITS). GQA rows are packed: row r of a tile is query
  r // G_PAD of head kvh * G + r % G_PAD, so K/V are read once per KV head and the dot has
  M = BLOCK_Q * G_PAD >= 16 even in decode.
- Loop 1 walks the prefix (length mask only); loop 2 walks the causal segment up to the tile's
  last query (per-row mask). fp32 online softmax in base 2; no mask or score matrix in memory.
- Split-K (flash-decoding): split s takes the s-th chunk of both loops and writes a normalised
  fp32 partial plus its log2-sum-exp; `_merge_splits` reduces them in order (deterministic, no
  atomics). With NUM_SPLITS == 1 the kernel writes the output directly.
- Lengths are read on the device and the grid depends only on shapes: no host sync, so the call
  can be captured in a CUDA graph.
- Head dims that are not a power of two, or below 16 (the GPU dot needs K >= 16), are zero-padded
  in registers (BLOCK_D), never in memory.
- Under TRITON_INTERPRET=1 bf16 arithmetic is wrong, so the compute dtype (CDT) is fp32 there;
  on the GPU the dots run in the input dtype with fp32 accumulation ("ieee" for fp32 inputs).

Output: a (B, H, T, D) view of (B, T, H, D) storage, so the model's transpose + reshape back to
(B, T, H * D) is free.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from casa_live.kernels.reference import prefix_causal_attention_torch, prefix_causal_attention_varlen_torch

__all__ = [
    "prefix_causal_attention_torch",
    "prefix_causal_attention_triton",
    "prefix_causal_attention_varlen",
    "prefix_causal_attention_varlen_torch",
]

# Read once, at import: triton itself reads TRITON_INTERPRET when a kernel is decorated, so a later
# change of the variable would not switch the kernels either.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
# Tests set this: split-K workspaces start as NaN, so a partial the kernel forgot to write shows up.
POISON_WORKSPACE = False


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    s_kt,
    s_vt,
    start,
    load_hi,
    row_hi,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    CDT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One BLOCK_N tile of keys [start, start + BLOCK_N): keys < row_hi[r] are visible to row r."""
    kn = start + offs_n  # (N,)
    ld = (kn < load_hi)[:, None] & d_ok[None, :]
    k = tl.load(k_base + kn[:, None] * s_kt + offs_d[None, :], mask=ld, other=0.0).to(CDT)  # (N, D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (M, N) fp32, base-2 logits
    s = tl.where(kn[None, :] < row_hi[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 so that -inf - -inf never happens.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + kn[:, None] * s_vt + offs_d[None, :], mask=ld, other=0.0).to(CDT)  # (N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(CDT), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefix_causal_fwd(
    Q,
    KP,
    VP,
    KS,
    VS,
    OUT,
    OPART,
    LSE,
    prefix_len_ptr,
    q_start_ptr,
    cu_q,
    cu_p,
    cu_s,
    T,
    S,
    H,
    HKV,
    s_qb,
    s_qh,
    s_qt,
    s_kpb,
    s_kph,
    s_kpt,
    s_vpb,
    s_vph,
    s_vpt,
    s_ksb,
    s_ksh,
    s_kst,
    s_vsb,
    s_vsh,
    s_vst,
    qk_scale,
    HEAD_D: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_SEG: tl.constexpr,
    VARLEN: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    CDT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Q: (B, H, T, D) strides s_q* (varlen: token-major, s_qb = 0, rows from cu_q)
    # KP/VP: (B, Hkv, P, D); KS/VS: (B, Hkv, S, D); O: (B * T | Nq, H, D) contiguous
    # OPART: (B * T | Nq, H, NUM_SPLITS, D) fp32; LSE: (B * T | Nq, H, NUM_SPLITS) fp32 (log2)
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // HKV
    kvh = pid_bh % HKV

    if VARLEN:
        q0 = tl.load(cu_q + b).to(tl.int64)
        n_q = (tl.load(cu_q + b + 1) - q0).to(tl.int32)
    else:
        q0 = b.to(tl.int64) * 0
        n_q = T
    blk_q = pid_q * BLOCK_Q
    if blk_q >= n_q:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    qi = blk_q + offs_m // G_PAD  # (M,) query index inside the batch row
    g = offs_m % G_PAD
    h = kvh * G + g
    row_ok = (qi < n_q) & (g < G)

    q_rows = Q + b.to(tl.int64) * s_qb + (q0 + qi) * s_qt + h * s_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(CDT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_PREFIX:
        # Loop 1: image tokens, all visible up to the row's prefix length.
        if VARLEN:
            p0 = tl.load(cu_p + b).to(tl.int64)
            plen = (tl.load(cu_p + b + 1) - p0).to(tl.int32)
        else:
            p0 = b.to(tl.int64) * 0
            plen = tl.load(prefix_len_ptr + b).to(tl.int32)
        kp_base = KP + b.to(tl.int64) * s_kpb + kvh.to(tl.int64) * s_kph + p0 * s_kpt
        vp_base = VP + b.to(tl.int64) * s_vpb + kvh.to(tl.int64) * s_vph + p0 * s_vpt
        chunk = tl.cdiv(tl.cdiv(plen, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = pid_s * chunk
        hi = tl.minimum(lo + chunk, plen)
        p_hi = tl.zeros([BLOCK_M], tl.int32) + plen
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kp_base, vp_base, s_kpt, s_vpt, start, plen, p_hi, qk_scale,
                offs_n, offs_d, d_ok, CDT, DOT_PREC,
            )  # fmt: skip

    if HAS_SEG:
        # Loop 2: the causal segment; row i sees slots < q_start + i + 1 (clipped to the segment).
        if VARLEN:
            s0 = tl.load(cu_s + b).to(tl.int64)
            slen = (tl.load(cu_s + b + 1) - s0).to(tl.int32)
            qs = slen - n_q
        else:
            s0 = b.to(tl.int64) * 0
            slen = S
            qs = tl.load(q_start_ptr + b).to(tl.int32)
        ks_base = KS + b.to(tl.int64) * s_ksb + kvh.to(tl.int64) * s_ksh + s0 * s_kst
        vs_base = VS + b.to(tl.int64) * s_vsb + kvh.to(tl.int64) * s_vsh + s0 * s_vst
        row_hi = tl.minimum(qs + qi + 1, slen)  # (M,)
        seg_hi = tl.maximum(tl.minimum(qs + tl.minimum(blk_q + BLOCK_Q, n_q), slen), 0)
        chunk = tl.cdiv(tl.cdiv(seg_hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = pid_s * chunk
        hi = tl.minimum(lo + chunk, seg_hi)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, ks_base, vs_base, s_kst, s_vst, start, seg_hi, row_hi, qk_scale,
                offs_n, offs_d, d_ok, CDT, DOT_PREC,
            )  # fmt: skip

    # A row with no visible key has l == 0 and acc == 0: it outputs zeros.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if VARLEN:
        tok = q0 + qi
    else:
        tok = b.to(tl.int64) * T + qi
    st_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        o_rows = OUT + (tok * H + h) * HEAD_D
        tl.store(o_rows[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=st_mask)
    else:
        part = (tok * H + h) * NUM_SPLITS + pid_s
        tl.store(OPART + part[:, None] * HEAD_D + offs_d[None, :], out, mask=st_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + part, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    OPART,
    LSE,
    OUT,
    HEAD_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, head): O[r] = sum_s 2^(lse_s - m) * OPART[r, s] / sum_s 2^(lse_s - m)
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_D
    lse = tl.load(LSE + r * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0 -> output 0
    w = tl.math.exp2(lse - m)
    denom = tl.sum(w, 0)
    part = tl.load(
        OPART + (r * NUM_SPLITS + offs_s)[:, None] * HEAD_D + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * part, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + r * HEAD_D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def pick_config(t_rows: int, group: int, head_dim: int) -> dict[str, int]:
    """Fixed per-shape-class block config (no autotune: deterministic, interpreter-safe).

    Decode (few rows) uses 16-row tiles; prefill packs up to 128 rows (64 for D > 128) so the
    sm_90 compile emits wgmma. The interpreter gets the largest tiles: its cost is per tile.
    """
    g_pad = triton.next_power_of_2(group)
    rows = t_rows * g_pad
    cap = 128 if head_dim <= 128 else 64
    block_m = min(cap, max(16, triton.next_power_of_2(rows)))
    block_m = max(block_m, g_pad)
    block_n = 128 if INTERPRET else 64
    num_warps = 8 if block_m >= 128 or (block_m >= 64 and head_dim > 64) else 4
    return {"BLOCK_Q": block_m // g_pad, "BLOCK_N": block_n, "num_warps": num_warps}


def pick_splits(n_programs: int, n_keys: int, device: torch.device, block_n: int) -> int:
    """Flash-decoding split count from shapes only (no lengths: no host sync).

    Enough programs for two waves over the SMs, but no split shorter than 4 tiles; rounded down to
    a power of two.
    """
    if device.type != "cuda" or n_programs <= 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if n_programs >= sms:
        return 1
    by_sm = triton.cdiv(2 * sms, n_programs)
    by_len = max(1, n_keys // (4 * block_n))
    # a power of two: NUM_SPLITS is a constexpr, so a growing cache compiles at most 7 variants
    return 1 << (int(max(1, min(by_sm, by_len, 64))).bit_length() - 1)


def _launch(
    q: torch.Tensor,  # (B, H, T, D) view; varlen: (1, H, Nq, D) view of the packed (Nq, H, D)
    pk: torch.Tensor | None,  # (B, Hkv, P, D)
    pv: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    sk: torch.Tensor | None,  # (B, Hkv, S, D)
    sv: torch.Tensor | None,
    q_start: torch.Tensor | None,
    scale: float,
    n_batch: int,
    max_q: int,
    n_tok: int,
    cu: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None,
    num_splits: int | None,
    block_n: int | None,
    out: torch.Tensor | None = None,  # (n_tok, H, D) token-major storage to write into
) -> torch.Tensor:
    _, H, T, D = q.shape
    ref = pk if pk is not None else sk
    if ref is None:
        raise ValueError("prefix_causal_attention needs a prefix, a segment, or both")
    hkv = ref.shape[1]
    if H % hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({hkv})")
    tensors = [t for t in (q, pk, pv, sk, sv) if t is not None]
    if any(t.dtype != q.dtype for t in tensors):
        raise TypeError("q, k and v must share one dtype")
    q, pk, pv, sk, sv = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, pk, pv, sk, sv))
    group = H // hkv
    cfg = pick_config(max_q, group, D)
    bn = block_n or cfg["BLOCK_N"]
    if bn < 16:
        raise ValueError("BLOCK_N must be >= 16 (the GPU dot needs K >= 16)")
    n_keys = (pk.shape[2] if pk is not None else 0) + (sk.shape[2] if sk is not None else 0)
    grid_q = triton.cdiv(max_q, cfg["BLOCK_Q"])
    splits = num_splits or pick_splits(grid_q * n_batch * hkv, n_keys, q.device, bn)

    if out is None:
        out = torch.empty(n_tok, H, D, device=q.device, dtype=q.dtype)
    elif out.shape != (n_tok, H, D) or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {(n_tok, H, D)}")
    if splits > 1:
        alloc = torch.full if POISON_WORKSPACE else (lambda shape, _v, **kw: torch.empty(shape, **kw))
        opart = alloc((n_tok, H, splits, D), float("nan"), device=q.device, dtype=torch.float32)
        lse = alloc((n_tok, H, splits), float("nan"), device=q.device, dtype=torch.float32)
    else:
        opart = lse = out  # unused placeholders
    dummy = q
    kp, vp = (pk, pv) if pk is not None else (dummy, dummy)
    ks, vs = (sk, sv) if sk is not None else (dummy, dummy)
    z3 = (0, 0, 0)

    def strides(t: torch.Tensor | None) -> tuple[int, int, int]:
        if t is None:
            return z3
        # varlen: the batch row is found through cu_seqlens, never through a batch stride
        return (0 if cu is not None else t.stride(0), t.stride(1), t.stride(2))

    cu_q, cu_p, cu_s = cu if cu is not None else (dummy, dummy, dummy)
    _prefix_causal_fwd[(grid_q, n_batch * hkv, splits)](
        q, kp, vp, ks, vs, out, opart, lse,
        prefix_len if prefix_len is not None else dummy,
        q_start if q_start is not None else dummy,
        cu_q, cu_p if cu_p is not None else dummy, cu_s if cu_s is not None else dummy,
        T, sk.shape[2] if sk is not None else 0, H, hkv,
        *strides(q), *strides(pk), *strides(pv), *strides(sk), *strides(sv),
        scale * LOG2E,
        HEAD_D=D, G=group, G_PAD=triton.next_power_of_2(group),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_PREFIX=pk is not None, HAS_SEG=sk is not None, VARLEN=cu is not None,
        NUM_SPLITS=splits, CDT=_compute_dtype(q.dtype),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _merge_splits[(n_tok * H,)](
            opart, lse, out, HEAD_D=D, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
            BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=1 if D <= 64 else 2,
        )  # fmt: skip
    return out


def prefix_causal_attention_triton(
    q: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    q_start: torch.Tensor | None,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padded-batch entry, same signature and result as `prefix_causal_attention_torch`.

    q (B, H, T, D); prefix_k/v (B, Hkv, P, D) | None with prefix_len (B,); seg_k/v (B, Hkv, S, D)
    | None with q_start (B,). Returns (B, H, T, D) (a view of (B, T, H, D) storage).
    num_splits / block_n override the automatic choice (tests); out (B, T, H, D) contiguous is
    written in place when given (e.g. a NaN-poisoned buffer in tests).
    """
    B, H, T, D = q.shape
    if prefix_k is not None and prefix_len is None:
        raise ValueError("prefix_k needs prefix_len")
    if seg_k is not None and q_start is None:
        raise ValueError("seg_k needs q_start")
    out = _launch(
        q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, q_start, scale,
        n_batch=B, max_q=T, n_tok=B * T, cu=None, num_splits=num_splits, block_n=block_n,
        out=None if out is None else out.view(B * T, H, D),
    )  # fmt: skip
    return out.view(B, T, H, D).transpose(1, 2)


def prefix_causal_attention_varlen(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    cu_seqlens_prefix: torch.Tensor | None,
    seg_k: torch.Tensor | None,
    seg_v: torch.Tensor | None,
    cu_seqlens_seg: torch.Tensor | None,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed ragged windows (flash-attn varlen style), one launch for all sessions.

    q (Nq, H, D) with cu_seqlens_q (B + 1,); prefix_k/v (Np, Hkv, D) with cu_seqlens_prefix;
    seg_k/v (Ns, Hkv, D) with cu_seqlens_seg. Row b's queries are the last q_len of its segment
    (bottom-right causal). max_seqlen_q is a host int bounding every q_len (sizes the grid).
    Returns (Nq, H, D).
    """
    n_tok = q.shape[0]
    n_batch = cu_seqlens_q.numel() - 1
    if (prefix_k is None) != (cu_seqlens_prefix is None) or (seg_k is None) != (cu_seqlens_seg is None):
        raise ValueError("each of prefix_k / seg_k needs its cu_seqlens")
    q4 = q.transpose(0, 1).unsqueeze(0)  # (1, H, Nq, D): strides (_, s_h, s_t, 1)
    as4 = lambda t: None if t is None else t.transpose(0, 1).unsqueeze(0)  # noqa: E731
    return _launch(
        q4, as4(prefix_k), as4(prefix_v), None, as4(seg_k), as4(seg_v), None, scale,
        n_batch=n_batch, max_q=max_seqlen_q, n_tok=n_tok,
        cu=(cu_seqlens_q, cu_seqlens_prefix, cu_seqlens_seg), num_splits=num_splits, block_n=block_n,
        out=out,
    )  # fmt: skip
