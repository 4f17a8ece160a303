"""The observability pieces against the real server and a real Prometheus.

- Every metric name (and every label value in a matcher) used by the Grafana dashboard's PromQL and by
  the alert rules exists in the /metrics output of a live `casa serve` process.
- Debian's `prometheus` (installed by .ci/run when missing) is started here on 127.0.0.1 with a free
  port, a temporary data dir and the shipped docker/prometheus/prometheus.yml, rewritten to point at
  that `casa serve` and at the shipped rules. After a synthetic websocket session (JPEG frames, see
  docs/protocol.md), PromQL through the HTTP API returns the frame count and a frame latency quantile that agrees
  with the latencies the client saw; every dashboard query returns data; every alert rule loads.
- `promtool` (same package) checks the config and rules and runs the rules' unit tests.

Nothing is downloaded: the server serves a random-weight `test-tiny` checkpoint made in the test.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

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
    # `up{job=...}` names the scrape job of the shipped prometheus.yml
    jobs = {j["job_name"] for j in yaml.safe_load(PROM_CONFIG.read_text())["scrape_configs"]}
    for _, expr in rule_exprs():
        for metric, label, value in equality_matchers(expr):
            if metric == "up" and label == "job":
                assert value in jobs


def test_alert_runbooks_point_at_sections_of_the_operations_doc():
    doc = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in doc.splitlines()
        if line.startswith("#")
    }
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            path, _, anchor = rule["annotations"]["runbook"].partition("#")
            assert path == "docs/operations.md" and anchor in anchors, rule["alert"]


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


# ---------------------------------------------------------------------------------------------------
# A real `casa serve` and a real Prometheus
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns a truthy value; fail with the process log if it never does."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-4000:] if log else ""
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{tail}")
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(0.25)
    tail = log.read_text()[-4000:] if log else ""
    pytest.fail(f"{what}: not after {timeout:.0f} s (last error: {last_error!r})\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class CasaServer:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def scrape(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


@pytest.fixture(scope="module")
def casa_server(model_dir, tmp_path_factory) -> Iterator[CasaServer]:
    """`casa serve` as a user runs it (python -m casa_live.cli serve), on a random-weight test-tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("casa-serve")
    port = _free_port()
    log = tmp / "serve.log"
    env = {**os.environ, "CASA_MODEL_DIR": str(model_dir), "CASA_MAX_SESSIONS": "4", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "casa_live.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = CasaServer(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        _wait("casa serve /readyz", lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200,
              timeout=300, proc=proc, log=log)  # fmt: skip
        yield server
    finally:
        _stop(proc)


@dataclass
class LocalPrometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def scrapes(self, job: str) -> int:
        """How many samples of `up` Prometheus holds for the job: one per completed scrape."""
        result = self.query(f'count_over_time(up{{job="{job}"}}[10m])')
        return int(float(result[0]["value"][1])) if result else 0


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip(
            "Prometheus is not installed and could not be: run `apt-get install -y prometheus` (Debian; "
            ".ci/run does it when it is missing)"
        )
    return found


@pytest.fixture(scope="module")
def prometheus(casa_server, tmp_path_factory) -> Iterator[LocalPrometheus]:
    """Debian's Prometheus on 127.0.0.1, a free port and a temporary data dir, running the shipped
    docker/prometheus/prometheus.yml with the target and the rules path rewritten for this host and the
    intervals shortened to 1 s. The package's own service (if the postinst started one) is not used."""
    binary = _prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES.parent / Path(glob).name) for glob in config["rule_files"]]
    for job in config["scrape_configs"]:
        if job["job_name"] == "casa-live":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{casa_server.port}"]}]
        else:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = LocalPrometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait("prometheus /-/ready", lambda: httpx.get(f"{prom.url}/-/ready", timeout=5).status_code == 200,
              timeout=60, proc=proc, log=log)  # fmt: skip
        _wait(
            "a first scrape of casa serve",
            lambda: prom.scrapes("casa-live") >= 2,
            timeout=60,
            proc=proc,
            log=log,
        )
        yield prom
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------------
# The synthetic session
# ---------------------------------------------------------------------------------------------------

FRAMES = 6
FPS = 2.0


