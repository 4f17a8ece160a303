"""benchmarks/profile_engine.py: a smoke run on the toy checkpoint prints every stage, and the
stages add up to the total (the figures themselves are in benchmarks/RESULTS.md)."""

from __future__ import annotations

from benchmarks import profile_engine


def test_a_smoke_run_prints_every_stage(model_dir, capsys):
    args = ["--model-dir", str(model_dir), "--sessions", "2", "--rounds", "2", "--side", "96"]
    assert profile_engine.main(args) == 0
    out = capsys.readouterr().out
    assert "captioned 4 frames" in out
    rows = {
        line.split("|")[1].strip(): float(line.split("|")[2].strip(" *"))
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| stage")
    }
    stages = ["JPEG decode", "vision", "prefill", "decode", "score", "rest of the tick"]
    assert list(rows)[:-1] == stages
    assert abs(sum(rows[s] for s in stages) - rows["**all**"]) < 0.05
