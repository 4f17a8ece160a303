"""The fixed-shape decode step: one text token for each of B batch rows, as one graph.

`decode_step` is what the engine runs almost every tick, so it is written to be compiled
(`torch.compile` on CPU, CUDA graphs on GPU; model/engine/runner.py owns that choice):
- static shapes: the step covers batch rows [0, B) (B is padded to a bucket by the runner) and
  attends over the first S slots of the text cache and the first Wb slots of the CASA window
  (both rounded up by the runner, so few distinct shapes occur);
- every per-row quantity is a tensor on the model's device: the token, its cache slot, its
  positions, its window slot. The step reads no host value and has no `nonzero()`;
- the step is a pure function of the caches: it returns the new K/V and `commit` writes them for
  all layers in one op per buffer;
- rows of [0, B) without a token this tick ("idle": padding, or a row waiting for a frame) still go
  through the same arithmetic, but their K/V goes into a scratch slot past the cache's capacity
  (TextCache and CASAState allocate one) and their outputs are ignored. Their state is untouched.

The math is `LanguageModel.step` at T = 1 (same modules, same summation order), so streaming ==
dense holds through either path; tests/test_runner.py checks decode == eager step == compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from casa_live.kernels.dispatch import apply_rope, cpu_decode_layers, decode_attention, ragged_cpu_available
from casa_live.model.cache import StreamState
from casa_live.model.lm import LanguageModel


@dataclass
class DecodeInputs:
    """Per-row inputs of one decode step, all (B,) int64 tensors on the model's device.

    tokens:   token id to feed (any id for idle rows).
    sa_slot:  text-cache slot the token's K/V goes to (the row's length before the step); the
              scratch slot `capacity` for idle rows. The query sees slots < sa_slot and itself.
    sa_pos:   its RoPE position in self-attention (== sa_slot for CASA models, whose positions are
              cache slots; the absolute position for the token-insertion baseline).
    ca_slot:  CASA window slot (== window-local position); the scratch slot `window` for idle rows.
    n_img:    image tokens of the row's current frame (0 = no frame yet).
    """

    tokens: torch.Tensor
    sa_slot: torch.Tensor
    sa_pos: torch.Tensor
    ca_slot: torch.Tensor
    n_img: torch.Tensor
    # fused step only: entry j is batch row rows[j], and the entries are the concatenation of the
    # contiguous batch-row ranges `segments` (host ints). None: entry j is batch row j.
    rows: torch.Tensor | None = None
    segments: list[tuple[int, int]] | None = None


@dataclass
class NewKV:
    """The K/V the step computed for its tokens, to be written by `commit` in one op per buffer:
    sa (L, B, Hkv, D) for the text cache, ca (Lc, B, Hkv, D) for the CASA windows (None without)."""

    sa_k: torch.Tensor
    sa_v: torch.Tensor
    ca_k: torch.Tensor | None
    ca_v: torch.Tensor | None


def _text_cos_sin(lm: LanguageModel, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) text positions -> cos, sin (B, 1, D). Text is (p, p, p) in M-RoPE, i.e. plain RoPE."""
    angles = pos.to(torch.float32)[:, None] * lm.freqs  # (B, D/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def decode_step(
    lm: LanguageModel, state: StreamState, inp: DecodeInputs, S: int, Wb: int
) -> tuple[torch.Tensor, NewKV]:
    """Feed one token to each row of [0, B); returns logits (B, V) float32 and the new K/V.

    Pure: the caches are read, never written (the new token's key is attended to directly), so
    the graph has no mutation for the compiler to handle. S: text-cache slots read (> max sa_slot
    over working rows); Wb: CASA window slots read (> max ca_slot over working rows).
    """
    B = inp.tokens.shape[0]
    text, cs = state.text, state.casa
    x = lm.embed_tokens(inp.tokens)[:, None]  # (B, 1, hidden)
    cos, sin = _text_cos_sin(lm, inp.sa_pos)
    casa_index = {blk: i for i, blk in enumerate(lm.casa_ids)}
    ca_cos = ca_sin = None
    if cs is not None and lm.casa_ids and lm.fusion == "casa":
        ca_cos, ca_sin = _text_cos_sin(lm, inp.ca_slot)
    N = cs.img_k.shape[3] if cs is not None else 0
    sa_k, sa_v, ca_k, ca_v = [], [], [], []
    for li, block in enumerate(lm.layers):
        h = block.input_layernorm(x)
        q, k, v = block.self_attn.qkv(h)  # (B, H, 1, D), (B, Hkv, 1, D) x 2
        qs, ks = apply_rope(q, k, cos, sin)
        sa_k.append(ks[:, :, 0])
        sa_v.append(v[:, :, 0])
        o = decode_attention(
            qs, ks, v, text.k[li, :B], text.v[li, :B], inp.sa_slot, None, None, None, lm.scale, S
        )
        a = block.self_attn.out(o)
        ci = casa_index.get(li)
        if ci is not None:
            assert cs is not None and block.casa is not None
            norm, proj = block.casa_parts()
            cq, ck, cv = (q, k, v) if block.casa.shared else proj.qkv(norm(x))
            if block.casa.use_rope:
                cq, ck = apply_rope(cq, ck, ca_cos, ca_sin)
            if block.casa.text_keys:
                ca_k.append(ck[:, :, 0])
                ca_v.append(cv[:, :, 0])
                c = decode_attention(
                    cq, ck, cv, cs.win_k[ci, :B], cs.win_v[ci, :B], inp.ca_slot,
                    cs.img_k[ci, :B, :, :N], cs.img_v[ci, :B, :, :N], inp.n_img, lm.scale, Wb,
                )  # fmt: skip
            else:  # plain cross-attention: the frame's image tokens only
                c = decode_attention(
                    cq, None, None, None, None, None,
                    cs.img_k[ci, :B, :, :N], cs.img_v[ci, :B, :, :N], inp.n_img, lm.scale,
                )  # fmt: skip
            x, a = x + a, proj.out(c)  # (x + sa) + casa: the summation order of the dense reference
        n, out = block.post_attention_layernorm.add_forward(a, x)
        x = out + block.mlp(n)
    new = NewKV(
        torch.stack(sa_k),
        torch.stack(sa_v),
        torch.stack(ca_k) if ca_k else None,
        torch.stack(ca_v) if ca_v else None,
    )
    return lm.logits(lm.norm(x)[:, 0]).float(), new


