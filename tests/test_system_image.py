"""The image and the compose stack, built and run for real with podman (system tests).

- The CPU image is built from the repository's Dockerfile. Its base is a Debian bookworm root made
  with debootstrap when `debian:bookworm-slim` cannot be pulled (tests/oci.py). Torch comes from the
  local wheel directory of pip's configuration when there is one (TORCH_INDEX_URL / TORCH_FIND_LINKS
  build arguments), from the PyTorch CPU index otherwise; every other step is the one users run.
- The container runs the image's own CMD with a read-only root filesystem, no capabilities and no
  privilege escalation, as a production deployment would. Through the published port: /readyz, the demo
  page from the installed wheel, a clip posted to /v1/captions answered with SRT, a websocket session
  answered with captions. The image's HEALTHCHECK command passes inside the container, PID 1 runs as
  uid 10001, and SIGTERM stops the server cleanly (exit code 0).
- docker/compose.yml starts under podman-compose: the casa-live image plus Prometheus, the latter from
  a stand-in image with Debian's prometheus package (tests/prometheus.Containerfile), since prom/prometheus
  cannot be pulled where registries are unreachable. Prometheus scrapes casa-live by service name inside
  the compose network, loads every alert rule, and answers every dashboard query. Grafana has no
  Debian package and no registry here, so the compose test leaves it out.

The image size and the build times are printed; the whole module skips, with the reason, where podman
cannot run. Layers stay in podman's storage, so a second run only rebuilds what changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import oci
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGE = "localhost/casa-live:test"
PROMETHEUS_IMAGE = "localhost/casa-live-test/prometheus:debian"
TORCH_VERSION = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
SIZE_LIMIT = 1.2e9  # bytes, the CPU image as podman reports it (uncompressed)
FRAMES = 4
FPS = 2.0

# CI sets CASA_REQUIRE_PODMAN=1 where it installed podman: a podman that cannot run is then a failure,
# not a skip that would hide it.
REQUIRED = os.environ.get("CASA_REQUIRE_PODMAN") == "1"

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(oci.unavailable() is not None and not REQUIRED, reason=str(oci.unavailable())),
]


def _cannot_run(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"CASA_REQUIRE_PODMAN=1, but {reason}")
    pytest.skip(reason)


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture: the measured numbers belong in the test log."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[system] {line}")


def _pip_config() -> dict[str, str]:
    """pip's effective settings here (`pip config list`), last scope wins: cert, find-links, ..."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    found = {}
    for line in out.splitlines():
        m = re.fullmatch(r"[^.]*\.([a-z-]+)='(.*)'", line.strip())
        if m:
            found[m.group(1)] = m.group(2)
    return found


def _torch_wheel_dir(config: dict[str, str]) -> Path | None:
    for entry in config.get("find-links", "").split():
        path = Path(entry.removeprefix("file://"))
        if path.is_dir() and list(path.glob(f"torch-{TORCH_VERSION}*-linux_x86_64.whl")) + list(
            path.glob(f"torch-{TORCH_VERSION}*manylinux*.whl")
        ):
            return path
    return None


def build_args(tmp: Path) -> tuple[list[str], str]:
    """podman build flags that adapt the build to this machine, and a line saying which were used.

    Only build arguments and build-time mounts: the Dockerfile's steps are the ones users run. /mnt is
    empty in Debian's base, so mounting the wheel directory there leaves nothing behind in the image.
    """
    flags = ["--build-arg", f"BASE_IMAGE={oci.BASE_IMAGE}"]
    said = [f"base {oci.BASE_IMAGE}"]
    config = _pip_config()
    wheels = _torch_wheel_dir(config)
    if wheels is not None:
        flags += ["-v", f"{wheels}:/mnt:ro", "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",
                  "--build-arg", "TORCH_FIND_LINKS=/mnt"]  # fmt: skip
        said.append(f"torch from the local wheel directory {wheels}")
    else:
        said.append("torch from the PyTorch CPU index")
    cert = config.get("cert")
    if cert and Path(cert).is_file():
        # This machine's package index traffic is verified against its own CA bundle; pip in the build
        # needs the same one (a global pip config, mounted for the build only).
        conf = tmp / "pip"
        conf.mkdir()
        shutil.copy(cert, conf / "ca.crt")
        (conf / "pip.conf").write_text("[global]\ncert = /etc/xdg/pip/ca.crt\n")
        flags += ["-v", f"{conf}:/etc/xdg/pip:ro"]
        said.append(f"pip trusts {cert}")
    return flags, ", ".join(said)