def _jpeg(i: int, size: int = 96) -> bytes:
    """A flat colour with a moving square: a different, valid JPEG per frame."""
    rng = np.random.default_rng(i)
    img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
    x = (i * 13) % (size - 24)
    img[20:44, x : x + 24] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dataclass
class SessionResult:
    latencies: list[float]  # seconds, from each caption.segment's latency_ms
    bad_frame_errors: int


def _session(server: CasaServer) -> SessionResult:
    """One websocket session as docs/protocol.md describes it: FRAMES JPEG frames (kind 0x01, pts 1/FPS apart, offline mode
    so that each is captioned in full), one corrupt frame (a non-fatal bad_frame error), a marker to
    wait for the captions, then session.close."""
    from websockets.sync.client import connect

    from casa_live.server.protocol import pack_image

    ws_url = server.url.replace("http://", "ws://") + "/v1/stream"
    latencies: list[float] = []
    errors = 0
    with connect(ws_url, max_size=None, compression=None, open_timeout=30) as ws:

        def until(kind: str) -> dict:
            nonlocal errors
            while True:
                event = json.loads(ws.recv(timeout=60))
                if event["type"] == "caption.segment":
                    latencies.append(event["latency_ms"] / 1000)
                elif event["type"] == "error":
                    assert event["code"] == "bad_frame" and not event["fatal"], event
                    errors += 1
                if event["type"] == kind:
                    return event

        until("session.created")
        ws.send(
            json.dumps(
                {"type": "session.update", "session": {"fps": FPS, "mode": "offline", "max_new_tokens": 4}}
            )
        )
        until("session.updated")
        for i in range(FRAMES):
            ws.send(pack_image(_jpeg(i), pts_us=int(i * 1e6 / FPS)))
        ws.send(pack_image(b"this is not a jpeg", pts_us=int(FRAMES * 1e6 / FPS)))
        ws.send(json.dumps({"type": "input.marker", "id": "done"}))
        until("marker")
        ws.send(json.dumps({"type": "session.close"}))
        until("session.closed")
    return SessionResult(latencies, errors)


