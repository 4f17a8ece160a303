"""The runner's decode paths agree with each other and leave idle rows alone; buckets; the vision
pipeline changes nothing but where frames are encoded; the compiled step equals the eager one.

Streaming == dense through the runner is tests/test_model_streaming.py; here every fast path is
compared with the generic decode step (model/decode.py `decode_step`), which is `LanguageModel.step`
at T = 1.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import ATOL, assert_close

from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
from casa_live.model.decode import DecodeInputs, ScriptedStep, commit, decode_step, fused_decode_step
from casa_live.model.engine.engine import Engine, SessionSettings
from casa_live.model.engine.runner import buckets_for, segments_for


def make_engine(fusion: str = "casa", shared: bool = False, **kw) -> Engine:
    model = toy_model("test-tiny", seed=1, fusion=fusion, shared=shared)
    with torch.no_grad():  # larger weights than the default init: attention far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.15)
        model.lm.init_casa_from_self_attention()
    return Engine(model, word_tokenizer(model.config.lm.vocab), toy_generation_config(), **kw)


def stream(engine: Engine, prompts: list[str], frames: int, rows_first: int = 0):
    """Ragged captions over several frames; returns every fed token's logits and every emitted
    token, each in order per row (rows may be batched differently by different paths).

    rows_first: rows opened and left idle before the real ones, so the real rows sit higher in
    the batch (a larger decode bucket with idle rows below them)."""
    logits: dict[int, list[torch.Tensor]] = {}
    tokens: dict[int, list[int]] = {}

    def observe(res):  # type: ignore[no-untyped-def]
        for r in res.fed:
            logits.setdefault(r, []).extend(x.clone() for x in res.fed_logits[r])

    engine.record_logits = True
    engine.observers.append(observe)
    idle = [engine.open("hi") for _ in range(rows_first)]
    while engine.has_work():
        engine.step()
    rng = np.random.default_rng(0)
    rows = [engine.open(p, SessionSettings(max_new_tokens=2)) for p in prompts]
    for f in range(frames):
        for i, row in enumerate(rows):
            engine.update(row, SessionSettings(max_new_tokens=1 + (f + 2 * i) % 4))
            engine.submit_frame(row, rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
        while any(engine.busy(r) for r in rows):
            for ev in engine.step():
                tokens.setdefault(ev.row, []).append(ev.token)
    while engine.has_work():
        engine.step()
    assert all(engine.kv_tokens(r) == engine.kv_tokens(idle[0]) for r in idle)
    for r in idle + rows:
        engine.close(r)
    engine.observers.remove(observe)
    return logits, tokens


def max_err(a: dict[int, list[torch.Tensor]], b: dict[int, list[torch.Tensor]]) -> float:
    assert a.keys() == b.keys()
    assert all(len(a[r]) == len(b[r]) for r in a) and sum(len(v) for v in a.values()) > 10
    return max(float((x - y).abs().max()) for r in a for x, y in zip(a[r], b[r]))


@pytest.mark.parametrize(("fusion", "shared"), [("casa", False), ("casa", True), ("insertion", False)])
def test_fused_step_matches_generic_step(fusion: str, shared: bool) -> None:
    """The hand-fused CPU step == the generic step, over frames, ragged captions, idle rows."""
    ref_engine = make_engine(fusion, shared, max_sessions=6)
    ref_engine.runner.use("generic")
    fast_engine = make_engine(fusion, shared, max_sessions=6)
    assert isinstance(fast_engine.runner._decode, ScriptedStep)  # the CPU default
    ref, ref_tokens = stream(ref_engine, ["red circle", "what now", "a"], 4, rows_first=2)
    out, out_tokens = stream(fast_engine, ["red circle", "what now", "a"], 4, rows_first=2)
    assert out_tokens == ref_tokens
    err = max_err(out, ref)
    assert err <= ATOL[torch.float32], f"max abs err {err:.3g}"


@pytest.mark.parametrize(("fusion", "shared"), [("casa", False), ("casa", True), ("insertion", False)])
def test_scripted_step_is_bit_identical_to_the_eager_step(fusion: str, shared: bool) -> None:
    """TorchScript runs the fused step's ops unchanged: the same logits to the last bit, the same
    tokens, and the same cache contents as the eager fused step."""
    eager = make_engine(fusion, shared, max_sessions=6)
    eager.runner.use("fused")
    assert eager.runner._decode is fused_decode_step
    scripted = make_engine(fusion, shared, max_sessions=6)
    assert isinstance(scripted.runner._decode, ScriptedStep)
    ref, ref_tokens = stream(eager, ["red circle", "what now", "a"], 4, rows_first=2)
    out, out_tokens = stream(scripted, ["red circle", "what now", "a"], 4, rows_first=2)
    assert out_tokens == ref_tokens
    assert all(torch.equal(x, y) for r in ref for x, y in zip(ref[r], out[r], strict=True))
    assert torch.equal(eager.state.text.k, scripted.state.text.k)
    assert torch.equal(eager.state.text.v, scripted.state.text.v)
    if eager.state.casa is not None:
        assert torch.equal(eager.state.casa.k, scripted.state.casa.k)
        assert torch.equal(eager.state.casa.v, scripted.state.casa.v)


@pytest.mark.parametrize("path", [decode_step, fused_decode_step, ScriptedStep()])
def test_decode_step_leaves_idle_rows_untouched(path) -> None:  # type: ignore[no-untyped-def]
    """Rows of the bucket without a token write only their scratch slots."""
    engine = make_engine(max_sessions=4)
    rows = [engine.open(p) for p in ("red circle", "blue", "what now")]
    rng = np.random.default_rng(1)
    for r in rows:
        engine.submit_frame(r, rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    while engine.has_work():
        engine.step()
    state = engine.state
    text_k, ca_k = state.text.k.clone(), state.casa.k.clone()
    lengths = state.text.length.clone()
    # row 2 decodes; rows 0, 1 and 3 are idle in a bucket of 4
    inp = DecodeInputs(
        torch.tensor([0, 0, 7, 0]),
        torch.tensor([state.text.capacity, state.text.capacity, int(lengths[2]), state.text.capacity]),
        torch.tensor([0, 0, int(lengths[2]), 0]),
        torch.tensor([state.casa.window, state.casa.window, int(state.casa.win_len[2]), state.casa.window]),
        state.casa.n_img[:4].clone(),
    )
    with torch.no_grad():
        _, new = path(engine.model.lm, state, inp, 64, 16)
        if new is not None:
            commit(state, inp, new)
    changed = (state.text.k != text_k).any(-1)  # (L, B, Hkv, C + 1 + score slots)
    for b in (0, 1, 3):
        assert not changed[:, b, :, : state.text.capacity].any()
    assert changed[:, 2, :, int(lengths[2])].all()  # the working row wrote its slot
    changed = (state.casa.k != ca_k).any(-1)  # (Lc, B, Hkv, N + W + 1 + score slots)
    for b in (0, 1, 3):
        assert not changed[:, b, :, : state.casa.image_tokens + state.casa.window].any()


def test_segments_cover_working_rows_with_few_matmuls() -> None:
    assert segments_for([3]) == [(3, 4)]
    assert segments_for([0, 1, 2, 5, 6]) == [(0, 7)]  # a gap of 2 idle rows is joined
    assert segments_for([0, 1, 9, 10, 20]) == [(0, 2), (9, 11), (20, 21)]
    segs = segments_for([0, 4, 8, 12, 16, 20, 24])  # 7 runs -> at most 4 segments
    assert len(segs) <= 4 and all(any(a <= r < b for a, b in segs) for r in [0, 4, 8, 12, 16, 20, 24])


def test_buckets() -> None:
    assert buckets_for(1) == [1]
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(32) == [1, 2, 4, 8, 16, 32]


def test_vision_pipeline_gives_the_same_captions_and_logits() -> None:
    """Frames encoded on the vision thread: same logits, same tokens as encoding inline."""
    inline = make_engine(max_sessions=4)
    piped = make_engine(max_sessions=4, vision_thread=True)
    try:
        ref, ref_tokens = stream(inline, ["red circle", "what now"], 4)
        out, out_tokens = stream(piped, ["red circle", "what now"], 4)
    finally:
        piped.shutdown()
    assert out_tokens == ref_tokens
    assert max_err(out, ref) <= ATOL[torch.float32]


def test_vision_pipeline_discards_frames_of_a_closed_row() -> None:
    engine = make_engine(max_sessions=2, vision_thread=True)
    try:
        row = engine.open("red circle")
        engine.submit_frame(row, np.zeros((24, 24, 3), np.uint8))
        engine.close(row)
        again = engine.open("blue")
        assert again == row
        engine.pipeline.wait(5.0)
        while engine.has_work():  # only the new prompt: the old frame must not start
            engine.step()
        assert not engine.busy(again) and engine.scheduler.rows[again].frames == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_a_prompt_from_the_prefix_cache_captions_as_if_fed(fusion: str) -> None:
    """Sessions on one prompt: the first feeds it, the others (and a restart) copy its K/V from
    the prefix cache. Every later token's logits and every caption equal those of an engine with
    no prefix cache, where each session feeds its own prompt."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(3)]

    def run(cache: bool):  # type: ignore[no-untyped-def]
        engine = make_engine(fusion, max_sessions=3)
        if not cache:
            engine.scheduler.prefix_capacity = 0
        engine.record_logits = True
        fed: dict[int, list[torch.Tensor]] = {}
        engine.observers.append(
            lambda res: [fed.setdefault(r, []).extend(x.clone() for x in res.fed_logits[r]) for r in res.fed]
        )
        tokens = []
        first = engine.open("red circle")  # alone: its prompt is prefilled, then saved
        tokens.append([ev.token for ev in engine.caption(first, images[0])])
        rows = [engine.open("red circle"), engine.open("red circle")]
        for row, img in zip(rows, images[1:]):
            tokens.append([ev.token for ev in engine.caption(row, img)])
        before_restart = {r: list(v) for r, v in fed.items()}
        engine.restart(rows[0], "red circle")
        tokens.append([ev.token for ev in engine.caption(rows[0], images[0])])
        return tokens, before_restart, engine

    ref_tokens, ref_fed, ref_engine = run(False)
    out_tokens, out_fed, engine = run(True)
    assert out_tokens == ref_tokens and tokens_differ(out_tokens)
    assert list(engine.runner.prefixes) == [tuple(engine.prompt_ids("red circle"))]
    assert not ref_engine.runner.prefixes
    # the restored rows fed no prompt; what they fed after it matches the reference's tail
    n_prompt = len(engine.prompt_ids("red circle"))
    for r in out_fed:
        n = len(out_fed[r])
        assert n == len(ref_fed[r]) - (n_prompt if r != 0 else 0)
        err = max(float((x - y).abs().max()) for x, y in zip(out_fed[r], ref_fed[r][-n:]))
        assert err <= ATOL[torch.float32], f"row {r}: {err:.3g}"


