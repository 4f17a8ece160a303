"""Streaming engine == dense reference, CASA locality, the bounded text cache."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from conftest import ATOL, SAME_MATH_ATOL, assert_close

from casa_live.model.cache import plan_eviction, plan_span_eviction
from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
from casa_live.model.engine.engine import Engine, SessionSettings
from casa_live.model.engine.scheduler import InsertedFrame
from casa_live.model.reference import Interleaved


class Recorder:
    """Observes an engine's ticks (Engine.observers) to record, per row, every fed text token with
    the logits streaming gave it, and every frame (image tokens) with the text index where it was
    inserted."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: dict[int, list[int]] = {}
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.frames: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.feed_sizes: dict[int, list[int]] = {}
        self.feeds: dict[int, list[list[tuple[int, int]]]] = {}  # per tick: (slots, positions) per item
        engine.record_logits = True
        engine.observers.append(self.observe)

    def observe(self, res) -> None:  # type: ignore[no-untyped-def]
        if not self.engine.insertion:
            for r, img in res.frames.items():
                self.frames.setdefault(r, []).append((len(self.tokens.get(r, [])), img.clone()))
        for r, items in res.fed.items():
            self.feed_sizes.setdefault(r, []).append(0)
            self.feeds.setdefault(r, []).append([])
            logits = iter(res.fed_logits[r])
            for it in items:
                if isinstance(it, InsertedFrame):  # insertion: a frame inside the text stream
                    self.frames.setdefault(r, []).append((len(self.tokens.get(r, [])), it.tokens.clone()))
                    self.feed_sizes[r][-1] += it.tokens.shape[0]
                    self.feeds[r][-1].append((it.tokens.shape[0], max(it.grid)))
                    continue
                self.tokens.setdefault(r, []).append(int(it))
                self.logits.setdefault(r, []).append(next(logits))
                self.feed_sizes[r][-1] += 1
                self.feeds[r][-1].append((1, 1))

    def fork(self, row: int, frame: int) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        """The stream a question about `row`'s frame `frame` starts from (a branch or a watch), as
        a dense reference reads it: (text tokens, frames). CASA: the text before the frame's
        caption, where the frame was inserted (docs/engine.md, "Questions"); token insertion: the
        whole text at the boundary after the frame's caption."""
        frames = self.frames[row][: frame + 1]
        if not self.engine.insertion:
            return self.tokens[row][: frames[-1][0]], frames
        after = self.frames[row][frame + 1 :]
        return self.tokens[row][: after[0][0] if after else len(self.tokens[row])], frames

    def join_branch(self, row: int, branch: int, frame: int) -> list[int]:
        """Make `branch`'s record the one sequence a dense reference reads: the stream the branch
        forked from (`fork`), then what the branch fed. Returns that stream's tokens."""
        prefix, frames = self.fork(row, frame)
        self.tokens[branch] = prefix + self.tokens.get(branch, [])
        self.frames[branch] = list(frames)
        return prefix

    def batch(self, rows: list[int], grids: dict[int, list[tuple[int, int]]] | None = None) -> Interleaved:
        """grids: per row, each frame's merged grid (frames of varying sizes; padded to the largest)."""
        T = max(len(self.tokens[r]) for r in rows)
        Fm = max(len(self.frames[r]) for r in rows)
        N = max(img.shape[0] for r in rows for _, img in self.frames[r])
        D = self.frames[rows[0]][0][1].shape[1]
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        images = torch.zeros(len(rows), Fm, N, D)
        insert_at = torch.zeros(len(rows), Fm, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(self.tokens[r])] = torch.tensor(self.tokens[r])
            for f, (at, img) in enumerate(self.frames[r]):
                insert_at[b, f], images[b, f, : img.shape[0]] = at, img
        return Interleaved(
            tokens=tokens,
            text_len=torch.tensor([len(self.tokens[r]) for r in rows]),
            images=images,
            n_frames=torch.tensor([len(self.frames[r]) for r in rows]),
            insert_at=insert_at,
            grid=self.engine.model.grid,
            frame_grids=None if grids is None else [grids[r] for r in rows],
        )


def make_engine(
    fusion: str = "casa", shared: bool = False, std: float = 0.15, processor: str = "casa", **kw
) -> Engine:
    model = toy_model("test-tiny", seed=1, fusion=fusion, shared=shared)
    model.config.processor = processor
    with torch.no_grad():  # larger weights than the default init, so attention patterns are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=std)
        model.lm.init_casa_from_self_attention()
    tok = word_tokenizer(model.config.lm.vocab)
    return Engine(model, tok, toy_generation_config(), **kw)


