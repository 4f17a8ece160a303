"""The scheduler on its own: row lifecycles driven through open, submit, encoded, plan and
update_from_output, with no model. Each test states what the runner would be asked to feed and
what the session would see, tick by tick."""

from __future__ import annotations

import pytest
import torch

from casa_live.model.config import GenerationConfig
from casa_live.model.engine.scheduler import (
    SCORE_WAIT_S,
    CapacityError,
    FrameEncoding,
    InsertedFrame,
    Plan,
    Scheduler,
    Template,
)
from casa_live.model.engine.settings import SessionSettings

PROMPT = [10, 11, 12, 1]  # ends with the pre-image token, as Engine.prompt_ids does
PRE, POST, PREFIX, STOP, OTHER_STOP = [1], [2], [3, 4], 9, 8


class Detok:
    def __init__(self) -> None:
        self.resets = 0

    def push(self, token: int) -> str:
        return f"w{token} "

    def reset(self) -> None:
        self.resets += 1


def scheduler(rows: int = 2, insertion: bool = False, prefix_cache: int = 0, **gen) -> Scheduler:
    """Without a prefix cache unless asked: every open feeds its prompt (what most tests follow)."""
    template = Template(PRE, POST, PREFIX, [STOP, OTHER_STOP], insertion=insertion)
    config = GenerationConfig(**{"max_new_tokens": 5, "truncated_close": "cut_word", **gen})
    return Scheduler(rows, template, window_tokens=64, gen=config, prefill_min=8, prefix_cache=prefix_cache)


