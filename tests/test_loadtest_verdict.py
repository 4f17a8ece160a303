"""benchmarks/loadtest.py's capacity verdict: the bar of docs/engine.md, applied per level."""

from __future__ import annotations

from benchmarks.loadtest import capacity_line, meets, overload_line


def level(N: int, lag: float = 100.0, cut: float = 0.0, exact: float = 0.9, dropped: int = 0) -> dict:
    return dict(N=N, cut_pct=cut, dropped=dropped, errors=[], max_lag_ms=lag, exact=exact, reference=0.91)


def test_each_condition_of_the_bar_fails_a_level() -> None:
    assert meets(level(8))
    assert not meets(level(8, lag=500.0))
    assert not meets(level(8, cut=1.1))
    assert not meets(level(8, dropped=1))
    assert not meets(level(8, exact=0.88))
    assert not meets({**level(8), "errors": ["internal"]})


def test_capacity_names_the_first_failing_level_above_it() -> None:
    line = capacity_line([level(1), level(32), level(40, lag=592.0), level(48, cut=4.0)])
    assert line.startswith("capacity at full quality: 32 streams")
    assert "N = 40 failed (max lag 592 ms)" in line and "N = 48" not in line


def test_a_failing_level_below_the_largest_passing_one_is_not_hidden() -> None:
    line = capacity_line([level(1), level(32, lag=514.0), level(40, lag=492.0)])
    assert line.startswith("capacity at full quality: 40 streams")
    assert "below it N = 32 failed (max lag 514 ms)" in line and "every level" not in line
    assert capacity_line([level(1), level(32)]).endswith("every level run met it (largest run: 32)")
    assert "below 16 streams" in capacity_line([level(16, cut=3.0)])


def test_past_capacity_the_overload_bar_is_applied_to_each_level_above_it() -> None:
    def over(N: int, goodput: float, **kw) -> dict:
        return {**level(N, dropped=40), "goodput": goodput, "share": 0.5, "share_spread": 0.1, **kw}

    rows = [
        {**level(32), "goodput": 60.0, "share": 1.0, "share_spread": 0.0},
        {**level(40), "goodput": 70.0, "share": 1.0, "share_spread": 0.0},
        over(80, 66.0, max_lag_ms=900.0),  # 94% of the peak, lag under 1 s: graceful
        over(100, 50.0, share_spread=0.4, cut_pct=2.0),
    ]
    line = overload_line(rows)
    assert line.startswith("past capacity (peak goodput 70.0/s)")
    assert "N = 80: meets it, goodput 94% of peak, 50% of frames captioned" in line
    assert "N = 100: fails (2.0% cut, goodput 71% of peak, share spread 40%)" in line
    assert overload_line(rows[:2]) == "past capacity: no level above capacity ran"