def _samples(exposition: str) -> dict[str, set[frozenset]]:
    """sample name -> the label sets it is exposed with."""
    out: dict[str, set[frozenset]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return out


# ---------------------------------------------------------------------------------------------------
# Live tests
# ---------------------------------------------------------------------------------------------------


def test_every_dashboard_and_rule_metric_is_served(casa_server):
    samples = _samples(casa_server.scrape())
    exprs = [("dashboard: " + t, e) for t, e in dashboard_exprs()] + [
        ("rule: " + a, e) for a, e in rule_exprs()
    ]
    checked = set()
    for where, expr in exprs:
        for name in metric_names(expr):
            if name == "up":  # made by Prometheus for each target, not by the server
                continue
            assert name in samples, f"{where}: {name} is not in casa serve's /metrics"
            checked.add(name)
        for metric, label, value in equality_matchers(expr):
            if metric == "up":
                continue
            values = {dict(labels).get(label) for labels in samples[metric]}
            assert value in values, (
                f"{where}: {metric} has no {label}={value!r} series (it has {sorted(map(str, values))})"
            )
    assert len(checked) >= 15, sorted(checked)


@pytest.fixture(scope="module")
def session_through_prometheus(casa_server, prometheus):
    """Run the synthetic session while Prometheus scrapes, then wait for a scrape that saw all of it."""
    before = prometheus.scrapes("casa-live")
    result = _session(casa_server)
    assert len(result.latencies) == FRAMES, "every frame of an offline session gets a caption.segment"
    assert result.bad_frame_errors == 1
    _wait(
        "Prometheus to scrape the finished session",
        lambda: (
            prometheus.query('casa_frames_captioned_total{job="casa-live"}')
            and prometheus.value('casa_frames_captioned_total{job="casa-live"}') >= FRAMES
        ),
        timeout=60,
        proc=prometheus.proc,
        log=prometheus.log,
    )
    assert prometheus.scrapes("casa-live") > before
    return result


def test_prometheus_scrapes_casa_serve(prometheus):
    targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    (casa,) = [t for t in targets if t["labels"]["job"] == "casa-live"]
    assert casa["health"] == "up", casa
    assert prometheus.value('casa_build_info{job="casa-live"}') == 1


def test_frame_count_and_latency_quantile_through_promql(casa_server, prometheus, session_through_prometheus):
    result = session_through_prometheus
    job = '{job="casa-live"}'
    # The corrupt frame is counted as received when it arrives (server/session.py) and then answered
    # with bad_frame; a server that counted only decoded frames would be right too.
    assert prometheus.value(f"casa_frames_received_total{job}") in (FRAMES, FRAMES + 1)
    assert prometheus.value(f"casa_frames_captioned_total{job}") == FRAMES
    assert prometheus.value(f"casa_frame_latency_seconds_count{job}") == FRAMES
    assert prometheus.value('casa_errors_total{job="casa-live",code="bad_frame"}') == 1
    assert prometheus.value(f"sum(casa_frames_dropped_total{job})") == 0
    assert prometheus.value('casa_sessions_total{job="casa-live",outcome="closed"}') == 1
    assert prometheus.value(f"casa_sessions_active{job}") == 0
    assert prometheus.value(f"casa_kv_cache_tokens{job}") == 0  # the closed session's cache is freed

    # The dashboard's p50 over the session, and the client's own view of the same frames: linear
    # interpolation inside the bucket that holds the median puts both in that bucket.
    p50 = prometheus.value(
        f"histogram_quantile(0.5, sum by (le) (increase(casa_frame_latency_seconds_bucket{job}[10m])))"
    )
    assert math.isfinite(p50) and p50 > 0
    edges = sorted(
        float(dict(labels)["le"])
        for labels in _samples(casa_server.scrape())["casa_frame_latency_seconds_bucket"]
    )
    edges = [0.0, *edges]
    observed = sorted(result.latencies)
    rank_item = observed[
        math.ceil(len(observed) / 2) - 1
    ]  # the observation histogram_quantile's rank lands on
    bucket = next(i for i in range(1, len(edges)) if rank_item <= edges[i])
    # one bucket of slack either side: the server times the frame a moment before it builds the event
    low, high = edges[max(bucket - 2, 0)], edges[min(bucket + 1, len(edges) - 1)]
    assert low <= p50 <= high, (p50, observed, edges)
    # the histogram's sum is the latencies the server observed; the client saw the same numbers
    total = prometheus.value(f"casa_frame_latency_seconds_sum{job}")
    assert total == pytest.approx(sum(observed), rel=0.1, abs=0.05)


def test_every_dashboard_query_returns_data(prometheus, session_through_prometheus):
    for title, expr in dashboard_exprs():
        result = prometheus.query(expr)
        assert result, f"dashboard panel {title!r}: no series for {expr}"
    # the quantile panels have numbers now, not NaN: the session fed every histogram they read
    for title, expr in dashboard_exprs():
        if title.startswith(("Frame latency", "Time to first token", "Decode step time", "Batch size")):
            expr_10m = expr.replace(f"[{GRAFANA_VARS['$__rate_interval']}]", "[10m]")
            values = [float(r["value"][1]) for r in prometheus.query(expr_10m)]
            assert values and all(math.isfinite(v) for v in values), f"{title}: {expr_10m} -> {values}"


def test_every_alert_rule_loads_and_evaluates(prometheus):
    def loaded():
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules.values()) else None

    rules = _wait("the rules to be evaluated", loaded, timeout=60, proc=prometheus.proc, log=prometheus.log)
    assert set(rules) == {name for name, _ in rule_exprs()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_dashboard_sketch_renders_from_prometheus(prometheus, session_through_prometheus):
    sys.path.insert(0, str(DOCKER))
    try:
        import dashboard_sketch
    finally:
        sys.path.remove(str(DOCKER))
    svg = dashboard_sketch.draw(prometheus.url, minutes=2, rate_interval="30s", end=None)
    assert svg.startswith("<svg") and "SKETCH, not a Grafana screenshot" in svg
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"]]
    for panel in panels:
        assert dashboard_sketch.escape(panel["title"]) in svg


def test_casa_serve_refuses_per_message_deflate(casa_server):
    # The image's CMD is plain `casa serve`, which must turn deflate off itself: compressing every
    # caption delta costs latency, and JPEG / video payloads do not compress.
    from websockets.sync.client import connect

    ws_url = casa_server.url.replace("http://", "ws://") + "/v1/stream"
    with connect(ws_url, compression="deflate", open_timeout=30) as ws:
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")  # offered
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None  # and declined
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