def encoding(n: int = 4) -> FrameEncoding:
    return FrameEncoding(torch.zeros(n, 8), None, (2, n // 2), seconds=0.01)


def open_and_prefill(s: Scheduler, settings: SessionSettings | None = None) -> int:
    row = s.open(PROMPT, settings or SessionSettings(), Detok())
    plan = s.plan()
    assert plan.prefill == {row: PROMPT} and not plan.decode and not plan.sample
    return row


def feed_forced(s: Scheduler, row: int, expected: list[int]) -> Plan:
    """Tick through a forced run one decode token at a time; returns the plan of its last token."""
    plan = Plan()
    for tok in expected:
        plan = s.plan()
        assert plan.decode == {row: tok}, (plan, tok)
    return plan


def start_first_frame(s: Scheduler, row: int, deadline: float | None = None) -> None:
    """Frame 0 submitted, encoded and started, its post_image and caption prefix fed: the next
    update_from_output gives the caption's first token."""
    s.submit(row, 1, deadline)
    s.encoded(row, 1, encoding())
    s.plan()
    assert feed_forced(s, row, PREFIX).sample == [row]


def test_a_lone_prompt_is_prefilled_at_once_and_then_the_row_waits():
    s = scheduler()
    row = open_and_prefill(s)
    assert not s.has_work() and not s.row(row).busy
    assert s.plan().empty()


def test_a_frame_waits_for_its_encoding_then_starts_with_post_and_caption_prefix():
    s = scheduler()
    row = open_and_prefill(s)
    assert s.submit(row, ticket=1, deadline=None) == 0
    assert s.row(row).busy and not s.has_work() and s.to_encode() == []  # the pipeline encodes it
    assert s.encoded(row, 1, encoding()) is None
    assert s.has_work(row)
    plan = s.plan()
    assert [f.row for f in plan.frames] == [row] and plan.decode == {row: POST[0]} and not plan.sample
    last = feed_forced(s, row, PREFIX)
    assert last.sample == [row]  # the caption's first token is sampled after the last forced token
    assert s.row(row).frames == 1 and s.row(row).detok.resets == 1


def test_a_caption_ends_on_a_stop_token_and_its_close_is_forced():
    s = scheduler()
    row = open_and_prefill(s)
    start_first_frame(s, row)
    events = s.update_from_output([row], [20], now=0.0)
    assert (events[0].token, events[0].text, events[0].done) == (20, "w20 ", False)
    plan = s.plan()
    assert plan.decode == {row: 20} and plan.sample == [row]  # the sampled token is fed back
    (done,) = s.update_from_output([row], [OTHER_STOP], now=0.0)
    assert done.done and done.reason == "stop" and done.token is None and done.frame == 0
    assert s.row(row).last_stop == OTHER_STOP and not s.row(row).busy
    last = feed_forced(s, row, [OTHER_STOP, *PRE])  # the emitted stop, then the next frame's pre-image
    assert not last.sample and not s.has_work()


def test_a_restarted_row_forces_its_prompt_again_and_its_next_frame_is_a_first_frame():
    """restart (the server's start over after a gap): the unfed close of the last caption goes with
    the history, the prompt is there again (copied from the prefix cache), the next frame gets the caption prefix as a
    stream's first does, and frame numbers go on. A busy row or a branch cannot restart."""
    s = scheduler(prefix_cache=4)
    row = open_and_prefill(s, SessionSettings(max_new_tokens=3))
    start_first_frame(s, row)
    (done,) = s.update_from_output([row], [STOP], now=0.0)
    assert done.done and s.row(row).forced  # the close is still to be fed
    s.restart(row, PROMPT, Detok())
    plan = s.plan()  # the prompt's K/V come from the prefix cache, saved when it was first fed
    assert plan.restore == {row: tuple(PROMPT)} and not plan.prefill and not plan.decode
    assert s.row(row).max_new_tokens == 3  # the settings are kept
    assert s.submit(row, 2, None) == 1  # the row's second frame
    s.encoded(row, 2, encoding())
    s.plan()
    assert feed_forced(s, row, PREFIX).sample == [row]  # the caption prefix of a first frame
    (event,) = s.update_from_output([row], [20], now=0.0)
    assert event.frame == 1
    with pytest.raises(ValueError, match="between frames only"):
        s.restart(row, PROMPT, Detok())


@pytest.mark.parametrize("close", ["cut_word", "last_stop"])
def test_a_caption_cut_by_max_new_tokens_is_closed_as_configured(close):
    s = scheduler()
    row = open_and_prefill(s, SessionSettings(max_new_tokens=2, truncated_close=close))
    start_first_frame(s, row)
    s.update_from_output([row], [20], now=0.0)
    s.plan()
    (cut,) = s.update_from_output([row], [21], now=0.0)
    assert cut.done and cut.reason == "length" and cut.token == 21
    # cut_word: the cut word, then the first stop id; last_stop: the model's last stop (none yet: the first)
    closing = [21, STOP] if close == "cut_word" else [STOP]
    feed_forced(s, row, [*closing, *PRE])
    assert not s.has_work()


def test_the_deadline_cuts_a_caption_and_the_next_frame_keeps_its_own():
    s = scheduler()
    row = open_and_prefill(s)
    start_first_frame(s, row, deadline=10.0)
    (ev,) = s.update_from_output([row], [20], now=9.9)
    assert not ev.done
    s.plan()
    (ev,) = s.update_from_output([row], [21], now=10.0)
    assert ev.done and ev.reason == "deadline"
    feed_forced(s, row, [21, STOP, *PRE])
    s.submit(row, 2, deadline=None)
    s.encoded(row, 2, encoding())
    plan = s.plan()
    assert plan.decode == {row: POST[0]} and plan.sample == [row]  # no caption prefix after frame 0
    assert s.row(row).frame_deadline is None


def test_a_frame_submitted_while_the_close_is_fed_starts_after_it():
    s = scheduler()
    row = open_and_prefill(s)
    start_first_frame(s, row)
    s.update_from_output([row], [STOP], now=0.0)
    s.submit(row, 2, None, patches=torch.zeros(4, 3), patch_grid=(4, 4))
    assert s.to_encode() == []  # not startable: the close is still to be fed
    plan = s.plan()
    assert plan.decode == {row: STOP} and not plan.frames
    assert s.to_encode() == []
    s.plan()  # the pre-image token
    assert s.to_encode() == [row]  # now it could start: the engine encodes it (no pipeline)
    s.encoded(row, 2, encoding())
    assert s.row(row).pending.patches is None  # the patches are dropped once encoded
    assert [f.row for f in s.plan().frames] == [row]


def test_stale_and_failed_encodings():
    s = scheduler()
    row = open_and_prefill(s)
    s.submit(row, 1, None)
    s.close(row)
    again = open_and_prefill(s)
    assert again == row
    assert s.encoded(row, 1, encoding()) is None and not s.row(row).busy  # the old session's frame: ignored
    s.submit(row, 2, None)
    ev = s.encoded(row, 2, None)  # the vision tower failed on it
    assert ev is not None and ev.done and ev.reason == "error" and ev.frame == 0
    assert not s.row(row).busy and s.row(row).frames == 1 and not s.has_work()
    s.submit(row, 3, None)
    s.encoded(row, 3, encoding())
    plan = s.plan()
    assert plan.decode == {row: POST[0]}  # frame 1: no caption prefix


def test_capacity_busy_and_close():
    s = scheduler(rows=2)
    a, b = open_and_prefill(s), s.open(PROMPT, SessionSettings(), Detok())
    with pytest.raises(CapacityError):
        s.open(PROMPT, SessionSettings(), Detok())
    assert s.free_rows() == 0
    s.submit(a, 1, None)
    with pytest.raises(ValueError, match="still captioning"):
        s.submit(a, 2, None)
    s.close(b)
    assert s.free_rows() == 1 and s.rows[b] is None
    with pytest.raises(KeyError):
        s.row(b)


def test_a_prompt_opened_while_others_work_goes_a_token_a_tick():
    s = scheduler()
    a = open_and_prefill(s)
    s.submit(a, 1, None)
    s.encoded(a, 1, encoding())
    s.plan()  # a is busy decoding its forced run
    b = s.open(PROMPT, SessionSettings(), Detok())
    plan = s.plan()
    assert plan.decode == {a: PREFIX[0], b: PROMPT[0]} and not plan.prefill


def test_insertion_feeds_the_frame_as_an_item_in_one_prefill():
    s = scheduler(insertion=True)
    row = open_and_prefill(s)
    s.submit(row, 1, None)
    enc = encoding(6)
    s.encoded(row, 1, enc)
    plan = s.plan()
    (item, *rest) = plan.prefill[row]
    assert isinstance(item, InsertedFrame) and item.tokens is enc.tokens and item.grid == (2, 3)
    assert rest == [*POST, *PREFIX] and plan.sample == [row]


def test_min_new_tokens_bans_stops_and_settings_resolve_against_the_model():
    s = scheduler(max_new_tokens=7)
    row = open_and_prefill(s, SessionSettings(min_new_tokens=2))
    r = s.row(row)
    assert (r.max_new_tokens, r.min_new_tokens, r.truncated_close) == (7, 2, "cut_word")
    start_first_frame(s, row)
    assert s.stop_banned([row]) == [True]
    s.update_from_output([row], [20], now=0.0)
    s.plan()
    s.update_from_output([row], [21], now=0.0)
    assert s.stop_banned([row]) == [False]
    s.update(row, SessionSettings(max_new_tokens=1000, truncated_close="last_stop"))
    # capped by the window: 64 - post - caption prefix - pre - 2
    assert (r.max_new_tokens, r.truncated_close) == (64 - 1 - 2 - 1 - 2, "last_stop")


def tick(s: Scheduler, out: dict[int, int]) -> Plan:
    """One tick: plan, then give every sampled row its next token (out[row], else 20)."""
    plan = s.plan()
    s.update_from_output(plan.sample, [out.get(r, 20) for r in plan.sample], now=0.0)
    return plan


def watched_rows_at_their_boundary(s: Scheduler) -> tuple[int, int, int]:
    """Rows a and b (with watches) caption frame 0 in one token and close it while row c, without
    watches, keeps captioning: returns (a, b, c) once a and b wait for their scores."""
    a, b = open_and_prefill(s), open_and_prefill(s)
    c = open_and_prefill(s, SessionSettings(max_new_tokens=50))
    s.set_watches(a, [[5, 6]])
    s.set_watches(b, [[5, 7]])
    for row in (a, b, c):
        s.submit(row, 1, None)
        s.encoded(row, 1, encoding())
    for _ in range(10):
        plan = tick(s, {a: STOP, b: STOP})
        assert not plan.score  # c still decodes, the wait has not run out: a and b wait together
        if all(s._needs_score(s.row(r)) for r in (a, b)):
            return a, b, c
    raise AssertionError("a and b never reached their frame boundary")


def test_casa_rows_are_scored_mid_caption_and_branch_from_their_frames_start():
    """A CASA row's watches may be scored any time after its frame has started (they wait to batch
    like any), and a question branch may start from then on, while the caption goes on: both
    fork where the frame started, before its caption."""
    s = scheduler(rows=4)
    s.session_rows = 3  # the last row is a branch row
    a, b = open_and_prefill(s), open_and_prefill(s)
    s.set_watches(a, [[5, 6]])
    assert not s.can_branch(a) and not s._needs_score(s.row(a))  # no frame yet
    for row in (a, b):
        s.submit(row, 1, None)
        s.encoded(row, 1, encoding())
    plan = tick(s, {})
    assert [f.row for f in plan.frames] == [a, b] and not plan.score
    assert s.row(a).decoding and s._needs_score(s.row(a)) and not s._needs_score(s.row(b))
    assert not tick(s, {}).score  # b decodes: a waits to be scored with others
    s.row(a).score_since -= SCORE_WAIT_S
    plan = tick(s, {})
    assert plan.score == {a: (0, [[5, 6]])} and s.row(a).decoding  # scored mid-caption
    assert not s._needs_score(s.row(a))  # once a frame
    assert s.can_branch(a)
    branch = s.branch(a, [7, 7], SessionSettings(), Detok(), room=10)
    assert s.row(branch).seen == 0 and s.row(branch).branch_of == a
    plan = tick(s, {})  # the question in one forward, however short, and its answer sampled after it
    assert plan.prefill == {branch: [7, 7]} and branch in plan.sample


def test_watch_scoring_waits_to_batch_rows_but_never_past_their_next_frame():
    """Token insertion: a row is scored once its caption is closed, and rows wait to be scored
    together."""
    s = scheduler(rows=3, insertion=True)
    a, b, c = watched_rows_at_their_boundary(s)
    assert s.row(c).decoding
    plan = tick(s, {})
    assert not plan.score and s.row(a).score_since is not None
    s.row(a).score_since -= SCORE_WAIT_S  # a has waited long enough: both are scored, in one forward
    plan = tick(s, {})
    assert plan.score == {a: (0, [[5, 6]]), b: (0, [[5, 7]])}
    assert not s._needs_score(s.row(a)) and s.row(a).score_since is None

    s = scheduler(rows=3, insertion=True)
    a, b, c = watched_rows_at_their_boundary(s)
    s.submit(a, 2, None)
    s.encoded(a, 2, encoding())  # a's next frame is ready: its scores cannot wait, b's go with them
    plan = tick(s, {})
    assert set(plan.score) == {a, b} and [f.row for f in plan.frames] == [a]

    s = scheduler(rows=3, insertion=True)
    a, b, c = watched_rows_at_their_boundary(s)
    while s.row(c).busy or s.row(c).forced:  # c's caption ends and closes: nothing else to do
        assert not tick(s, {c: STOP}).score
    assert set(tick(s, {}).score) == {a, b}


def test_prefix_cache_saves_a_fed_prompt_and_restores_it_for_the_next_sessions():
    """The first session on a prompt feeds it and its K/V are saved in the tick of its last token;
    later sessions (and restarts) on that prompt get them copied at their first plan, feed nothing
    and can start a frame in the same tick. Past capacity the least recently used prompt goes."""
    s = scheduler(rows=4, prefix_cache=2)
    other = [10, 13, 1]
    first = s.open(PROMPT, SessionSettings(), Detok())
    plan = s.plan()
    assert plan.prefill == {first: PROMPT} and plan.capture == {first: tuple(PROMPT)}
    second = s.open(PROMPT, SessionSettings(), Detok())
    s.submit(second, 1, None)
    s.encoded(second, 1, encoding())
    plan = s.plan()
    assert plan.restore == {second: tuple(PROMPT)} and not plan.prefill and not plan.capture
    assert [f.row for f in plan.frames] == [second] and plan.decode == {second: POST[0]}
    # two sessions opened together on a new prompt: both feed it, one saves it
    a, b = s.open(other, SessionSettings(), Detok()), s.open(other, SessionSettings(), Detok())
    while s.has_work():
        plan = s.plan()
        if plan.capture:
            assert plan.capture in ({a: tuple(other)}, {b: tuple(other)}) and not plan.forget
        for i in plan.sample:
            s.update_from_output([i], [STOP], now=0.0)
    assert list(s.prefixes) == [tuple(PROMPT), tuple(other)]
    # a third prompt pushes out the least recently used (PROMPT, last used before `other` was saved)
    s.close(a)
    third = s.open([10, 14, 1], SessionSettings(), Detok())
    plan = s.plan()
    assert plan.capture == {third: (10, 14, 1)} and plan.forget == [tuple(PROMPT)]
    s.close(b)
    again = s.open(PROMPT, SessionSettings(), Detok())
    assert s.plan().prefill == {again: PROMPT}  # fed again, no longer cached
