"""Kyutai's live-captioning procedure (docs/engine.md, "Fidelity to Kyutai's procedure"): the close of
a caption cut short, the stop-token bias, what the EMA penalty and the n-gram history count, top-p.

The engine is checked against a slow re-statement of Kyutai's loop (one generate call per frame, their
logits processors over that call's input_ids) driven by the engine's own raw logits, and the sampler's
filters against transformers' warpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casa_live.model.engine.engine import Engine, SessionSettings
from casa_live.model.engine.sampling import Sampler, SamplingParams, apply_stop_bias, top_p_filter
from tests.test_model_streaming import Recorder, make_engine

PROMPT = "describe what you see"


class KyutaiLoop:
    """Kyutai's streaming loop, restated: each frame is one generate call whose input_ids are the
    text it adds ([pending stop] + pre_image + post_image, frame 0: the prompt + post_image + caption
    prefix). At every step of a call their EMA penalty decays its counts and charges input_ids[-1]
    (clamped where used), the stop-token bias multiplies the stop logits, and the windowed n-gram
    blocker extends its history with the call's new input_ids. The call ends on a stop token or after
    max_new tokens; its last token is never forwarded; the stop token the model emitted most recently
    (stop_ids[0] before any) is the next call's first input."""

    def __init__(self, engine: Engine, p: SamplingParams, max_new: int) -> None:
        self.engine, self.p, self.max_new = engine, p, max_new
        self.stops = engine.template.stop
        self.ema = torch.zeros(engine.model.config.lm.vocab)
        self.history: list[int] = []
        self.seen: list[int] = []  # the input_ids at the blocker's last call
        self.fed = list(engine.prompt_ids(PROMPT))  # every token forwarded, in order
        self.stop = self.stops[0]

    def start(self, frame: int) -> None:
        e = self.engine
        new = (
            (e.template.post + e.template.caption_prefix)
            if frame == 0
            else [self.stop, *e.template.pre, *e.template.post]
        )
        # frame 0's call holds the whole prompt; its first tokens were fed when the session opened
        self.call = (self.fed + new) if frame == 0 else new
        self.fed += new
        self.seen = []

    def step(self, raw: torch.Tensor) -> int:
        p, s = self.p, raw.clone().float()
        self.ema *= p.decay
        self.ema[self.call[-1]] += 1.0
        factor = p.repetition_penalty ** self.ema.clamp(0.0, p.clamp)
        factor[self.stops] = 1.0
        s = torch.where(s < 0, s * factor, s / factor)
        for t in self.stops:
            s[t] = s[t] / p.eos_bias if s[t] < 0 else s[t] * p.eos_bias
        ids = self.call
        if len(ids) > len(self.seen) and ids[: len(self.seen)] == self.seen:
            self.history.extend(ids[len(self.seen) :])
        else:
            self.history.extend(ids)
        self.seen = list(ids)
        self.history = self.history[-p.ngram_window :]
        n = p.no_repeat_ngram
        prefix = tuple(self.history[len(self.history) - (n - 1) :])
        for i in range(len(self.history) - n + 1):
            if tuple(self.history[i : i + n - 1]) == prefix and self.history[i + n - 1] not in self.stops:
                s[self.history[i + n - 1]] = float("-inf")
        tok = int(s.argmax())
        self.call = [*self.call, tok]
        return tok

    def end(self, tokens: list[int]) -> None:
        """The call emitted `tokens`: every one but the last is forwarded."""
        self.fed += tokens[:-1]
        if tokens[-1] in self.stops:
            self.stop = tokens[-1]


def stop_reversed_engine(**kw) -> Engine:
    """The toy model emits <|frame_end|> as its stop; with <|im_end|> listed first, a stop the model
    emitted and stop_ids[0] differ."""
    e = make_engine(max_sessions=2, max_context_tokens=512, **kw)
    e.gen.stop_tokens = ["<|im_end|>", "<|frame_end|>"]
    return Engine(e.model, e.tokenizer, e.gen, max_sessions=2, max_context_tokens=512)