def _flat_rows(layers: int, B: int, heads: int, slots: int, slot: torch.Tensor, bmax: int) -> torch.Tensor:
    """Row indices into a (L*Bmax*Hkv*C, D) view of an (L, Bmax, Hkv, C, D) buffer for every
    (layer, row b < B, head) at slot[b]: (L*B*Hkv,), in the order of an (L, B, Hkv, D) source."""
    dev = slot.device
    li = torch.arange(layers, device=dev)[:, None, None]
    b = torch.arange(B, device=dev)[None, :, None]
    h = torch.arange(heads, device=dev)[None, None, :]
    return (((li * bmax + b) * heads + h) * slots + slot[None, :, None]).reshape(-1)


def commit(state: StreamState, inp: DecodeInputs, new: NewKV) -> None:
    """Write the step's K/V into the caches: one index_copy_ per buffer for all layers. Idle rows
    write into the scratch slot. Lengths are the caller's (host-side) business."""
    text, cs = state.text, state.casa
    L, B, Hkv, D = new.sa_k.shape
    rows = _flat_rows(L, B, Hkv, text.k.shape[3], inp.sa_slot, text.k.shape[1])
    text.k.view(-1, D).index_copy_(0, rows, new.sa_k.reshape(-1, D))
    text.v.view(-1, D).index_copy_(0, rows, new.sa_v.reshape(-1, D))
    if new.ca_k is not None and cs is not None:
        Lc = new.ca_k.shape[0]
        rows = _flat_rows(Lc, B, Hkv, cs.k.shape[3], inp.ca_slot + cs.image_tokens, cs.k.shape[1])
        cs.k.view(-1, D).index_copy_(0, rows, new.ca_k.reshape(-1, D))
        cs.v.view(-1, D).index_copy_(0, rows, new.ca_v.reshape(-1, D))


# ---- the hand-fused CPU step ---------------------------------------------------------------------


# Up to this many rows, the fused step runs every layer in one C call where the CPU kernel runs
# (kernels/cpu_attention.c `casa_decode_layers`); past it, TorchScript and MKL's matmuls, which
# the batch has made as fast (measured even at ~96 rows: docs/engine.md, "The decode step in C").
C_STEP_ROWS = 64


def _c_layers(lm: LanguageModel, w: FusedWeights):  # type: ignore[no-untyped-def]
    """The C step's function and weight table for this model (kernels/dispatch.py
    `cpu_decode_layers`), made on first use; None where it does not run."""
    if "_c_layers" not in lm.__dict__:
        lm.__dict__["_c_layers"] = cpu_decode_layers(w, lm.cfg.hidden, lm.cfg.mlp, lm.cfg.head_dim)
    return lm.__dict__["_c_layers"]