@dataclass
class Built:
    tag: str
    seconds: float
    base_seconds: float
    size: int


@pytest.fixture(scope="module")
def image(request) -> Built:
    if oci.unavailable():
        _cannot_run(oci.unavailable())
    base_seconds = oci.ensure_base_image()
    if base_seconds:
        _say(request, f"made {oci.BASE_IMAGE} with debootstrap in {base_seconds:.0f} s")
    probe = oci.podman("run", "--rm", oci.BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        _cannot_run(f"podman cannot start a container here: {probe.stderr.strip()[-800:]}")
    with tempfile.TemporaryDirectory(prefix="casa-build-") as tmp:
        flags, said = build_args(Path(tmp))
        previous = oci.image_id(IMAGE)
        t0 = time.monotonic()
        result = subprocess.run(
            ["nice", "-n", "19", "podman", "build", "--format", "docker", "--layers", "-t", IMAGE, *flags,
             "-f", str(ROOT / "Dockerfile"), str(ROOT)],
            env=oci.env(), capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        seconds = time.monotonic() - t0
    assert result.returncode == 0, f"podman build failed:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    oci.drop_replaced(IMAGE, previous)
    cached = result.stdout.count("Using cache")
    size = int(oci.podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    _say(request, f"built {IMAGE} in {seconds:.0f} s ({cached} cached steps; {said})")
    _say(request, f"image size {size / 1e9:.2f} GB (limit {SIZE_LIMIT / 1e9:.1f} GB)")
    return Built(IMAGE, seconds, base_seconds, size)


@dataclass
class Running:
    name: str
    url: str


def _wait(what: str, check, timeout: float, logs=None):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError, KeyError, ValueError) as e:
            last = e
        time.sleep(1)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what} ({last!r})\n{logs() if logs else ''}"
    )


