"""The runner: executes one tick's Plan on the model with static shapes, returns logits and timings.

Per tick, in this order:
1. frames: write each starting frame's CASA image K/V into its row (computed by the vision
   pipeline, model/engine/vision_pipeline.py, or here when none runs);
2. prefill: one varlen forward (`LanguageModel.step`) over the rows that feed several items;
3. decode: the fixed-shape step (model/decode.py) over rows [0, B), B the smallest bucket above
   the highest decoding row; every other row of [0, B) is idle and writes to the scratch slot.

Decode shapes: B is padded to `buckets` (1, 2, 4, ... max_sessions), the text-cache span S and the
window span Wb are rounded up to multiples of `span_round`. Inputs are built on the host from the
host-side lengths (no device sync) and copied once.

Compilation (`compile=True`): `torch.compile` of the decode step; on CUDA with mode
"reduce-overhead", i.e. CUDA graphs captured per shape (static shapes by construction). `warmup()`
runs every bucket once so the first session does not pay for it. On this project's 2-core CPU the
eager step is the default: docs/engine.md has the measurements that decided it.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from casa_live.kernels.dispatch import backend_for, ragged_cpu_available
from casa_live.model.cache import PromptKV, StreamState
from casa_live.model.decode import (
    DecodeInputs,
    ScriptedStep,
    can_fuse,
    commit,
    decode_step,
    fused_decode_step,
)
from casa_live.model.engine.scheduler import InsertedFrame, Item, Plan
from casa_live.model.rope import image_positions, text_positions
from casa_live.model.vlm import CASAModel

log = logging.getLogger("casa.runner")


class _Vision(torch.nn.Module):
    """encode_images, and for CASA models the frames' image K/V (LanguageModel.frame_kv), as a
    module of one tensor argument, for tracing: one call for a batch of frames."""

    def __init__(self, model: CASAModel, grid: tuple[int, int], kv: bool) -> None:
        super().__init__()
        self.model, self.grid, self.kv = model, grid, kv
        m = model.config.vision.merge
        self.token_grid = (grid[0] // m, grid[1] // m)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.model.encode_images(patches, self.grid)
        if not self.kv:
            return (tokens,)
        return (tokens, *self.model.lm.frame_kv(tokens, self.token_grid))


def buckets_for(max_rows: int) -> list[int]:
    """Powers of two up to max_rows, and max_rows itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


@dataclass
class StepResult:
    """What one tick fed and computed, for the engine (sampling) and for observers (tests)."""

    fed: dict[int, list[Item]] = field(default_factory=dict)  # row -> items fed, in order
    frames: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> image tokens started
    sample_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (V,) last position
    fed_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> (n_text, V) if recorded
    decode_rows: int = 0  # B of the decode step (0: none ran)
    vision_s: float = 0.0  # encode time of the frames started (summed)
    frame_vision_s: list[float] = field(default_factory=list)  # ... and of each of them
    prefill_s: float = 0.0
    decode_s: float = 0.0
    scores: dict[int, list[float]] = field(default_factory=dict)  # row -> one score per watch
    score_s: float = 0.0


