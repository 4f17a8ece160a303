"""Qwen2-style decoder with CASA layers, and its streaming step function.

`LanguageModel.step` advances every batch row by its own number of text tokens against the
preallocated StreamState; positions come in from the caller (the engine's runner,
model/engine/runner.py, builds them with model/rope.py). The dense reference forward over a whole
interleaved sequence is in model/reference.py and reuses these modules' weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from casa_live.kernels.dispatch import apply_rope as rope_qk
from casa_live.kernels.dispatch import (
    attention_mask,
    backend_for,
    prefix_causal_attention,
    tree_attention,
    tree_attention_mask,
)
from casa_live.model.cache import StreamState
from casa_live.model.casa import CASALayer
from casa_live.model.config import ModelConfig
from casa_live.model.layers import Projections, RMSNorm, SwiGLU
from casa_live.model.rope import image_positions, inv_freq, rope_cos_sin, section_ids


class Block(nn.Module):
    def __init__(self, mcfg: ModelConfig, has_casa: bool) -> None:
        super().__init__()
        cfg = mcfg.lm
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.self_attn = Projections(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp)
        self.casa = CASALayer(cfg, mcfg.casa.fusion, mcfg.casa.shared) if has_casa else None

    def casa_parts(self) -> tuple[RMSNorm, Projections]:
        assert self.casa is not None
        return self.casa.parts(self.input_layernorm, self.self_attn)


@dataclass
class StepInputs:
    """Per-step bookkeeping shared by all layers (built once in LanguageModel.step)."""

    rows: int  # the step covers batch rows [0, rows)
    b_idx: torch.Tensor  # (n,) row of each valid token
    t_idx: torch.Tensor  # (n,) its index in the step
    sa_start: torch.Tensor  # (R,) slot of each row's first new token (device)
    sa_slots: torch.Tensor  # (n,) cache slot of each valid token
    sa_len: int  # slots to attend over (max over rows)
    sa_cos: torch.Tensor  # (R, T, D)
    sa_sin: torch.Tensor
    ca_start: torch.Tensor | None = None  # (R,) window slot of each row's first new token
    ca_slots: torch.Tensor | None = None
    ca_len: int = 0
    ca_cos: torch.Tensor | None = None
    ca_sin: torch.Tensor | None = None
    n_img: torch.Tensor | None = None  # (R,) image tokens of the current frame
    img_len: int = 0
    sa_rows: torch.Tensor | None = None  # flat_rows() of the new tokens in the text cache
    ca_rows: torch.Tensor | None = None  # ... and in the CASA window
    sa_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # torch backend: built once per step
    ca_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    tree: bool = False  # a scoring forward: explicit tree masks, torch attention (kernels/dispatch.py)
    select: torch.Tensor | None = None  # (R,) state row of each batch entry (device); None: rows [0, R)

    def take(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The step's rows of a (B, Hkv, slots, D) cache buffer, first n slots: a view of rows
        [0, R), or a copy of the selected rows."""
        if self.select is None:
            return buf[: self.rows, :, :n]
        return buf[:, :, :n].index_select(0, self.select)


def flat_rows(b_idx: torch.Tensor, slots: torch.Tensor, heads: int, capacity: int) -> torch.Tensor:
    """Row indices into a (B*Hkv*C, D) view of a (B, Hkv, C, D) buffer for tokens (b, slot): (n*Hkv,)."""
    h = torch.arange(heads, device=b_idx.device)
    return ((b_idx[:, None] * heads + h[None, :]) * capacity + slots[:, None]).reshape(-1)


def write_rows(
    buf: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor
) -> None:
    """buf (B, Hkv, C, D) <- x (R, Hkv, T, D) at the valid tokens (b_idx, t_idx), in one index_copy_."""
    src = x[b_idx, :, t_idx]  # (n, Hkv, D)
    buf.view(-1, buf.shape[-1]).index_copy_(0, rows, src.reshape(-1, buf.shape[-1]))


