"""benchmarks/watch.py: its event matching, and a smoke run on the toy checkpoint (the figures
themselves are the bundled model's, in benchmarks/RESULTS.md)."""

from __future__ import annotations

from benchmarks import watch


def test_edges_alerts_and_matching():
    assert watch.edges([False, True, True, False, True]) == ([1, 4], [3])
    assert watch.edges([True, False]) == ([0], [1])
    # the server's debounce at threshold 0.5, min_frames = clear_frames = 1
    assert watch.alerts([0.1, 0.9, 0.8, 0.2, 0.7]) == ([1, 4], [3])
    # debounced: a start needs two frames in a row at or above the threshold
    assert watch.alerts([0.1, 0.9, 0.8, 0.2, 0.7], 0.5, 2, 1) == ([2], [3])
    # one frame apart is a hit, two is not; each true event matches once
    assert watch.matched([2, 9], [1, 7]) == 1
    assert watch.matched([1, 2], [1]) == 1


def test_a_smoke_run_prints_the_table(model_dir, capsys):
    assert (
        watch.main(["--model-dir", str(model_dir), "--clips", "2", "--frames", "3", "--sessions", "2"]) == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [*watch.KINDS, "all but never"]
    assert "| empty | 2 |" in out  # every clip has its empty watch