def _rope_tables(lm: LanguageModel, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) positions -> cos, signed sin (B, 1, 1, D) such that RoPE(x) = x * cos + roll(x, D/2) *
    sin: roll(x, D/2) = [x2, x1] and sin = [-s, s] give exactly rotate_half(x) * [s, s]."""
    ang = pos.to(torch.float32)[:, None] * lm.freqs  # (B, D/2)
    c, s = ang.cos(), ang.sin()
    B, D = pos.shape[0], 2 * ang.shape[1]
    return torch.cat([c, c], -1).view(B, 1, 1, D), torch.cat([-s, s], -1).view(B, 1, 1, D)


def _bias(visible: torch.Tensor) -> torch.Tensor:
    """(B, K) bool -> (B, 1, 1, K) additive attention bias (0 visible, -inf hidden)."""
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))[:, None, None, :]


@dataclass
class FusedWeights:
    """The weights the fused step reads, as flat per-layer lists (what TorchScript can take):
    self-attention and MLP per layer; CASA per CASA layer (`casa_of[layer]` its index, -1 none),
    whose norm and projections are None where CASA shares the block's."""

    ln1: list[torch.Tensor]
    qkv_w: list[torch.Tensor]
    qkv_b: list[torch.Tensor | None]
    o_w: list[torch.Tensor]
    o_b: list[torch.Tensor | None]
    ln2: list[torch.Tensor]
    gu_w: list[torch.Tensor]
    gu_b: list[torch.Tensor | None]
    dn_w: list[torch.Tensor]
    dn_b: list[torch.Tensor | None]
    casa_of: list[int]
    c_norm: list[torch.Tensor | None]
    c_qkv_w: list[torch.Tensor | None]
    c_qkv_b: list[torch.Tensor | None]
    c_o_w: list[torch.Tensor]
    c_o_b: list[torch.Tensor | None]

    @classmethod
    def of(cls, lm: LanguageModel) -> FusedWeights:
        """Views of the model's (fused) parameters: nothing is copied, so a weight update shows."""
        w = cls([], [], [], [], [], [], [], [], [], [], [], [], [], [], [], [])
        for block in lm.layers:
            sa, mlp = block.self_attn, block.mlp
            assert sa._qkv is not None and mlp._gate_up is not None, "fuse_projections() first"
            w.ln1.append(block.input_layernorm.weight)
            w.qkv_w.append(sa._qkv[0])
            w.qkv_b.append(sa._qkv[1])
            w.o_w.append(sa.o_proj.weight)
            w.o_b.append(sa.o_proj.bias)
            w.ln2.append(block.post_attention_layernorm.weight)
            w.gu_w.append(mlp._gate_up[0])
            w.gu_b.append(mlp._gate_up[1])
            w.dn_w.append(mlp.down_proj.weight)
            w.dn_b.append(mlp.down_proj.bias)
            if block.casa is None:
                w.casa_of.append(-1)
                continue
            w.casa_of.append(len(w.c_o_w))
            norm, proj = block.casa_parts()
            own = not block.casa.shared
            assert not own or proj._qkv is not None, "fuse_projections() first"
            w.c_norm.append(norm.weight if own else None)
            w.c_qkv_w.append(proj._qkv[0] if own else None)  # type: ignore[index]
            w.c_qkv_b.append(proj._qkv[1] if own else None)  # type: ignore[index]
            w.c_o_w.append(proj.o_proj.weight)
            w.c_o_b.append(proj.o_proj.bias)
        return w


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    segments: list[tuple[int, int]],
    Hkv: int,
    scale: float,
) -> torch.Tensor:
    """q (B, H, 1, D) -> (n, Hkv, G, D) grouped per segment; keys/values (Bmax, Hkv, K, D) are a
    layer's whole buffer, read in place for each segment's rows; -> (B, H*D)."""
    H, D = q.shape[1], q.shape[3]
    outs: list[torch.Tensor] = []
    j = 0
    for a, b in segments:
        n = b - a
        qg = q[j : j + n].reshape(n, Hkv, H // Hkv, D)
        s = torch.add(bias[j : j + n], torch.matmul(qg, keys[a:b].transpose(-1, -2)), alpha=scale)
        outs.append(torch.matmul(torch.softmax(s, dim=-1), values[a:b]).reshape(n, H * D))
        j += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _qkv_rope(
    y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, Hkv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, (H + 2 Hkv) D) from the fused projection -> q (B, H, 1, D), k, v (B*Hkv, D)."""
    B, D = y.shape[0], cos.shape[-1]
    qk = y[:, : (H + Hkv) * D].view(B, H + Hkv, 1, D)
    qk = qk * cos + qk.roll(D // 2, -1) * sin
    return qk[:, :H], qk[:, H:].reshape(B * Hkv, D), y[:, (H + Hkv) * D :].reshape(B * Hkv, D)


def _fused_layers(
    x: torch.Tensor,
    ln1: list[torch.Tensor],
    qkv_w: list[torch.Tensor],
    qkv_b: list[torch.Tensor | None],
    o_w: list[torch.Tensor],
    o_b: list[torch.Tensor | None],
    ln2: list[torch.Tensor],
    gu_w: list[torch.Tensor],
    gu_b: list[torch.Tensor | None],
    dn_w: list[torch.Tensor],
    dn_b: list[torch.Tensor | None],
    casa_of: list[int],
    c_norm: list[torch.Tensor | None],
    c_qkv_w: list[torch.Tensor | None],
    c_qkv_b: list[torch.Tensor | None],
    c_o_w: list[torch.Tensor],
    c_o_b: list[torch.Tensor | None],
    text_k: torch.Tensor,
    text_v: torch.Tensor,
    sa_rows: torch.Tensor,
    S: int,
    sa_cos: torch.Tensor,
    sa_sin: torch.Tensor,
    sa_bias: torch.Tensor,
    ca_k: torch.Tensor,
    ca_v: torch.Tensor,
    ca_rows: torch.Tensor,
    K_ca: int,
    ca_cos: torch.Tensor,
    ca_sin: torch.Tensor,
    ca_bias: torch.Tensor,
    segments: list[tuple[int, int]],
    H: int,
    Hkv: int,
    eps: float,
    scale: float,
    ragged: bool,
    att_rows: torch.Tensor,
    sa_rng: torch.Tensor,
    ca_rng: torch.Tensor,
) -> torch.Tensor:
    """Every layer of the fused step: x (B, hidden) embeddings -> final hidden states (before the
    last norm). Plain tensors, ints and lists only, so that TorchScript compiles it unchanged
    (`ScriptedStep`): the same ops in the same order either way. Writes each layer's new K/V into
    the caches (text_k/v (L, Bmax, Hkv, C, D), ca_k/v (Lc, Bmax, Hkv, N + W + 1 + ..., D)) at the
    flat rows sa_rows / ca_rows of layer 0 (B*Hkv,), offset by one layer's stride per layer.
    Attention: with `ragged`, one `casa::ragged_decode_attention` op per layer (kernels/dispatch.py),
    entry j reading row att_rows[j] over its visible ranges sa_rng / ca_rng (3, B): (a_end,
    b_start, b_end); otherwise `_attend` over the segments with the biases."""
    D = text_k.shape[-1]
    hidden = x.shape[-1]
    k_flat, v_flat = text_k.view(-1, D), text_v.view(-1, D)
    sa_stride = text_k.shape[1] * text_k.shape[2] * text_k.shape[3]
    ca_stride = ca_k.shape[1] * ca_k.shape[2] * ca_k.shape[3]
    for li in range(len(ln1)):
        h = torch.rms_norm(x, [hidden], ln1[li], eps)
        y = F.linear(h, qkv_w[li], qkv_b[li])
        q, k, v = _qkv_rope(y, sa_cos, sa_sin, H, Hkv)
        rows = sa_rows + li * sa_stride
        k_flat.index_copy_(0, rows, k)
        v_flat.index_copy_(0, rows, v)
        if ragged:
            o = torch.ops.casa.ragged_decode_attention(
                q, text_k[li], text_v[li], att_rows, sa_rng[0], sa_rng[1], sa_rng[2], scale
            )
        else:
            o = _attend(q, text_k[li, :, :, :S], text_v[li, :, :, :S], sa_bias, segments, Hkv, scale)
        a = F.linear(o, o_w[li], o_b[li])  # (B, hidden)
        ci = casa_of[li]
        if ci >= 0:
            cw = c_qkv_w[ci]
            if cw is None:
                yc = y  # shared: the self-attention's un-rotated projections
            else:
                cn = c_norm[ci]
                assert cn is not None
                yc = F.linear(torch.rms_norm(x, [hidden], cn, eps), cw, c_qkv_b[ci])
            cq, ck, cv = _qkv_rope(yc, ca_cos, ca_sin, H, Hkv)
            rows = ca_rows + ci * ca_stride
            ca_k.view(-1, D).index_copy_(0, rows, ck)
            ca_v.view(-1, D).index_copy_(0, rows, cv)
            if ragged:
                c = torch.ops.casa.ragged_decode_attention(
                    cq, ca_k[ci], ca_v[ci], att_rows, ca_rng[0], ca_rng[1], ca_rng[2], scale
                )
            else:
                c = _attend(cq, ca_k[ci, :, :, :K_ca], ca_v[ci, :, :, :K_ca], ca_bias, segments, Hkv, scale)
            x, a = x + a, F.linear(c, c_o_w[ci], c_o_b[ci])
        # the post-attention norm of x + a (kernels/reference.py rms_norm_torch, same sums)
        x = a + x
        n = torch.rms_norm(x, [hidden], ln2[li], eps)
        gate, up = F.linear(n, gu_w[li], gu_b[li]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, dn_w[li], dn_b[li])
    return x


def fused_decode_step(
    lm: LanguageModel,
    state: StreamState,
    inp: DecodeInputs,
    S: int,
    Wb: int,
    layers: Callable[..., torch.Tensor] | None = None,
    ragged: bool | None = None,
) -> tuple[torch.Tensor, None]:
    """`decode_step` for fp32 on the CPU, with about a third of its ops (the step is bound by op
    dispatch, not arithmetic: docs/engine.md). Same inputs and results; the differences are
    how, not what:
    - K/V are written into the caches as each layer computes them (two index_copy_ per layer into
      precomputed flat rows) and attention reads them back, instead of a separate new-key term;
    - visibility is an additive bias built once per step and shared by every layer;
    - RoPE of q and k is one pass over the fused projection (see `_rope_tables`);
    - a CASA layer attends to its frame and window with one matmul over the [image | window]
      buffer of CASAState;
    - only the rows in `inp.segments` are computed: attention reads each segment's rows of the
      caches in place, so idle rows cost nothing unless a segment spans them (model/engine/runner.py
      merges segments across short gaps to bound the number of matmuls);
    - `ragged` (default: where the C kernel runs, `ragged_cpu_available()`): attention is one op
      per layer that reads each entry's row over its own visible slots, with no bias and no
      padding to the longest row (docs/engine.md, "The ragged decode attention").
    Supports fusion "casa" (separate or shared) and the insertion baseline; "ca" uses decode_step.
    `layers`: what runs `_fused_layers` (`ScriptedStep` passes its TorchScript compilation).
    """
    cfg = lm.cfg
    B = inp.tokens.shape[0]  # entries (working rows, and idle rows inside a segment)
    Hkv = cfg.kv_heads
    text, cs = state.text, state.casa
    dev = inp.tokens.device
    batch_rows = inp.rows if inp.rows is not None else torch.arange(B, device=dev)
    sa_cos, sa_sin = _rope_tables(lm, inp.sa_pos)
    ca_cos, ca_sin = _rope_tables(lm, inp.ca_slot) if lm.casa_ids else (sa_cos, sa_sin)
    w = lm.__dict__.get("_fused_weights")
    if w is None:
        w = lm.__dict__["_fused_weights"] = FusedWeights.of(lm)
    if ragged is None:
        ragged = ragged_cpu_available()
    if ragged and B <= C_STEP_ROWS and (c_layers := _c_layers(lm, w)) is not None:
        # every layer in one C call (a small batch's step is op dispatch, not arithmetic); it
        # needs only the RoPE tables of the set-up below
        run, table = c_layers
        D = cfg.head_dim
        x = lm.embed_tokens(inp.tokens).contiguous()
        N = cs.image_tokens if cs is not None else 0
        dims = (B, cfg.hidden, cfg.layers, cfg.heads, Hkv, D, cfg.mlp, N, text.k.shape[1])
        run(
            x, table, dims, text.k, text.v, cs.k if lm.casa_ids else None, cs.v if lm.casa_ids else None,
            batch_rows, inp.sa_slot, inp.ca_slot, inp.n_img,
            tuple(t.reshape(B, D) for t in (sa_cos, sa_sin, ca_cos, ca_sin)), cfg.eps, lm.scale,
        )  # fmt: skip
        return lm.logits(lm.norm(x)).float(), None
    heads = torch.arange(Hkv, device=dev)
    segments = inp.segments if inp.segments is not None else [(0, B)]
    rows_b = batch_rows[:, None] * Hkv + heads[None, :]  # (B, Hkv)
    sa_rows = (rows_b * text.k.shape[3] + inp.sa_slot[:, None]).reshape(-1)  # (B*Hkv,) in layer 0
    zero = torch.zeros(B, dtype=torch.long, device=dev)
    if ragged:  # visible ranges (a_end, b_start, b_end) instead of biases: [0, slot]
        sa_bias = inp.sa_slot.new_zeros((1, 1, 1, 1), dtype=torch.float32)
        sa_rng = torch.stack([inp.sa_slot + 1, zero, zero])
    else:
        sa_bias = _bias(torch.arange(S, device=dev)[None, :] <= inp.sa_slot[:, None])  # (B, 1, 1, S)
        sa_rng = zero[None]
    if lm.casa_ids:
        assert cs is not None and lm.fusion == "casa"
        N = cs.image_tokens
        ca_rows = (rows_b * cs.k.shape[3] + (N + inp.ca_slot)[:, None]).reshape(-1)
        if ragged:  # the frame's image tokens [0, n_img) and the window's text [N, N + slot]
            ca_bias = sa_bias
            ca_rng = torch.stack([inp.n_img, zero + N, inp.ca_slot + (N + 1)])
        else:
            j = torch.arange(N + Wb, device=dev)[None, :]
            ca_bias = _bias(torch.where(j < N, j < inp.n_img[:, None], j - N <= inp.ca_slot[:, None]))
            ca_rng = sa_rng
        ca_k, ca_v, K_ca = cs.k, cs.v, N + Wb
    else:  # no CASA layer reads these
        ca_k = ca_v = ca_rows = ca_bias = sa_bias.new_zeros((1, 1, 1, 1))
        K_ca, ca_rng = 0, sa_rng
    x = (layers or _fused_layers)(
        lm.embed_tokens(inp.tokens),  # (B, hidden)
        w.ln1, w.qkv_w, w.qkv_b, w.o_w, w.o_b, w.ln2, w.gu_w, w.gu_b, w.dn_w, w.dn_b,
        w.casa_of, w.c_norm, w.c_qkv_w, w.c_qkv_b, w.c_o_w, w.c_o_b,
        text.k, text.v, sa_rows, S, sa_cos, sa_sin, sa_bias,
        ca_k, ca_v, ca_rows, K_ca, ca_cos, ca_sin, ca_bias,
        segments, cfg.heads, Hkv, cfg.eps, lm.scale,
        ragged, batch_rows, sa_rng, ca_rng,
    )  # fmt: skip
    return lm.logits(lm.norm(x)).float(), None


class ScriptedStep:
    """`fused_decode_step` with its layers compiled by TorchScript (`torch.jit.script`, ~1 s, no
    C++ compiler): one call runs every layer's ~80 ops in C++, so the step neither pays Python's
    per-op overhead nor gives up the GIL between ops, where the server's other threads (event
    loop, ingest, vision) would take it for up to a switch interval each time (docs/engine.md,
    "Threads and the GIL"). Same ops, same order: the results are bit-identical to the eager step
    (tests/test_runner.py). A torch without TorchScript raises at construction; the runner then
    keeps the eager step."""

    _scripted: Callable[..., torch.Tensor] | None = None  # one compilation per process, shared

    def __init__(self) -> None:
        if ScriptedStep._scripted is None:
            import warnings

            with warnings.catch_warnings():
                # TorchScript is deprecated in torch 2.13, still the only compile step that costs ~1 s
                warnings.simplefilter("ignore", DeprecationWarning)
                ScriptedStep._scripted = torch.jit.script(_fused_layers)
        self.layers = ScriptedStep._scripted

    def __call__(
        self,
        lm: LanguageModel,
        state: StreamState,
        inp: DecodeInputs,
        S: int,
        Wb: int,
        ragged: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        return fused_decode_step(lm, state, inp, S, Wb, layers=self.layers, ragged=ragged)


def can_fuse(lm: LanguageModel, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `fused_decode_step` applies: fp32 on the CPU, fused projections, no plain-CA layers."""
    fused = all(b.self_attn._qkv is not None and b.mlp._gate_up is not None for b in lm.layers)
    return device.type == "cpu" and dtype == torch.float32 and fused and lm.fusion in ("casa", "insertion")