class LanguageModel(nn.Module):
    def __init__(self, mcfg: ModelConfig) -> None:
        super().__init__()
        cfg = mcfg.lm
        self.cfg = cfg
        self.fusion = mcfg.casa.fusion
        self.casa_ids = mcfg.casa.layer_ids(cfg.layers)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(mcfg, i in self.casa_ids) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.register_buffer("freqs", inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.register_buffer("sections", section_ids(cfg.mrope_section), persistent=False)
        self.scale = cfg.head_dim**-0.5

    def init_casa_from_self_attention(self) -> None:
        for block in self.layers:
            if block.casa is not None:
                block.casa.init_from(block.input_layernorm, block.self_attn)

    def fuse_projections(self) -> None:
        """Inference only (the Engine calls it): q/k/v and gate/up of every layer as single matmuls.
        Parameters stay in place as views of the fused weights, so checkpoints are unchanged."""
        self.__dict__.pop("_fused_weights", None)  # model/decode.py FusedWeights: views of the old
        for block in self.layers:
            block.self_attn.fuse()
            block.mlp.fuse()
            if block.casa is not None and not block.casa.shared:
                block.casa.proj.fuse()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return h @ self.embed_tokens.weight.t()
        return self.lm_head(h)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.freqs, self.sections)

    # ---- streaming -------------------------------------------------------------------------

    @torch.no_grad()
    def frame_kv(
        self, image_tokens: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image K/V of every CASA layer for frames' image tokens (n, N, hidden): (Lc, n, Hkv, N, D)
        x 2. Image keys sit at window-local positions (0, row, col). Reads weights only, so the
        vision pipeline can run it on its own thread."""
        n = image_tokens.shape[0]
        cos = sin = None
        if self.fusion == "casa":
            pos = image_positions(torch.zeros(n, dtype=torch.long, device=image_tokens.device), grid)
            cos, sin = self.cos_sin(pos)
        ks, vs = [], []
        for block_id in self.casa_ids:
            norm, proj = self.layers[block_id].casa_parts()
            k, v = proj.kv(norm(image_tokens))  # (n, Hkv, N, D)
            if cos is not None:
                k = rope_qk(k, None, cos, sin)[0]
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)

    @torch.no_grad()
    def write_frame(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: StreamState) -> None:
        """Write `rows`' new frames' image K/V ((Lc, n, Hkv, N, D) x 2) in place over the previous
        frame's. The caller starts their windows (StreamState.start_windows)."""
        cs = state.casa
        assert cs is not None, "write_frame needs CASA layers (insertion feeds image tokens as text)"
        N = k.shape[3]
        cs.img_k[:, rows, :, :N] = k.to(cs.img_k.dtype)
        cs.img_v[:, rows, :, :N] = v.to(cs.img_v.dtype)

    @torch.no_grad()
    def step(
        self,
        x: torch.Tensor,
        n_valid: torch.Tensor,
        state: StreamState,
        sa_positions: torch.Tensor,
        ca_positions: torch.Tensor | None = None,
        tree: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed rows [0, R) n_valid[r] tokens each; returns final hidden states (R, T, hidden). The
        tokens' K/V are written at the rows' lengths; the caller advances the lengths afterwards
        (StreamState.advance), so one place does it for every forward.

        x: (R, T, hidden) input embeddings (token embeddings, or image tokens for insertion),
           padded past n_valid[r]. sa_positions: (R, T, 3) positions of the new tokens in the
           self-attention frame (cache slots for CASA models). ca_positions: (R, T, 3) window-local
           positions for the CASA layers. Rows with n_valid == 0 are untouched.
        tree: (R, T, T) bool, for a scoring forward (watches, model/engine/runner.py): new token i
           sees new token j when tree[r, i, j] instead of when j <= i, so several questions share
           one prefix; their K/V may then use the score slots past the capacity (model/cache.py),
           and the caller never advances the lengths, which leaves the row as it was.
        rows: (R,) host int64, the state row of each batch entry (a scoring forward feeds a few
           rows among many): their cache K/V are gathered (a copy of S slots per layer) instead of
           the rows [0, R) being read in place.
        visible: (R,) host int64, with a tree: the text cache slots the new tokens see (the text
           before a frame's caption: questions fork there); None: all of them. The CASA window is
           then hidden too: the questions open the frame's window (docs/engine.md, "Questions").
        """
        R, T, _ = x.shape
        dev = x.device
        text, cs = state.text, state.casa
        n_valid = n_valid.cpu()
        valid = torch.arange(T)[None, :] < n_valid[:, None]
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        sel = torch.arange(R) if rows is None else rows.cpu()
        sa_start = text.length[sel].clone()
        if int((sa_start + n_valid).max()) > (text.capacity if tree is None else text.k.shape[3]):
            raise ValueError("text cache overflow: call make_room before step")
        sa_cos, sa_sin = self.cos_sin(sa_positions)
        inp = StepInputs(
            rows=R,
            select=None if rows is None else sel.to(dev),
            b_idx=b_idx.to(dev),
            t_idx=t_idx.to(dev),
            sa_start=sa_start.to(dev),
            sa_slots=(sa_start[b_idx] + t_idx).to(dev),
            sa_len=int((sa_start + n_valid).max()),
            sa_cos=sa_cos,
            sa_sin=sa_sin,
        )
        if cs is not None and self.casa_ids:
            ca_start = cs.win_len[sel].clone()
            if int((ca_start + n_valid).max()) > (
                cs.window if tree is None else cs.k.shape[3] - cs.image_tokens
            ):
                raise ValueError(f"CASA window overflow: a window holds at most {cs.window} text tokens")
            inp.ca_start = ca_start.to(dev)
            inp.ca_slots = (ca_start[b_idx] + t_idx).to(dev)
            inp.ca_len = int((ca_start + n_valid).max())
            inp.n_img = cs.n_img[sel].to(dev)
            inp.img_len = int(cs.n_img[sel].max())
            if self.fusion == "casa":
                assert ca_positions is not None
                inp.ca_cos, inp.ca_sin = self.cos_sin(ca_positions)
        kvh = self.cfg.kv_heads
        cache_b = inp.b_idx if inp.select is None else inp.select[inp.b_idx]  # each token's state row
        inp.sa_rows = flat_rows(cache_b, inp.sa_slots, kvh, text.k.shape[3])  # slots incl. scratch
        if inp.ca_slots is not None:
            # window slots sit after the image tokens in the CASA buffer
            inp.ca_rows = flat_rows(cache_b, inp.ca_slots + cs.image_tokens, kvh, cs.k.shape[3])
        if tree is not None:
            inp.tree = True
            tree = tree.to(dev)
            vis = None if visible is None else visible.to(dev)
            inp.sa_mask = tree_attention_mask(None, 0, inp.sa_start, tree, inp.sa_len, vis)
            if inp.n_img is not None:
                P = max(inp.img_len, 1)
                hide = None if visible is None else torch.zeros_like(inp.ca_start)
                inp.ca_mask = (  # a question opens its frame's window: the caption's is hidden
                    tree_attention_mask(inp.n_img, P, inp.ca_start, tree, inp.ca_len, hide)
                    if self.fusion == "casa"
                    else attention_mask(inp.n_img, P, None, T, inp.ca_len)
                )
        elif backend_for(x) == "torch":
            inp.sa_mask = attention_mask(None, 0, inp.sa_start, T, inp.sa_len)
            if inp.n_img is not None:
                seg = inp.ca_start if self.fusion == "casa" else None
                inp.ca_mask = attention_mask(inp.n_img, max(inp.img_len, 1), seg, T, inp.ca_len)
        casa_index = {b: i for i, b in enumerate(self.casa_ids)}
        for li, block in enumerate(self.layers):
            x = self._block_step(block, li, casa_index.get(li), x, inp, state)
        return self.norm(x)

    def _block_step(
        self, block: Block, li: int, ci: int | None, x: torch.Tensor, inp: StepInputs, state: StreamState
    ) -> torch.Tensor:
        text = state.text
        h = block.input_layernorm(x)
        q, k, v = block.self_attn.qkv(h)  # (R, H, T, D), (R, Hkv, T, D) x 2
        qs, ks = rope_qk(q, k, inp.sa_cos, inp.sa_sin)  # one fused launch for q and k on CUDA
        write_rows(text.k[li], inp.sa_rows, ks, inp.b_idx, inp.t_idx)
        write_rows(text.v[li], inp.sa_rows, v, inp.b_idx, inp.t_idx)
        S = inp.sa_len
        o = self._attend(
            inp,
            qs,
            None,
            None,
            None,
            inp.take(text.k[li], S),
            inp.take(text.v[li], S),
            inp.sa_start,
            inp.sa_mask,
        )
        a = block.self_attn.out(o)
        if ci is not None:
            c = self._casa_step(block, ci, x, h, q, k, v, inp, state)
            x, a = x + a, c  # (x + sa) + casa: the summation order of the dense reference
        # out = x + a and its post-attention norm in one fused pass (same sums, same order)
        n, out = block.post_attention_layernorm.add_forward(a, x)
        return out + block.mlp(n)

    def _casa_step(
        self,
        block: Block,
        ci: int,
        x: torch.Tensor,
        h: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inp: StepInputs,
        state: StreamState,
    ) -> torch.Tensor:
        cs = state.casa
        assert cs is not None and block.casa is not None
        norm, proj = block.casa_parts()
        if not block.casa.shared:  # shared: reuse the self-attention's un-rotated q, k, v
            q, k, v = proj.qkv(norm(x))
        seg_k = seg_v = seg_start = None
        if block.casa.use_rope:
            q, k = rope_qk(q, k, inp.ca_cos, inp.ca_sin)
        if block.casa.text_keys:
            write_rows(cs.k[ci], inp.ca_rows, k, inp.b_idx, inp.t_idx)
            write_rows(cs.v[ci], inp.ca_rows, v, inp.b_idx, inp.t_idx)
            seg_k, seg_v = inp.take(cs.win_k[ci], inp.ca_len), inp.take(cs.win_v[ci], inp.ca_len)
            seg_start = inp.ca_start
        N = max(inp.img_len, 1)
        o = self._attend(
            inp,
            q,
            inp.take(cs.img_k[ci], N),
            inp.take(cs.img_v[ci], N),
            inp.n_img,
            seg_k,
            seg_v,
            seg_start,
            inp.ca_mask,
        )
        return proj.out(o)

    def _attend(
        self,
        inp: StepInputs,
        q: torch.Tensor,
        prefix_k: torch.Tensor | None,
        prefix_v: torch.Tensor | None,
        prefix_len: torch.Tensor | None,
        seg_k: torch.Tensor | None,
        seg_v: torch.Tensor | None,
        seg_start: torch.Tensor | None,
        mask: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """prefix + causal segment attention, or with a scoring forward's tree mask."""
        if inp.tree:
            assert mask is not None
            return tree_attention(q, prefix_k, prefix_v, seg_k, seg_v, self.scale, mask)
        return prefix_causal_attention(
            q, prefix_k, prefix_v, prefix_len, seg_k, seg_v, seg_start, self.scale, mask
        )
