"""benchmarks/ask.py: the accuracy table per question kind and the latency table, from rows built
here, and one smoke run of both scenarios against a real `casa serve` on a random-weight toy
checkpoint (its answers are nonsense: what is checked is the shape and the bookkeeping)."""

from __future__ import annotations

import json
from argparse import Namespace

import numpy as np

from benchmarks.ask import (
    Asked,
    accuracy_table,
    answers_questions,
    latency_table,
    main,
    scenario_row,
    world_clip,
)
from casa_live.model.checkpoint.toy import toy_checkpoint
from casa_live.model.world import questions as qa

LEVEL = {"cut_pct": 0.0, "exact": 0.9, "reference": 0.91, "max_lag_ms": 120.0, "dropped": 0, "errors": []}


class Asker:  # an AskerResult's fields that scenario_row reads
    def __init__(self, asked: list[Asked], skipped: int = 0) -> None:
        self.asked, self.skipped = asked, skipped


def answer(kind: str, text: str, truth: str, status: str = "completed", frame: int | None = 3) -> Asked:
    return Asked("q", kind, "?", sent=10.0, first=10.1, done=10.3, frame=frame, text=text, status=status,
                 ttft_ms=90.0, latency_ms=280.0, truth=truth)  # fmt: skip


def test_the_world_clip_knows_each_frames_objects() -> None:
    wc = world_clip(6, seed=101)
    assert len(wc.clip.jpegs) == len(wc.objects) == 6
    q = qa.sample(wc.objects[4], np.random.default_rng(0), "count")
    assert qa.answer(q.text, wc.objects[4]) == q


def test_tables_count_answers_per_kind_and_leave_unanswered_ones_out() -> None:
    asked = [
        answer("count", "two", "two"),
        answer("count", "one", "two"),
        answer("where", "top left", "top left", status="incomplete"),
        answer("size", "", None, status="cancelled", frame=None),
        Asked("q9", "empty", "?", sent=11.0),  # never answered
    ]
    row = scenario_row("(a) one stream", 1, 2.0, [Asker(asked, skipped=1)], LEVEL)
    assert (row["asked"], row["answered"], row["cancelled"], row["no_response"], row["skipped"]) == (
        5,
        3,
        1,
        1,
        1,
    )
    assert row["accuracy"] == 2 / 3 and round(row["ttft_p50_ms"]) == 100 and round(row["done_p95_ms"]) == 300
    table = accuracy_table([row, row]).splitlines()
    assert len(table) == 2 + len(qa.KINDS) + 1
    assert table[2] == "| count | 2 | 0.500 | 2 | 0.500 | 4 | 0.500 |"
    assert "| where | 1 | 1.000 |" in table[2 + qa.KINDS.index("where")]
    assert "| size | 0 | - |" in table[2 + qa.KINDS.index("size")]
    assert table[-1] == "| all | 3 | 0.667 | 3 | 0.667 | 6 | 0.667 |"
    lat = latency_table([row], Namespace(duration=20, fps=2.0)).splitlines()
    assert lat[2].startswith(
        "| (a) one stream | 1 | 1 (2) | 5 | 3 | 1 cancelled, 1 no response, 1 skipped | 100 / 100"
    )
    assert "| 0.0% | 0.900 (0.910) |" in lat[2]


def test_a_model_without_a_question_template_is_refused_before_any_server_starts(tmp_path, capsys) -> None:
    assert answers_questions(None) is True  # the bundled model
    toy = toy_checkpoint(tmp_path / "toy")
    assert answers_questions(str(toy)) is True
    assert answers_questions(str(tmp_path / "nowhere")) is None
    gen = json.loads((toy / "generation_config.json").read_text())
    gen["template"]["question"] = None  # a caption-only checkpoint
    (toy / "generation_config.json").write_text(json.dumps(gen))
    assert answers_questions(str(toy)) is False
    assert main(["--model-dir", str(toy), "--duration", "1"]) == 2
    assert "answers no questions" in capsys.readouterr().err


def test_smoke_run_of_both_scenarios(tmp_path, capsys) -> None:
    path = toy_checkpoint(tmp_path / "toy")
    out = tmp_path / "ask.json"
    argv = ["--model-dir", str(path), "--duration", "2.5", "--clients", "3", "--askers", "2", "--ask-every", "1",
            "--single-every", "1", "--clips", "2", "--no-reference", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["scenario"] for r in rows] == ["(a) one stream", "(b) under load"]
    assert [(r["streams"], r["askers"]) for r in rows] == [(1, 1), (3, 2)]
    for r in rows:
        assert r["asked"] >= r["askers"] and r["answered"] == r["asked"] and not r["errors"]
        for a in r["answers"]:  # the truth of the frame each answer saw
            assert a["truth"] is not None and a["frame"] is not None
    assert "| question kind | (a) one stream (1 streams, 1 asking): answered | accuracy |" in printed
    assert "| all | " in printed and "| (b) under load | 3 | 2 (1) |" in printed