def test_engine_is_kyutais_loop_for_imported_defaults() -> None:
    """penalty_counts="fed" and truncated_close="last_stop": the engine's tokens and its whole fed
    stream equal Kyutai's loop, over frames ended by a stop token and frames cut short."""
    engine = stop_reversed_engine()
    engine.gen.penalty_counts, engine.gen.truncated_close = "fed", "last_stop"
    settings = SessionSettings(max_new_tokens=4, eos_bias=2.0, repetition_penalty=1.3, no_repeat_ngram=2)
    rec = Recorder(engine)
    raw: list[torch.Tensor] = []
    engine.observers.append(
        lambda res: raw.extend(v.clone() for k, v in res.sample_logits.items() if k == row)
    )
    other = engine.open("the other row")  # batched with a second session, which must not mix in
    row = engine.open(PROMPT, settings)
    loop = KyutaiLoop(engine, engine.sampler.params[row], max_new=4)
    rng = np.random.default_rng(0)
    reasons = []
    for f in range(10):
        img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        engine.submit_frame(other, img)
        loop.start(f)
        events = list(engine.caption(row, img))
        history, fed = list(engine.sampler.history[row]), list(rec.tokens[row])  # before the close is fed
        while engine.busy(other):
            engine.step()
        tokens = [ev.token for ev in events]
        tokens[-1] = tokens[-1] if events[-1].reason != "stop" else engine.scheduler.rows[row].last_stop
        steps, raw[:] = list(raw), []
        assert len(steps) == len(tokens)
        assert [loop.step(r) for r in steps] == tokens, f"frame {f}"
        # the n-gram history is the fed text stream: prompt, template and stop tokens included
        w = loop.p.ngram_window
        assert history[-w:] == loop.history == fed[-w:]
        loop.end(tokens)
        reasons.append(events[-1].reason)
    for _ in range(3):  # the last close is forced over the next ticks
        engine.step()
    # the ones that were cut short after the model had emitted <|frame_end|>: it, not stop_ids[0], closed them
    assert {"stop", "length"} <= set(reasons)
    assert engine.template.stop[0] != loop.stop == engine.tokenizer.token_id("<|frame_end|>")
    assert rec.tokens[row] == [*loop.fed, loop.stop, *engine.template.pre]


def _cut_frames(mode: str | None, gen_mode: str = "cut_word") -> tuple[Engine, list[int], list]:
    """Six frames of 3-token captions, some cut short: the fed stream, and per frame its events and
    the row's most recent stop token after it."""
    engine = stop_reversed_engine()
    engine.gen.truncated_close = gen_mode
    rec = Recorder(engine)
    row = engine.open(PROMPT, SessionSettings(max_new_tokens=3, eos_bias=2.0, truncated_close=mode))
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(6):
        events = list(engine.caption(row, rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)))
        frames.append((events, engine.scheduler.rows[row].last_stop))
    for _ in range(3):  # the last close is forced over the next ticks
        engine.step()
    return engine, rec.tokens[row], frames


@pytest.mark.parametrize("mode", ["last_stop", "cut_word"])
def test_a_cut_caption_is_closed_as_the_setting_says(mode: str) -> None:
    """last_stop: the cut word is shown but never fed, the model's most recent stop token closes the
    window (stop_ids[0] before it has emitted one); cut_word: the cut word, then stop_ids[0]."""
    engine, fed, frames = _cut_frames(mode)
    expected = engine.prompt_ids(PROMPT)
    last_stop = None
    for f, (events, stop_after) in enumerate(frames):
        expected += engine.template.post + (engine.template.caption_prefix if f == 0 else [])
        caption = [ev.token for ev in events if ev.token is not None]
        if events[-1].reason == "stop":
            last_stop = stop_after
            expected += [*caption, last_stop]
        elif mode == "cut_word":
            expected += [*caption, engine.template.stop[0]]
        else:
            assert events[-1].text  # the cut word still reached the client
            expected += [*caption[:-1], engine.template.stop[0] if last_stop is None else last_stop]
        expected += engine.template.pre
    assert fed == expected
    reasons = [events[-1].reason for events, _ in frames]
    assert reasons.count("length") >= 2 and "stop" in reasons
    assert reasons.index("stop") < len(reasons) - 1 - reasons[::-1].index("length")  # a cut after a stop
    assert last_stop == engine.tokenizer.token_id("<|frame_end|>") != engine.template.stop[0]