def tokens_differ(tokens: list[list[int]]) -> bool:
    """The captions are not all alike (so that equal lists are evidence)."""
    return len({tuple(t) for t in tokens}) > 1


def test_decode_thread_helps_encode_a_backlog() -> None:
    """With the vision thread busy, queued frames are encoded by the thread that calls
    `help_vision` (the server's worker when it has nothing to step), and the captions are the same
    as with every frame encoded inline."""
    import threading

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(3)]
    inline = make_engine(max_sessions=3)
    expected = []
    for img in images:
        row = inline.open("red circle")
        expected.append([ev.token for ev in inline.caption(row, img)])
        inline.close(row)
    engine = make_engine(max_sessions=3, vision_thread=True)
    encode, gate, threads = engine.pipeline._encode, threading.Event(), []

    def encode_logged(frames):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        if threading.current_thread().name == "casa-vision":
            assert gate.wait(10.0)  # the vision thread is stuck on its first batch
        return encode(frames)

    engine.pipeline._encode = encode_logged
    engine.pipeline.max_batch = 1
    try:
        rows = [engine.open("red circle") for _ in images]
        while engine.has_work():
            engine.step()
        for row, img in zip(rows, images):
            engine.submit_frame(row, img)
        deadline = time.monotonic() + 10.0
        while not engine.vision_backlog() or len(threads) < 1:  # the vision thread has taken one
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert engine.help_vision() and engine.help_vision()  # the other two, on this thread
        assert not engine.help_vision()  # nothing queued any more
        gate.set()
        tokens: dict[int, list[int]] = {r: [] for r in rows}
        while any(engine.busy(r) for r in rows):
            for ev in engine.step():
                tokens[ev.row].append(ev.token)
        assert sorted(threads) == ["MainThread", "MainThread", "casa-vision"]
        assert sorted(tokens.values()) == sorted(expected)
    finally:
        gate.set()
        engine.shutdown()


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    """torch.compile'd decode step == eager, over frames, ragged rows and two bucket sizes
    (3 working rows above 1 idle row: buckets 4; then a lone row: bucket 1)."""
    eager = make_engine(max_sessions=4)
    compiled = make_engine(max_sessions=4, compile=True)
    ref, ref_tokens = stream(eager, ["red circle", "what now", "a"], 3, rows_first=1)
    out, out_tokens = stream(compiled, ["red circle", "what now", "a"], 3, rows_first=1)
    assert out_tokens == ref_tokens
    assert max_err(out, ref) <= ATOL[torch.float32]
    ref, _ = stream(eager, ["blue"], 2)
    out, _ = stream(compiled, ["blue"], 2)
    assert max_err(out, ref) <= ATOL[torch.float32]