class Runner:
    def __init__(
        self,
        model: CASAModel,
        state: StreamState,
        max_sessions: int,
        compile: bool = False,
        span_round: int = 32,
    ) -> None:
        self.model, self.state = model, state
        self.lm = model.lm
        self.insertion = model.config.casa.fusion == "insertion"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.buckets = buckets_for(max_sessions)
        self.span_round = span_round
        self.record = False  # observers asked for the logits of every fed token
        # token ids whose probabilities make a watch's "yes" and "no" (Template.yes/no); set by
        # the engine when the model answers questions
        self.yes_no: tuple[list[int], list[int]] | None = None
        self._decode: Callable[..., tuple[torch.Tensor, object]] = decode_step
        self.fused = False
        if compile:
            self.use("compiled")
        elif can_fuse(self.lm, self.device, self.dtype):
            self.use("scripted")
        # TorchScript-traced vision tower per (batch size, patch grid) (CPU: see _traced_vision)
        self.trace_vision = self.device.type == "cpu"
        self._vision: dict[tuple[int, tuple[int, int]], torch.nn.Module] = {}
        # the prefix cache's tensors, by prompt token ids; which prompts it holds is the
        # scheduler's decision (Scheduler.prefixes), carried out here as plans say
        self.prefixes: dict[tuple[int, ...], PromptKV] = {}
        vcfg = model.config.vision
        self._patch_dim = vcfg.patch_dim

    def use(self, step: str) -> None:
        """Which decode step runs: "generic" (model/decode.py decode_step, eager), "fused" (the
        hand-fused CPU step, eager), "scripted" (the same with its layers compiled by TorchScript:
        the CPU default; the eager fused step where TorchScript fails) or "compiled"
        (torch.compile of the generic step; CUDA graphs on a GPU)."""
        self.fused = step in ("fused", "scripted")
        if step == "scripted":
            try:
                self._decode = ScriptedStep()
            except Exception:  # a torch without TorchScript: the eager step computes the same
                log.warning("could not script the decode step; it runs eagerly", exc_info=True)
                self._decode = fused_decode_step
        elif step == "fused":
            self._decode = fused_decode_step
        elif step == "compiled":
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode = torch.compile(decode_step, mode=mode, dynamic=self.device.type != "cuda")
        elif step == "generic":
            self._decode = decode_step
        else:
            raise ValueError(f"unknown decode step {step!r}: generic, fused, scripted or compiled")

    # ---- frames -----------------------------------------------------------------------------

    def encode(
        self, patches: torch.Tensor, patch_grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """patches (n, P, C*P*P) of frames of one patch grid (default: the config's square) ->
        image tokens (n, N, hidden) and, for CASA models, their per-layer image K/V
        ((Lc, n, Hkv, N, D) x 2). Thread-safe: reads weights only."""
        grid = patch_grid or self.model.patch_grid
        patches = patches.to(self.device, self.dtype)
        # traced only on the torch backend: a trace would bake Triton launch arguments in as tensors
        traced = (
            self._traced_vision(patches.shape[0], grid)
            if self.trace_vision and backend_for(patches) == "torch"
            else None
        )
        # the traced module, or the same module run eagerly
        vision = traced if traced is not None else _Vision(self.model, grid, not self.insertion)
        out = vision(patches)
        return out[0], (None if self.insertion else (out[1], out[2]))

    def _traced_vision(self, n: int, grid: tuple[int, int] | None = None) -> torch.nn.Module | None:
        """The vision tower and the CASA image K/V traced for batches of n frames of one patch grid
        (TorchScript, weights frozen in): one call runs the whole tower in C++, so it never waits
        for the GIL between its ~250 ops while the decode thread and the event loop run Python
        (docs/engine.md). Traced on first use (a camera's frames share one grid, so that is once
        per stream size)."""
        grid = grid or self.model.patch_grid
        key = (n, grid)
        if key not in self._vision:
            example = torch.zeros(n, grid[0] * grid[1], self._patch_dim, device=self.device, dtype=self.dtype)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # TorchScript is deprecated in torch 2.13 but still the only way to run the
                    # tower as one call without a compile step (docs/engine.md)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    traced = torch.jit.trace(
                        _Vision(self.model, grid, not self.insertion).eval(), example, check_trace=False
                    )
                    self._vision[key] = torch.jit.freeze(traced)
            except Exception:  # a torch without TorchScript: the eager tower computes the same
                log.warning("could not trace the vision tower; it runs eagerly", exc_info=True)
                self.trace_vision = False
                return None
        return self._vision[key]

    # ---- the tick ---------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, plan: Plan, res: StepResult) -> None:
        """Execute one tick's plan: score watches, start its frames, then prefill, then decode.
        Scoring goes first: it reads its rows' current frames, which a starting frame overwrites.
        The prefix cache's copies bracket the tick: restored prompts first (a restored row's frame
        may start in the same tick), captured ones last (their final token is fed in it)."""
        for key in plan.forget:
            self.prefixes.pop(key, None)
        for i, key in plan.restore.items():
            self.state.load_prefix(i, self.prefixes[key])
        if plan.score:
            t0 = time.perf_counter()
            self._score(plan.score, res)
            res.score_s = time.perf_counter() - t0
        if plan.frames:
            self._start_frames(plan, res)
        prefill, decode, sample_set = plan.prefill, plan.decode, set(plan.sample)
        if prefill:
            t0 = time.perf_counter()
            self._prefill(prefill, sample_set, res)
            res.prefill_s = time.perf_counter() - t0
        if decode:
            t0 = time.perf_counter()
            self._decode_step(decode, sample_set, res)
            res.decode_s = time.perf_counter() - t0
        for i, key in plan.capture.items():
            self.prefixes[key] = self.state.save_prefix(i)

    def _start_frames(self, plan: Plan, res: StepResult) -> None:
        """Write the starting frames' CASA image K/V into their rows (one write per image-token
        count: frames of one grid share it) and start their windows. Token-insertion models feed
        the image tokens as items instead (scheduler.InsertedFrame)."""
        res.frame_vision_s = [f.encoding.seconds for f in plan.frames]
        res.vision_s = sum(res.frame_vision_s)
        by_n: dict[int, list[int]] = {}
        for j, f in enumerate(plan.frames):
            res.frames[f.row] = f.encoding.tokens
            by_n.setdefault(f.encoding.tokens.shape[0], []).append(j)
        if self.insertion:
            return
        for n, group in by_n.items():
            # (Lc, n, Hkv, N, D) x 2
            kv = tuple(torch.stack([plan.frames[j].encoding.kv[s] for j in group], dim=1) for s in (0, 1))
            rows = [plan.frames[j].row for j in group]
            self.lm.write_frame(torch.tensor(rows, device=self.device), kv[0], kv[1], self.state)
            self.state.start_windows(torch.tensor(rows), n)

    def _prefill(self, feeds: dict[int, list[Item]], sample: set[int], res: StepResult) -> None:
        """One varlen forward over the fed rows, each its own item count. When they are a few
        rows among many (a question on a branch row past every session row, a prompt at open),
        the batch is those rows alone, their caches gathered (`LanguageModel.step(rows=...)`):
        a forward over rows [0, R) would compute R rows of padding (a 9-token question on branch
        row 32 cost 33 rows, ~75 ms on the dev CPU, against ~5 ms alone)."""
        lm = self.lm
        order = sorted(feeds)
        R = len(order)
        sel = torch.tensor(order)
        gather = order[-1] + 1 > R  # not rows [0, R): select them
        lengths = [_feed_length(feeds[i]) for i in order]
        T = max(lengths)
        x = torch.zeros(R, T, lm.cfg.hidden, dtype=self.dtype, device=self.device)
        n_valid = torch.tensor(lengths, dtype=torch.long)
        sa_pos = torch.zeros(R, T, 3, dtype=torch.long)
        for b, i in enumerate(order):
            items = feeds[i]
            if self.insertion:
                self._insertion_room(i, lengths[b])
            else:
                self.state.text.make_room(i, lengths[b], lm.freqs)
            ids = [it for it in items if isinstance(it, int)]
            emb = lm.embed_tokens(torch.tensor(ids, device=self.device)) if ids else None
            parts, k = [], 0
            for it in items:
                if isinstance(it, InsertedFrame):
                    parts.append(it.tokens.to(self.device, self.dtype))
                else:
                    parts.append(emb[k : k + 1])
                    k += 1
            x[b, : lengths[b]] = torch.cat(parts)
            if self.insertion:
                sa_pos[b, : lengths[b]] = self._insertion_positions(i, items)
        if not self.insertion:
            sa_pos = text_positions(self.state.text.length[sel], T)
        ca_pos = text_positions(self.state.casa.win_len[sel], T) if self.state.casa is not None else None
        h = lm.step(
            x,
            n_valid,
            self.state,
            sa_pos.to(self.device),
            None if ca_pos is None else ca_pos.to(self.device),
            rows=sel if gather else None,
        )
        self.state.advance(sel, n_valid)
        for b, i in enumerate(order):
            items = feeds[i]
            res.fed.setdefault(i, []).extend(items)
            if i in sample:
                res.sample_logits[i] = lm.logits(h[b, lengths[b] - 1]).float()
            if self.record:
                at = _text_offsets(items)
                res.fed_logits[i] = lm.logits(h[b, at]).float()

    def _score(self, rows: dict[int, tuple[int, list[list[int]]]], res: StepResult) -> None:
        """Score each row's watches on its current frame in one forward over rows [0, R) that
        leaves every row as it was (docs/engine.md, "Watches"); the forward's batch is the scored
        rows alone, their caches gathered (`LanguageModel.step(rows=...)`). A row's watches are packed
        as a trie (`pack_tree`): a prefix they share is fed once, each watch's rest as a branch of
        it (a tree mask), all at the positions a question branch would give them: a CASA row's
        questions see the text before its frame's caption (up to its mark, however far the caption
        has gone) and the frame's image, not the caption's window. The K/V go to
        the slots past each row's valid ones (the caches' score slots) and the lengths are not
        advanced, so the next feed overwrites them. A watch's score is
        P(yes) / (P(yes) + P(no)) from its last token's logits: the softmax's normaliser cancels,
        so only the yes and no rows of the output matrix are computed."""
        assert self.yes_no is not None, "the engine sets the yes/no ids before scoring"
        lm, text, cs = self.lm, self.state.text, self.state.casa
        order = sorted(rows)
        packed = [pack_tree(rows[i][1]) for i in order]
        sel = torch.tensor(order)  # the batch covers only the scored rows (a few among many)
        R, T = len(order), max(len(p.ids) for p in packed)
        ids = torch.zeros(R, T, dtype=torch.long)
        depth = torch.zeros(R, T, dtype=torch.long)
        tree = torch.zeros(R, T, T, dtype=torch.bool)
        n_valid = torch.zeros(R, dtype=torch.long)
        for b, p in enumerate(packed):
            n = len(p.ids)
            ids[b, :n], depth[b, :n], tree[b, :n, :n], n_valid[b] = torch.tensor(p.ids), p.depth, p.tree, n
        x = lm.embed_tokens(ids.to(self.device))
        visible = None
        if self.insertion:
            base = torch.tensor([self.state.spans.position[i] for i in order])
        else:  # CASA: the fork is the mark; slots are positions, so the questions sit right after it
            base = visible = text.mark[sel]
        sa_pos = (base[:, None] + depth)[..., None].expand(-1, -1, 3)
        ca_pos = None
        if cs is not None:  # the frame's window opened by the questions: positions from 0
            ca_pos = depth[..., None].expand(-1, -1, 3).to(self.device)
        h = lm.step(
            x, n_valid, self.state, sa_pos.to(self.device), ca_pos, tree=tree, rows=sel, visible=visible
        )
        yes, no = self.yes_no
        w = lm.embed_tokens.weight if lm.lm_head is None else lm.lm_head.weight
        w = w[torch.tensor(yes + no, device=self.device)]  # (|yes| + |no|, hidden)
        last = torch.cat([h[b, p.last] for b, p in enumerate(packed)])  # (watches, hidden)
        logits = (last @ w.t()).float()
        margin = torch.logsumexp(logits[:, : len(yes)], -1) - torch.logsumexp(logits[:, len(yes) :], -1)
        scores = torch.sigmoid(margin).tolist()
        k = 0
        for i, p in zip(order, packed):
            res.scores[i] = scores[k : k + len(p.last)]
            k += len(p.last)

    def _insertion_positions(self, i: int, items: list[Item]) -> torch.Tensor:
        """Absolute Qwen2.5-VL positions of a row's items for the insertion baseline (see
        model/reference.py): a frame spans max(gh, gw) positions over its gh * gw slots."""
        spans, out = self.state.spans, []
        assert spans is not None
        slot = int(self.state.text.length[i])
        for it in items:
            p = spans.position[i]
            if isinstance(it, InsertedFrame):
                out.append(image_positions(torch.tensor([p]), it.grid)[0])
                n, span = it.tokens.shape[0], max(it.grid)
            else:
                out.append(torch.tensor([[p] * 3]))
                n = span = 1
            spans.fed(self.state.text, i, slot, n, span)
            slot += n
        return torch.cat(out)

    def _insertion_room(self, i: int, n_new: int) -> None:
        """Token insertion's bounded cache (model/cache.py InsertionSpans): evict whole oldest
        items and re-position the rest contiguously after the sink."""
        assert self.state.spans is not None
        self.state.spans.make_room(self.state.text, i, n_new, self.lm.freqs)

    def decode_inputs(self, decode: dict[int, int]) -> tuple[DecodeInputs, int, int, dict[int, int]]:
        """Host-side: the inputs of a decode step, its spans S and Wb, and each working row's
        entry in the step. Static (compiled, generic) steps cover rows [0, B) with B a bucket;
        the fused step covers only the segments of rows it needs (working rows and short gaps
        between them)."""
        text, cs = self.state.text, self.state.casa
        segments = None
        if self.fused:
            # the ragged attention reads each entry's own row: no idle row is worth computing
            ragged = ragged_cpu_available() and self.device.type == "cpu"
            segments = (
                segments_for(sorted(decode), 0, len(decode)) if ragged else segments_for(sorted(decode))
            )
            entries = [i for a, b in segments for i in range(a, b)]
        else:
            entries = list(range(next(b for b in self.buckets if b > max(decode))))
        B = len(entries)
        tokens = torch.zeros(B, dtype=torch.long)
        sa_slot = torch.full((B,), text.capacity, dtype=torch.long)  # idle rows: the scratch slot
        sa_pos = torch.zeros(B, dtype=torch.long)
        ca_slot = torch.full((B,), cs.window if cs is not None else 0, dtype=torch.long)
        n_img = torch.zeros(B, dtype=torch.long)
        working = sorted(decode)
        for i in working:
            if self.insertion:
                self._insertion_room(i, 1)
            else:
                text.make_room(i, 1, self.lm.freqs)
        at = {i: j for j, i in enumerate(entries)}
        rows = torch.tensor(working)  # batch rows
        idx = torch.tensor([at[i] for i in working])  # their entries
        tokens[idx] = torch.tensor([decode[i] for i in working])
        sa_slot[idx] = text.length[rows]
        if self.insertion:
            spans = self.state.spans
            sa_pos[idx] = torch.tensor([spans.position[i] for i in working])
            for i in working:
                spans.fed(text, i, int(text.length[i]), 1, 1)
        else:
            sa_pos[idx] = text.length[rows]
        if int(sa_slot[idx].max()) >= text.capacity:
            raise ValueError("text cache overflow: a row has no room for one more token")
        S = _round_up(int(sa_slot[idx].max()) + 1, self.span_round, text.capacity)
        Wb = 1
        if cs is not None:
            ca_slot[idx] = cs.win_len[rows]
            n_img[idx] = cs.n_img[rows]
            if int(ca_slot[idx].max()) >= cs.window:
                raise ValueError(f"CASA window overflow: a window holds at most {cs.window} text tokens")
            Wb = _round_up(int(ca_slot[idx].max()) + 1, self.span_round, cs.window)
        dev = self.device
        inp = DecodeInputs(*(t.to(dev, non_blocking=True) for t in (tokens, sa_slot, sa_pos, ca_slot, n_img)))
        if segments is not None:
            inp.rows, inp.segments = torch.tensor(entries, device=dev), segments
        return inp, S, Wb, at

    def _decode_step(self, decode: dict[int, int], sample: set[int], res: StepResult) -> None:
        inp, S, Wb, at = self.decode_inputs(decode)
        logits, new = self._decode(self.lm, self.state, inp, S, Wb)
        if new is not None:  # the fused step writes its K/V as it goes
            commit(self.state, inp, new)
        self.state.advance(torch.tensor(sorted(decode)), 1)
        res.decode_rows = inp.tokens.shape[0]
        for i, tok in decode.items():
            res.fed.setdefault(i, []).append(tok)
            if i in sample:
                res.sample_logits[i] = logits[at[i]]
            if self.record:
                res.fed_logits[i] = logits[at[i] : at[i] + 1]

    def warmup(self, vision_batches: int = 4) -> None:
        """Trace the vision tower for 1..vision_batches frames, and run the decode step once per
        bucket with every row idle (only scratch slots change)."""
        if self.trace_vision:
            for n in range(1, vision_batches + 1):
                self._traced_vision(n)
        text, cs = self.state.text, self.state.casa
        for B in self.buckets:
            z = torch.zeros(B, dtype=torch.long, device=self.device)
            inp = DecodeInputs(
                z,
                torch.full((B,), text.capacity, dtype=torch.long, device=self.device),
                z,
                torch.full((B,), cs.window if cs is not None else 0, dtype=torch.long, device=self.device),
                z,
            )
            with torch.no_grad():
                for S in {self.span_round, text.capacity}:
                    _, new = self._decode(
                        self.lm, self.state, inp, S, min(self.span_round, cs.window) if cs else 1
                    )
                    if new is not None:
                        commit(self.state, inp, new)