def run_session(engine: Engine, frames: int, lengths: list[list[int]], prompts: list[str], seed: int = 0):
    """Open one row per prompt and caption `frames` frames, with per-frame caption lengths."""
    rng = np.random.default_rng(seed)
    rows = [engine.open(p, SessionSettings(max_new_tokens=lengths[i][0])) for i, p in enumerate(prompts)]
    for f in range(frames):
        for i, row in enumerate(rows):
            engine.update(row, SessionSettings(max_new_tokens=lengths[i][f]))
            engine.submit_frame(row, rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8))
        while any(engine.busy(r) for r in rows):
            engine.step()
    while engine.has_work():  # feed the last stop tokens
        engine.step()
    return rows


def max_err(rec: Recorder, rows: list[int], logits: torch.Tensor) -> float:
    err = 0.0
    for b, r in enumerate(rows):
        stream = torch.stack(rec.logits[r])
        err = max(err, float((stream - logits[b, : len(stream)]).abs().max()))
    return err


@pytest.mark.parametrize(
    ("fusion", "shared"), [("casa", False), ("casa", True), ("ca", False), ("insertion", False)]
)
def test_streaming_matches_dense_reference(fusion: str, shared: bool) -> None:
    engine = make_engine(fusion, shared, max_sessions=3, max_context_tokens=512)
    rec = Recorder(engine)
    # the sampler must see the logits of each row's LAST fed position (an inserted frame is one
    # feed item but N positions: sampling at the item count once read an image token's logits)
    sampled_err: list[float] = []
    sample = engine.sampler.sample

    def spy(rows_, logits, no_stop):  # type: ignore[no-untyped-def]
        for j, r in enumerate(rows_):
            sampled_err.append(float((logits[j].float() - rec.logits[r][-1]).abs().max()))
        return sample(rows_, logits, no_stop)

    engine.sampler.sample = spy
    lengths = [[3, 1, 5, 2, 4], [2, 4, 1, 3, 6]]
    rows = run_session(engine, 5, lengths, ["red circle", "what do you see now in the video"])
    assert len(sampled_err) >= 30 and max(sampled_err) <= ATOL[torch.float32]
    batch = rec.batch(rows)
    assert (batch.n_frames == 5).all()
    assert batch.text_len[0] != batch.text_len[1]
    with torch.no_grad():
        dense = engine.model.forward_dense(batch)
    err = max_err(rec, rows, dense)
    assert err <= ATOL[torch.float32], f"max abs err {err:.3g}"
    # the check has teeth: a reference without the frames disagrees
    if fusion != "insertion":
        batch.n_frames = torch.zeros_like(batch.n_frames)
        with torch.no_grad():
            blind = engine.model.forward_dense(batch)
        assert max_err(rec, rows, blind) > 1e-3