def test_traced_vision_tower_matches_eager() -> None:
    engine = make_engine(max_sessions=2)
    runner = engine.runner
    assert runner.trace_vision
    rng = np.random.default_rng(2)
    for n in (1, 3):
        patches = torch.stack(
            [engine.processor(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)) for _ in range(n)]
        )
        with torch.no_grad():
            traced, (k, v) = runner.encode(patches)
            eager = engine.model.encode_images(patches)
            gh, gw = engine.model.patch_grid
            m = engine.model.config.vision.merge
            ek, ev = engine.model.lm.frame_kv(eager, (gh // m, gw // m))
        assert_close(traced, eager, torch.float32, f"traced vision tower, batch {n}", atol=ATOL)
        # the frames' CASA image K/V are traced with the tower
        assert_close(k, ek, torch.float32, f"traced image keys, batch {n}", atol=ATOL)
        assert_close(v, ev, torch.float32, f"traced image values, batch {n}", atol=ATOL)
    grid = engine.model.patch_grid
    assert set(runner._vision) == {(1, grid), (3, grid)}  # one trace per batch size and grid


def test_a_frame_the_vision_thread_cannot_encode_fails_alone() -> None:
    """An image that passes submit_frame's checks but not preprocessing: its frame ends with an
    error event, the neighbour submitted with it is captioned as if alone."""
    alone = make_engine(max_sessions=2)
    row = alone.open("red circle")
    img = np.random.default_rng(4).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    expected = [ev.token for ev in alone.caption(row, img)]
    engine = make_engine(max_sessions=2, vision_thread=True)
    try:
        bad, good = engine.open("blue"), engine.open("red circle")
        while engine.has_work():
            engine.step()
        engine.submit_frame(bad, np.zeros((0, 5, 3), np.uint8))
        engine.submit_frame(good, img)
        events: dict[int, list] = {bad: [], good: []}
        while engine.busy(bad) or engine.busy(good):
            for ev in engine.step():
                events[ev.row].append(ev)
        assert [ev.reason for ev in events[bad]] == ["error"]
        assert [ev.token for ev in events[good]] == expected
        assert not engine.busy(bad)  # the session can submit its next frame
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fusion", ["casa", "insertion"])
def test_prompt_opened_under_load_goes_through_the_step_and_matches_a_lone_open(fusion: str) -> None:
    """A session opened while another row decodes feeds its (short) prompt a token a tick through
    the batched step instead of an eager prefill (model/engine/scheduler.py); its logits and captions are
    those of the same session opened alone, whose prompt is prefilled in one forward."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (30, 41, 3), dtype=np.uint8) for _ in range(4)]
    prompt = "describe the red ball"

    def run(busy_neighbour: bool) -> tuple[dict[int, list[torch.Tensor]], list[int], list[int]]:
        engine = make_engine(fusion, max_sessions=3)
        engine.record_logits = True
        fed: list[torch.Tensor] = []
        per_tick: list[int] = []  # items the row was fed in each tick before its first frame

        def observe(res) -> None:  # type: ignore[no-untyped-def]
            if row in res.fed:
                fed.extend(x.clone() for x in res.fed_logits[row])
                if row not in res.frames and not started:
                    per_tick.append(len(res.fed[row]))

        row, started = -1, False
        engine.observers.append(observe)
        if busy_neighbour:
            other = engine.open("hi", SessionSettings(max_new_tokens=20))
            while engine.has_work():
                engine.step()
            engine.submit_frame(other, images[0])
            engine.step()
            engine.step()  # the neighbour is decoding now
            assert engine.busy(other)
        row = engine.open(prompt, SessionSettings(max_new_tokens=3))
        n_prompt = len(engine.scheduler.rows[row].forced)
        tokens = []
        for img in images:
            engine.submit_frame(row, img)
            while engine.busy(row):
                tokens += [ev.token for ev in engine.step() if ev.row == row]
                started = started or engine.scheduler.rows[row].frames > 0
        assert sum(per_tick) == n_prompt > 1
        return {0: fed}, tokens, per_tick

    lone, lone_tokens, lone_ticks = run(False)
    loaded, loaded_tokens, loaded_ticks = run(True)
    # alone: one prefill; beside a busy row: a token a tick (the rest in one prefill once the
    # neighbour's caption ends and the row is alone again)
    assert len(lone_ticks) == 1 and loaded_ticks[:2] == [1, 1]
    assert loaded_tokens == lone_tokens
    assert max_err(lone, loaded) <= ATOL[torch.float32]