@dataclass
class PackedTree:
    """Several token sequences fed as one trie: every shared prefix once, then each one's rest."""

    ids: list[int]  # prefix, then each sequence's rest, in order
    depth: torch.Tensor  # (n,) each token's offset in its own sequence (its position past the row's)
    tree: torch.Tensor  # (n, n) bool: token i sees token j (j is i or an earlier token of i's sequence)
    last: list[int]  # index of each sequence's last token


def pack_tree(seqs: list[list[int]]) -> PackedTree:
    """`pack_trie` of these sequences, cached: a row's watches are packed again on every frame, and
    change only when a session sets new ones (the result is shared: read it, never write it)."""
    return _pack_cached(tuple(tuple(q) for q in seqs))


@functools.lru_cache(maxsize=1024)
def _pack_cached(seqs: tuple[tuple[int, ...], ...]) -> PackedTree:
    return pack_trie([list(q) for q in seqs])


def pack_trie(seqs: list[list[int]]) -> PackedTree:
    """Pack non-empty sequences as a trie: tokens that start the same way are fed once ("<|question|>
    is" for every watch, then "there a" for the three `is there a ...` ones), and each sequence's
    last token is a node of its own, even where a sequence is another's prefix or a duplicate, so
    each has a last token to read its answer from. Nodes come in creation order, a parent before
    its children."""
    ids: list[int] = []
    depth: list[int] = []
    parent: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent node or -1, token) -> node, last tokens excluded
    last = []
    for q in seqs:
        node = -1
        for k, t in enumerate(q):
            shared = children.get((node, t)) if k < len(q) - 1 else None
            if shared is None:
                ids.append(t)
                depth.append(k)
                parent.append(node)
                shared = len(ids) - 1
                if k < len(q) - 1:
                    children[(node, t)] = shared
            node = shared
        last.append(node)
    n = len(ids)
    tree = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):  # i sees itself and its ancestors
        j = i
        while j >= 0:
            tree[i, j] = True
            j = parent[j]
    return PackedTree(ids, torch.tensor(depth), tree, last)