def test_the_session_setting_overrides_the_generation_config() -> None:
    a = _cut_frames(None, gen_mode="last_stop")[1]
    b = _cut_frames("last_stop", gen_mode="cut_word")[1]
    c = _cut_frames(None, gen_mode="cut_word")[1]
    assert a == b != c


def test_stop_bias_is_kyutais_token_bias() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [-1.0, 3.0, -0.5, 0.0]])
    out = apply_stop_bias(logits, torch.tensor([0.95, 2.0]), [0, 1])
    expected = torch.tensor([[2.0 * 0.95, -2.0 / 0.95, 1.0, 0.5], [-1.0 / 2.0, 3.0 * 2.0, -0.5, 0.0]])
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    s = Sampler(2, 4, stop_ids=[0])  # greedy: a bias below 1 gives the word its turn
    s.reset(0, SamplingParams(eos_bias=0.9))
    s.reset(1, SamplingParams())
    near = torch.tensor([[1.0, 0.95, 0.0, 0.0], [1.0, 0.95, 0.0, 0.0]])
    assert s.sample([0, 1], near) == [1, 0]


def test_emitted_counts_are_unchanged_and_fed_counts_clamp_at_use() -> None:
    s = Sampler(2, 6, stop_ids=[5])
    s.reset(0, SamplingParams(repetition_penalty=2.0, decay=0.5, clamp=1.5))
    s.reset(1, SamplingParams(repetition_penalty=2.0, decay=0.5, clamp=1.5, counts="fed"))
    for t in (2, 2, 2):
        s.observe_many([0, 1], [t, t])  # a "fed" row ignores emitted tokens
        s.charge([1], [2])
    assert s.counts[0, 2] == pytest.approx(1.5) and s.counts[1, 2] == pytest.approx(1.75)  # stored unclamped
    s.feed(0, [3, 4])  # an "emitted" row ignores fed tokens
    s.feed(1, [3, 4])
    assert s.history == [[2, 2, 2], [3, 4]]
    # token 2: 3 / 2**1.5 = 1.06 beats the 1.0 of the others in both rows; unclamped (1.75), the
    # "fed" row would give 0.89 and pick token 0
    logits = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0]] * 2)
    assert s.sample([0, 1], logits) == [2, 2]


def test_top_p_and_sampling_match_transformers_warpers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    for top_p in (0.0, 0.001, 0.3, 0.9, 0.999, 1.0):
        scores = torch.randn(1, 97, generator=g) * 3
        scores[0, 5] = scores[0, 6]  # a tie
        ref = TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1.0 else scores
        ours = top_p_filter(scores[0].clone(), top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref[0])), top_p
    assert transformers.__version__
    # the whole sampling path: temperature, top-k, top-p, then a draw from the row's generator
    temperature, top_k, top_p, seed = 0.7, 40, 0.8, 11
    s = Sampler(1, 97, stop_ids=[0])
    s.reset(0, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    draw = torch.Generator().manual_seed(seed)
    for _ in range(30):
        logits = torch.randn(1, 97, generator=g) * 2
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        warped = TopKLogitsWarper(top_k)(None, warped)
        warped = TopPLogitsWarper(top_p)(None, warped)
        expected = int(torch.multinomial(torch.softmax(warped[0], -1), 1, generator=draw))
        assert s.sample([0], logits) == [expected]
