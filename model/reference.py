"""Dense reference forwards over a whole interleaved sequence: slow, obviously correct.

Every streaming path is tested against these, and training uses `dense_forward` (it is the
windowed CASA semantics with an explicit block mask, differentiable end to end).

An `Interleaved` batch holds the text tokens and, separately, the frames with the text index before
which each is inserted. Text token t belongs to window w(t) = number of frames inserted at or before
t (window 0 has no image). Masks, in words:
- self-attention: text t sees text j <= t (or an explicit visibility, for the bounded-cache test);
- CASA: text t sees every image token of frame w(t)-1 and text j <= t with w(j) == w(t);
  "ca" fusion: the image tokens only, no RoPE;
- insertion: image tokens become tokens of the stream (queries, MLP, KV cache), causal over all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from casa_live.model.lm import LanguageModel
from casa_live.model.rope import apply_rope, image_positions, rotate_half


@dataclass
class Interleaved:
    tokens: torch.Tensor  # (B, T) long, padded
    text_len: torch.Tensor  # (B,) long
    images: torch.Tensor  # (B, F, N, hidden) image tokens (vision tower output), padded in F
    n_frames: torch.Tensor  # (B,) long
    insert_at: torch.Tensor  # (B, F) long: frame f comes right before text token insert_at[b, f]
    grid: tuple[int, int]  # merged token grid of every frame: N == gh * gw
    # per row, per frame: its own merged grid, for frames of varying sizes (aspect-preserving
    # processors); images are then padded to the largest, frame f's tokens are the first gh*gw
    frame_grids: list[list[tuple[int, int]]] | None = None

    def grid_of(self, b: int, f: int) -> tuple[int, int]:
        return self.grid if self.frame_grids is None else self.frame_grids[b][f]


def windows(batch: Interleaved) -> torch.Tensor:
    """(B, T) window index of every text token (0 = before the first frame)."""
    T = batch.tokens.shape[1]
    t = torch.arange(T, device=batch.tokens.device)
    Fm = batch.insert_at.shape[1]
    real = torch.arange(Fm, device=t.device)[None, :] < batch.n_frames[:, None]  # (B, F)
    before = (batch.insert_at[:, :, None] <= t[None, None, :]) & real[:, :, None]  # (B, F, T)
    return before.sum(1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B,H,T,D), k/v (B,Hkv,S,D), mask (B,1|H,T,S) bool; rows with no visible key give 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    any_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key, scale=scale)
    return out * any_key.to(out.dtype)


def dense_forward(
    lm: LanguageModel,
    batch: Interleaved,
    sa_visible: torch.Tensor | None = None,
    sa_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) at every text token.

    sa_visible: optional (B, T, T) bool, which text keys each text query sees in self-attention
    (default causal). With it, RoPE positions are slots: a key's position is the number of visible
    keys before it in that query's row (StreamingLLM), which is what the bounded cache computes.
    Token insertion: sa_visible is (B, L, L) over the interleaved stream (`insertion_layout`) and
    sa_offset (B, L, L) long says how many positions key j sits below its Qwen position when query
    t sees it (query t itself: sa_offset[t, t]), which is what its bounded cache computes.
    """
    if lm.fusion == "insertion":
        return _dense_insertion(lm, batch, sa_visible, sa_offset)
    B, T = batch.tokens.shape
    dev = batch.tokens.device
    x = lm.embed_tokens(batch.tokens)
    t = torch.arange(T, device=dev)
    key_ok = t[None, :] < batch.text_len[:, None]  # (B, T)
    if sa_visible is None:
        sa_mask = (t[None, :, None] >= t[None, None, :]) & key_ok[:, None, :]  # (B, T, T)
    else:
        sa_mask = sa_visible & key_ok[:, None, :]
    pos = t[None, :, None].expand(B, T, 3)
    cos, sin = lm.cos_sin(pos)

    # CASA keys: [all frames' image tokens (F*N) ; text (T)] with a per-query window mask.
    win = windows(batch)  # (B, T)
    Fm, N = batch.images.shape[1], batch.images.shape[2]
    frame_of_key = torch.arange(Fm, device=dev).repeat_interleave(N)  # (F*N,)
    real_frame = frame_of_key[None, :] < batch.n_frames[:, None]  # (B, F*N)
    if batch.frame_grids is None:
        img_pos = torch.cat(
            [image_positions(batch.insert_at[:, f], batch.grid) for f in range(Fm)], dim=1
        )  # (B, F*N, 3)
    else:  # frames of their own sizes: frame f's keys are its first gh*gw of the padded N
        img_pos = torch.zeros(B, Fm * N, 3, dtype=torch.long, device=dev)
        for b in range(B):
            for f in range(int(batch.n_frames[b])):
                gh, gw = batch.grid_of(b, f)
                at = batch.insert_at[b, f : f + 1]
                img_pos[b, f * N : f * N + gh * gw] = image_positions(at, (gh, gw))[0]
                real_frame[b, f * N + gh * gw : (f + 1) * N] = False
    img_mask = (frame_of_key[None, None, :] == (win[:, :, None] - 1)) & real_frame[:, None, :]  # (B, T, F*N)
    txt_mask = (
        (win[:, :, None] == win[:, None, :]) & (t[None, :, None] >= t[None, None, :]) & key_ok[:, None, :]
    )
    img_cos, img_sin = lm.cos_sin(img_pos)
    images = batch.images.reshape(B, Fm * N, -1)

    for block in lm.layers:
        h = block.input_layernorm(x)
        q = block.self_attn.q(h)
        k, v = block.self_attn.kv(h)
        if sa_visible is None:
            o = _attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, sa_mask[:, None], lm.scale)
        else:
            o = _slot_attention(q, k, v, sa_mask, lm)
        out = x + block.self_attn.out(o)
        if block.casa is not None:
            norm, proj = block.casa_parts()
            hc = norm(x)
            qc = proj.q(hc)
            kc, vc = proj.kv(hc)
            ik, iv = proj.kv(norm(images))
            if block.casa.use_rope:
                qc, kc = apply_rope(qc, cos, sin), apply_rope(kc, cos, sin)
                ik = apply_rope(ik, img_cos, img_sin)
            if block.casa.text_keys:
                keys, vals = torch.cat([ik, kc], 2), torch.cat([iv, vc], 2)
                mask = torch.cat([img_mask, txt_mask], 2)
            else:
                keys, vals, mask = ik, iv, img_mask
            out = out + proj.out(_attend(qc, keys, vals, mask[:, None], lm.scale))
        x = out + block.mlp(block.post_attention_layernorm(out))
    return lm.logits(lm.norm(x))