def segments_for(rows: list[int], max_gap: int = 2, max_segments: int = 4) -> list[tuple[int, int]]:
    """Contiguous batch-row ranges [a, b) covering the sorted working `rows`: runs of consecutive
    rows, joined across gaps of <= max_gap idle rows (computing a few idle rows is cheaper than
    another round of attention ops), then across the smallest gaps until <= max_segments remain."""
    segs: list[list[int]] = []
    for r in rows:
        if segs and r - segs[-1][1] <= max_gap:
            segs[-1][1] = r + 1
        else:
            segs.append([r, r + 1])
    while len(segs) > max_segments:
        j = min(range(len(segs) - 1), key=lambda k: segs[k + 1][0] - segs[k][1])
        segs[j][1] = segs[j + 1][1]
        del segs[j + 1]
    return [(a, b) for a, b in segs]


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


def _feed_length(items: list[Item]) -> int:
    """Positions a row's feed takes: one per token id, N per inserted frame (N, hidden)."""
    return sum(it.tokens.shape[0] if isinstance(it, InsertedFrame) else 1 for it in items)


def _text_offsets(items: list[Item]) -> list[int]:
    """Step positions of the token ids among the items (inserted frames take N positions)."""
    out, j = [], 0
    for it in items:
        if isinstance(it, InsertedFrame):
            j += it.tokens.shape[0]
        else:
            out.append(j)
            j += 1
    return out