@pytest.mark.parametrize(("fusion", "vision_thread"), [("casa", False), ("casa", True), ("insertion", True)])
def test_aspect_preserving_frames_match_dense_reference(fusion: str, vision_thread: bool) -> None:
    """A Qwen-style processor keeps each frame's aspect ratio within a pixel budget, so frames
    have their own grids and image-token counts: streaming them (the CASA image buffer sized for
    the budget) equals the dense reference over the same frames."""
    budget = 32 * 32  # test-tiny's unit is 8 pixels: at most 16 image tokens
    engine = make_engine(
        fusion,
        processor="qwen",
        max_sessions=2,
        max_context_tokens=512,
        max_pixels=budget,
        vision_thread=vision_thread,
    )
    assert engine.processor.max_tokens == 16
    if engine.state.casa is not None:
        assert engine.state.casa.image_tokens == 16
    rec = Recorder(engine)
    shapes = [[(30, 41), (20, 20), (40, 24), (24, 64)], [(40, 24), (33, 33), (20, 20), (30, 41)]]
    grids: dict[int, list[tuple[int, int]]] = {}
    rng = np.random.default_rng(5)
    rows = [engine.open(p, SessionSettings(max_new_tokens=3)) for p in ("red circle", "blue square")]
    for f in range(4):
        for i, row in enumerate(rows):
            h, w = shapes[i][f]
            th, tw = engine.processor.target_size(h, w)
            grids.setdefault(row, []).append((th // 8, tw // 8))
            engine.submit_frame(row, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        while any(engine.busy(r) for r in rows):
            engine.step()
    while engine.has_work():
        engine.step()
    counts = {img.shape[0] for r in rows for _, img in rec.frames[r]}
    assert len(counts) >= 3 and max(counts) <= 16  # the frames really differ in size
    for r in rows:
        assert [img.shape[0] for _, img in rec.frames[r]] == [gh * gw for gh, gw in grids[r]]
    batch = rec.batch(rows, grids)
    with torch.no_grad():
        dense = engine.model.forward_dense(batch)
    err = max_err(rec, rows, dense)
    assert err <= ATOL[torch.float32], f"max abs err {err:.3g}"
    # teeth: the same frames read with the wrong grids (one square per count) disagree
    batch.frame_grids = [[(1, gh * gw) for gh, gw in grids[r]] for r in rows]
    with torch.no_grad():
        wrong = engine.model.forward_dense(batch)
    assert max_err(rec, rows, wrong) > 1e-3
    engine.shutdown()


def test_casa_locality() -> None:
    """With self-attention silenced, window k depends on frame k and not on earlier frames."""

    def casa_outputs(frames: list[np.ndarray]) -> dict[int, list[torch.Tensor]]:
        engine = make_engine("casa", max_sessions=1, max_context_tokens=512)
        engine.runner.use("generic")  # the fused CPU step reads weights, not modules: no hooks
        with torch.no_grad():
            for block in engine.model.lm.layers:
                block.self_attn.o_proj.weight.zero_()
        outs: dict[int, list[torch.Tensor]] = {}
        current = {"frame": -1}
        hooks = []
        for block in engine.model.lm.layers:
            if block.casa is not None:
                hooks.append(
                    block.casa.proj.o_proj.register_forward_hook(
                        lambda m, i, o: outs.setdefault(current["frame"], []).append(o[0].clone())
                    )
                )
        row = engine.open("red circle", SessionSettings(max_new_tokens=4))
        for f, img in enumerate(frames):
            while engine.has_work():
                engine.step()
            current["frame"] = f
            for _ in engine.caption(row, img):
                pass
        for h in hooks:
            h.remove()
        return outs

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(4)]
    base = casa_outputs(frames)
    earlier = casa_outputs([frames[0], 255 - frames[1], frames[2], frames[3]])
    current = casa_outputs([frames[0], frames[1], frames[2], 255 - frames[3]])
    for a, b in zip(base[3], earlier[3]):
        assert_close(a, b, torch.float32, "CASA layer 3 with frame 1 changed", atol=SAME_MATH_ATOL)
    assert max(float((a - b).abs().max()) for a, b in zip(base[1], earlier[1])) > 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(base[3], current[3])) > 1e-3


def visibility(feed_sizes: list[int], capacity: int, sink: int, chunk: int) -> torch.Tensor:
    """(T, T) which text keys each query saw, replaying the cache's eviction policy."""
    T = sum(feed_sizes)
    vis = torch.zeros(T, T, dtype=torch.bool)
    kept: list[int] = []
    t = 0
    for n in feed_sizes:
        k = plan_eviction(len(kept), n, capacity, sink, chunk)
        kept = kept[:sink] + kept[sink + k :]
        for i in range(n):
            vis[t + i, kept + list(range(t, t + i + 1))] = True
        kept += list(range(t, t + n))
        t += n
    return vis


def stream_past_bound(fusion: str, capacity: int) -> tuple[Engine, Recorder, list[int], int]:
    """Two sessions of 10 frames through a text cache of `capacity` tokens, recorded; checks no
    row ever held more. Returns the engine, the recorder, the rows and the cache's data_ptr from
    before the stream."""
    engine = make_engine(fusion, max_sessions=2, max_context_tokens=capacity)
    k_before = engine.state.text.k.data_ptr()
    rec = Recorder(engine)
    sizes = []
    engine.observers.append(lambda res: sizes.append(int(engine.state.text.length.max())))
    lengths = [[5, 6, 4, 6, 5, 6, 5, 6, 6, 5]] * 2
    rows = run_session(engine, 10, lengths, ["red circle", "blue square at the top"])
    assert max(sizes) <= capacity
    return engine, rec, rows, k_before


def test_bounded_text_cache_matches_restricted_reference() -> None:
    capacity = 40
    engine, rec, rows, k_before = stream_past_bound("casa", capacity)
    assert (
        engine.state.text.k.data_ptr() == k_before
        and engine.state.text.k.shape[3] == capacity + 1 + engine.watch_tokens
    )  # + scratch + the watch scoring slots
    for r in rows:
        assert engine.state.text.evicted[r] > 0, "the stream must have outgrown the cache"
        assert sum(rec.feed_sizes[r]) > capacity
    batch = rec.batch(rows)
    T = batch.tokens.shape[1]
    vis = torch.zeros(len(rows), T, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = sum(rec.feed_sizes[r])
        vis[b, :n, :n] = visibility(
            rec.feed_sizes[r], capacity, int(engine.state.text.sink[r]), engine.state.text.chunk
        )
    with torch.no_grad():
        dense = engine.model.forward_dense(batch, sa_visible=vis)
        unbounded = engine.model.forward_dense(batch)
    err = max_err(rec, rows, dense)
    assert err <= ATOL[torch.float32], f"max abs err {err:.3g}"
    assert max_err(rec, rows, unbounded) > 1e-3  # eviction really changed what the model saw


def insertion_visibility(
    feeds: list[list[tuple[int, int]]], capacity: int, sink: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token insertion: (L, L) which stream tokens each query saw and (L, L) how many positions
    below its Qwen position each key sat for it, replaying the bounded policy (whole oldest items
    after the sink go; the rest move down by the evicted position span)."""
    L = sum(n for feed in feeds for n, _ in feed)
    vis = torch.zeros(L, L, dtype=torch.bool)
    off = torch.zeros(L, L, dtype=torch.long)
    sink_idx: list[int] = []
    spans: collections.deque[tuple[int, int, list[int]]] = (
        collections.deque()
    )  # (slots, positions, stream ids)
    shift = t = 0
    for feed in feeds:
        n_new = sum(n for n, _ in feed)
        length = len(sink_idx) + sum(a for a, _, _ in spans)
        k, _, d = plan_span_eviction([(a, b) for a, b, _ in spans], length, n_new, capacity, sink, chunk)
        for _ in range(k):
            spans.popleft()
        shift += d
        kept = [j for _, _, ids in spans for j in ids]
        new = list(range(t, t + n_new))
        for i, q in enumerate(new):
            window = kept + new[: i + 1]
            vis[q, sink_idx + window] = True
            off[q, window] = shift
        j = t
        for n, span in feed:
            ids = list(range(j, j + n))
            if len(sink_idx) < sink:
                sink_idx += ids
            else:
                spans.append((n, span, ids))
            j += n
        t += n_new
    return vis, off


def test_bounded_insertion_cache_matches_restricted_reference() -> None:
    """A token-insertion model streams past its text cache: StreamingVLM's sink + sliding window of
    whole frames and text, positions re-based contiguously, equals the dense insertion reference
    that sees exactly the kept tokens at their re-based positions."""
    capacity = 56
    engine, rec, rows, _ = stream_past_bound("insertion", capacity)
    text = engine.state.text
    for r in rows:
        assert text.evicted[r] > 2 * capacity, "the stream must have outgrown the cache several times"
        assert engine.state.spans.position[r] < 2 * capacity  # positions stay bounded, too
    batch = rec.batch(rows)
    L = max(sum(rec.feed_sizes[r]) for r in rows)
    vis = torch.zeros(len(rows), L, L, dtype=torch.bool)
    off = torch.zeros(len(rows), L, L, dtype=torch.long)
    for b, r in enumerate(rows):
        n = sum(rec.feed_sizes[r])
        vis[b, :n, :n], off[b, :n, :n] = insertion_visibility(
            rec.feeds[r], capacity, int(text.sink[r]), text.chunk
        )
    with torch.no_grad():
        dense = engine.model.forward_dense(batch, sa_visible=vis, sa_offset=off)
        unbounded = engine.model.forward_dense(batch)
        unshifted = engine.model.forward_dense(batch, sa_visible=vis, sa_offset=torch.zeros_like(off))
    err = max_err(rec, rows, dense)
    assert err <= ATOL[torch.float32], f"max abs err {err:.3g}"
    assert max_err(rec, rows, unbounded) > 1e-3  # eviction really changed what the model saw
    assert max_err(rec, rows, unshifted) > 1e-3  # ... and the re-basing of positions matters


def test_engine_reports_vision_time_only_for_steps_that_start_frames() -> None:
    """Engine.last_result.vision_s is what the server's vision-encode histogram observes."""
    engine = make_engine(max_sessions=2)
    row = engine.open("hi", SessionSettings(max_new_tokens=3, min_new_tokens=3))
    while engine.has_work():  # the prompt (short runs go one token a tick)
        engine.step()
        assert engine.last_result.vision_s == 0.0
    engine.submit_frame(row, np.zeros((32, 32, 3), dtype=np.uint8))
    engine.step()  # encodes the frame and samples the first token
    assert engine.last_result.vision_s > 0.0
    engine.step()  # a decode step: no vision work
    assert engine.last_result.vision_s == 0.0