def _logs(name: str) -> str:
    result = oci.podman("logs", name, check=False)
    return (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def container(image, request) -> Iterator[Running]:
    name = f"casa-live-test-{os.getpid()}"
    port = oci.free_port()
    oci.podman(
        "run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-p", f"127.0.0.1:{port}:8000", image.tag,
    )  # fmt: skip
    running = Running(name, f"http://127.0.0.1:{port}")
    try:
        t0 = time.monotonic()
        _wait(
            "/readyz",
            lambda: httpx.get(f"{running.url}/readyz", timeout=5).json()["status"] == "ready",
            timeout=180,
            logs=lambda: _logs(name),
        )
        _say(request, f"container ready {time.monotonic() - t0:.1f} s after start")
        yield running
    finally:
        oci.podman("rm", "-f", "-t", "5", name, check=False)


def test_image_size_and_no_source_tree(image, container):
    assert image.size < SIZE_LIMIT, f"{image.size / 1e9:.2f} GB"
    # The package is installed from the wheel: no repository copy, the model and page in site-packages.
    probe = (
        "import pathlib, casa_live.server.demo as d, casa_live.server.settings as s; "
        "print(s.Settings().model_dir); print(d.web_dir()); "
        "print(pathlib.Path('/app').exists(), pathlib.Path('/src').exists())"
    )
    out = oci.podman("exec", container.name, "python", "-c", probe).stdout.split()
    bundled = "site-packages/casa_live/model/bundled"
    assert out[0].startswith("/opt/venv/lib/") and out[0].endswith(bundled), out
    assert out[1].endswith("site-packages/casa_live/clients/web"), out
    assert out[2:] == ["False", "False"]


def test_the_server_user_loads_the_prebuilt_cpu_kernel(container):
    """The image has no compiler: the CPU decode attention kernel built in its wheel stage loads
    for the server's user (uid 10001), from CASA_KERNEL_CACHE."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the C kernel is x86-64 AVX2 code; elsewhere the torch path runs")
    probe = (
        "from casa_live.kernels import cpu_attention as c; print(c.cpu_supported(), c.library() is not None)"
    )
    out = oci.podman("exec", container.name, "python", "-c", probe).stdout.split()
    assert out[1] == out[0], out  # loaded wherever the CPU can run it
    assert oci.podman("exec", container.name, "sh", "-c", "command -v cc gcc", check=False).stdout == ""


def test_runs_as_uid_10001(container):
    status = oci.podman("exec", container.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {"10001"}, status
    cmdline = oci.podman("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline and cmdline[cmdline.index("--host") + 1] == "0.0.0.0"


def test_readyz_and_demo_page_through_the_published_port(container):
    ready = httpx.get(f"{container.url}/readyz", timeout=10).json()
    assert (ready["status"], ready["model"]) == ("ready", "default")
    assert ready["free"] == ready["slots"] > 0  # readiness reports the free session slots
    page = httpx.get(f"{container.url}/", timeout=10)
    assert page.status_code == 200 and "app.js" in page.text  # the real page, not the placeholder
    assert httpx.get(f"{container.url}/web/app.js", timeout=10).status_code == 200
    metrics = httpx.get(f"{container.url}/metrics", timeout=10).text
    assert 'casa_build_info{model="default"' in metrics


def _world(n: int):
    from casa_live.model.world.scene import WorldConfig, generate_clip

    return generate_clip(7, WorldConfig(frames=n)).frames


def test_posted_clip_returns_srt(container):
    from casa_live.model.world.video import encode_video

    data = encode_video(list(_world(FRAMES)), fps=FPS, fmt="mp4")
    r = httpx.post(f"{container.url}/v1/captions?format=srt", content=data, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-subrip")
    cues = [c for c in r.text.strip().split("\n\n") if c]
    assert len(cues) == FRAMES, r.text
    first = cues[0].splitlines()
    assert first[:2] == ["1", "00:00:00,000 --> 00:00:00,500"] and first[2].strip(), r.text


def test_websocket_session_gets_captions(container):
    import io

    from PIL import Image
    from websockets.sync.client import connect

    from casa_live.server.protocol import pack_image

    def jpeg(frame) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    finals = []
    with connect(container.url.replace("http://", "ws://") + "/v1/stream", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"fps": FPS, "mode": "offline"}}))
        for i, frame in enumerate(_world(FRAMES)):
            ws.send(pack_image(jpeg(frame), pts_us=int(i * 1e6 / FPS)))
        ws.send(json.dumps({"type": "session.close"}))
        while True:
            event = json.loads(ws.recv(timeout=120))
            assert event["type"] != "error", event
            if event["type"] == "caption.segment":
                finals.append(event)
            if event["type"] == "session.closed":
                break
    assert [e["frame"] for e in finals] == list(range(FRAMES))
    assert all(e["text"].strip() for e in finals), finals


def test_healthcheck_passes_inside_the_container(container):
    inspected = json.loads(oci.podman("image", "inspect", IMAGE).stdout)[0]
    # podman keeps a docker-format image's health check beside Config, docker inside it
    health = inspected.get("Healthcheck") or inspected["Config"]["Healthcheck"]
    test = health["Test"]
    assert test[0] == "CMD" and "/healthz" in " ".join(test)
    # The image's own probe, run the way the engine runs it, and podman's health state after it.
    assert oci.podman("exec", container.name, *test[1:], check=False).returncode == 0
    assert oci.podman("healthcheck", "run", container.name, check=False).returncode == 0
    state = json.loads(oci.podman("inspect", container.name).stdout)[0]["State"]
    health = state.get("Health") or state.get("Healthcheck")
    assert health["Status"] == "healthy", health


def test_sigterm_stops_the_server_cleanly(container):
    # Last of the single-container tests: it stops the container they share.
    t0 = time.monotonic()
    oci.podman("stop", "-t", "30", container.name, timeout=60)
    took = time.monotonic() - t0
    state = json.loads(oci.podman("inspect", container.name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, _logs(container.name)
    assert took < 25, f"stop took {took:.0f} s: SIGTERM did not end the server, the engine killed it"
    assert "Application shutdown complete" in _logs(container.name)


# ---------------------------------------------------------------------------------------------------
# compose: casa-live + Prometheus
# ---------------------------------------------------------------------------------------------------


def _podman_compose() -> list[str]:
    found = shutil.which("podman-compose") or shutil.which(
        "podman-compose", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("podman-compose not found: pip install podman-compose (it is in the test extra)")
    return [found]


@pytest.fixture(scope="module")
def prometheus_image(request) -> str:
    previous = oci.image_id(PROMETHEUS_IMAGE)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="casa-prom-") as tmp:
        result = subprocess.run(
            ["nice", "-n", "19", "podman", "build", "--format", "docker", "--layers", "-t", PROMETHEUS_IMAGE,
             "--build-arg", f"BASE_IMAGE={oci.BASE_IMAGE}", "-f", str(ROOT / "tests" / "prometheus.Containerfile"),
             tmp],
            env=oci.env(), capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
    assert result.returncode == 0, (
        f"prometheus stand-in build failed:\n{result.stdout[-4000:]}{result.stderr}"
    )
    oci.drop_replaced(PROMETHEUS_IMAGE, previous)
    _say(request, f"built {PROMETHEUS_IMAGE} (Debian's prometheus) in {time.monotonic() - t0:.0f} s")
    return PROMETHEUS_IMAGE


@dataclass
class Stack:
    casa: str
    prometheus: str


@pytest.fixture(scope="module")
def stack(image, prometheus_image, request, tmp_path_factory) -> Iterator[Stack]:
    compose = _podman_compose()
    override = tmp_path_factory.mktemp("compose") / "compose.standin.yml"
    # Only the image of Prometheus changes; everything else is docker/compose.yml as shipped.
    override.write_text(yaml.safe_dump({"services": {"prometheus": {"image": prometheus_image}}}))
    project = f"casa-live-test-{os.getpid()}"
    casa_port, prom_port = oci.free_port(), oci.free_port()
    env = oci.env() | {
        "CASA_IMAGE_TAG": image.tag.rsplit(":", 1)[1],
        "CASA_PORT": str(casa_port),
        "PROMETHEUS_PORT": str(prom_port),
    }
    base = [*compose, "-p", project, "-f", str(DOCKER / "compose.yml"), "-f", str(override)]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=timeout)

    up = run("up", "-d", "--no-build", "casa-live", "prometheus")
    stack = Stack(f"http://127.0.0.1:{casa_port}", f"http://127.0.0.1:{prom_port}")
    try:
        assert up.returncode == 0, f"podman-compose up failed:\n{up.stdout[-4000:]}{up.stderr[-4000:]}"
        logs = lambda: (lambda r: r.stdout[-4000:] + r.stderr[-2000:])(run("logs", timeout=60))  # noqa: E731
        _wait(
            "casa-live /readyz (compose)",
            lambda: httpx.get(f"{stack.casa}/readyz", timeout=5).json()["status"] == "ready",
            180,
            logs,
        )
        _wait("prometheus /-/ready (compose)",
              lambda: httpx.get(f"{stack.prometheus}/-/ready", timeout=5).status_code == 200, 120, logs)  # fmt: skip
        yield stack
    finally:
        down = run("down", "-v", "-t", "5", timeout=300)
        if down.returncode != 0:
            _say(request, f"podman-compose down failed: {down.stderr[-1000:]}")


def _targets(stack: Stack) -> list[dict]:
    return httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]


def test_compose_prometheus_scrapes_casa_live_by_service_name(stack):
    def up():
        targets = [t for t in _targets(stack) if t["labels"]["job"] == "casa-live"]
        return targets if targets and targets[0]["health"] == "up" else None

    (target,) = _wait("the casa-live target to be up", up, timeout=90)
    assert target["scrapeUrl"] == "http://casa-live:8000/metrics"  # inside the compose network
    q = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": "casa_build_info"}, timeout=10).json()
    assert [r["metric"]["model"] for r in q["data"]["result"]] == ["default"]


def test_compose_prometheus_loads_every_alert_rule(stack):
    rules_file = yaml.safe_load((DOCKER / "prometheus" / "rules" / "casa-live.yml").read_text())
    expected = {r.get("alert") or r["record"] for g in rules_file["groups"] for r in g["rules"]}

    def evaluated():
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules.values()) else None

    rules = _wait("the rules to be evaluated", evaluated, timeout=90)
    assert set(rules) == expected
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_compose_prometheus_answers_every_dashboard_query(stack):
    # The Grafana dashboard's PromQL, as Grafana would send it, evaluated by the compose Prometheus.
    from test_ops_metrics import dashboard_exprs

    for title, expr in dashboard_exprs():
        r = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", f"{title}: {expr}: {r}"