def _slot_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, lm: LanguageModel
) -> torch.Tensor:
    """Self-attention where each query row has its own key positions (slot = rank among visible)."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        vis = visible[b]  # (T, T)
        slot = vis.long().cumsum(-1) - 1  # (T, T): key j's slot in query t's view
        qpos = slot.diagonal()  # (T,)
        qcos, qsin = lm.cos_sin(qpos[None, :, None].expand(1, T, 3))
        qr = apply_rope(q[b : b + 1], qcos, qsin)[0]  # (H, T, D)
        kcos, ksin = lm.cos_sin(slot[..., None].expand(T, T, 3))  # (T, T, D)
        kb = k[b].float().repeat_interleave(g, 0)[:, None]  # (H, 1, T, D)
        kr = (kb * kcos[None] + rotate_half(kb) * ksin[None]).to(q.dtype)  # (H, Tq, Tk, D)
        scores = torch.einsum("htd,htjd->htj", qr, kr) * lm.scale
        scores = scores.masked_fill(~vis[None], float("-inf"))
        p = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(q.dtype)
        out[b] = p @ v[b].repeat_interleave(g, 0)
    return out


def _shifted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    pos: torch.Tensor,
    offset: torch.Tensor,
    lm: LanguageModel,
) -> torch.Tensor:
    """Self-attention where query t sees key j at position pos[j] - offset[t, j] (every M-RoPE
    component alike) and sits itself at pos[t] - offset[t, t]. q (B,H,L,D), k/v (B,Hkv,L,D)."""
    B, H = q.shape[:2]
    g = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        vis = visible[b]  # (L, L)
        kpos = pos[b][None, :, :] - offset[b][..., None]  # (Lq, Lk, 3)
        qcos, qsin = lm.cos_sin(kpos.diagonal(dim1=0, dim2=1).t()[None])  # (1, L, D)
        qr = apply_rope(q[b : b + 1], qcos, qsin)[0]  # (H, L, D)
        kcos, ksin = lm.cos_sin(kpos)  # (Lq, Lk, D)
        kb = k[b].float().repeat_interleave(g, 0)[:, None]  # (H, 1, Lk, D)
        kr = (kb * kcos[None] + rotate_half(kb) * ksin[None]).to(q.dtype)  # (H, Lq, Lk, D)
        scores = torch.einsum("htd,htjd->htj", qr, kr) * lm.scale
        scores = scores.masked_fill(~vis[None], float("-inf"))
        p = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(q.dtype)
        out[b] = p @ v[b].repeat_interleave(g, 0)
    return out


def insertion_layout(batch: Interleaved) -> tuple[list[list[tuple[str, int]]], list[torch.Tensor]]:
    """Per row: the interleaved stream [("t", text_index) | ("i", frame*N + n)] and its positions.

    Qwen2.5-VL positions: text advances by 1; a frame at position p takes (p, p+row, p+col) and the
    next text starts at p + max(gh, gw).
    """
    N = batch.images.shape[2]  # padded tokens per frame; frame f has gh*gw of its own grid
    layouts, positions = [], []
    for b in range(batch.tokens.shape[0]):
        inserts = {int(batch.insert_at[b, f]): f for f in range(int(batch.n_frames[b]))}
        items: list[tuple[str, int]] = []
        pos: list[torch.Tensor] = []
        p = 0
        for ti in range(int(batch.text_len[b]) + 1):
            if ti in inserts:
                f = inserts[ti]
                gh, gw = batch.grid_of(b, f)
                items += [("i", f * N + n) for n in range(gh * gw)]
                pos.append(image_positions(torch.tensor([p]), (gh, gw))[0])
                p += max(gh, gw)
            if ti < int(batch.text_len[b]):
                items.append(("t", ti))
                pos.append(torch.tensor([[p, p, p]]))
                p += 1
        layouts.append(items)
        positions.append(torch.cat(pos) if pos else torch.zeros(0, 3, dtype=torch.long))
    return layouts, positions


def _dense_insertion(
    lm: LanguageModel,
    batch: Interleaved,
    visible: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    B, T = batch.tokens.shape
    dev = batch.tokens.device
    layouts, positions = insertion_layout(batch)
    L = max(len(items) for items in layouts)
    emb = lm.embed_tokens(batch.tokens)
    images = batch.images.reshape(B, -1, batch.images.shape[-1])
    x = torch.zeros(B, L, emb.shape[-1], dtype=emb.dtype, device=dev)
    pos = torch.zeros(B, L, 3, dtype=torch.long, device=dev)
    text_slot = torch.zeros(B, T, dtype=torch.long, device=dev)
    length = torch.zeros(B, dtype=torch.long, device=dev)
    rows = []
    for b, items in enumerate(layouts):
        parts = [emb[b, i] if kind == "t" else images[b, i] for kind, i in items]
        rows.append(torch.stack(parts) if parts else x[b, :0])
        pos[b, : len(items)] = positions[b].to(dev)
        length[b] = len(items)
        for s, (kind, i) in enumerate(items):
            if kind == "t":
                text_slot[b, i] = s
    x = torch.stack([F.pad(r, (0, 0, 0, L - r.shape[0])) for r in rows])
    s = torch.arange(L, device=dev)
    mask = (s[None, :, None] >= s[None, None, :]) & (s[None, None, :] < length[:, None, None])
    if visible is not None:
        mask = mask & visible[:, :L, :L].to(dev)
    cos, sin = lm.cos_sin(pos)
    for block in lm.layers:
        h = block.input_layernorm(x)
        q = block.self_attn.q(h)
        k, v = block.self_attn.kv(h)
        if offset is None:
            o = _attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask[:, None], lm.scale)
        else:
            o = _shifted_attention(q, k, v, mask, pos, offset[:, :L, :L].to(dev), lm)
        out = x + block.self_attn.out(o)
        x = out + block.mlp(block.post_attention_layernorm(out))
    h = lm.norm(x)
    return lm.logits(torch.gather(h, 1, text_slot[..., None].expand(-1, -1, h.shape[-1])))
