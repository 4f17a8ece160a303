"""A scaled-out casa-live on one machine: N `casa serve` replicas behind HAProxy, all on loopback.

HAProxy plays the part of a Kubernetes ingress (docs/scaling.md): `leastconn` balancing (a websocket
session is one long connection, so the replica with the fewest is the least loaded), HTTP health
checks on `/readyz` every `check_ms`, one failed check takes a replica out (full, draining or gone)
and one passing check brings it back, `option redispatch` with retries so a connection refused by a
stopped replica goes to another, and `timeout tunnel` long enough for live websockets.

Used by tests/test_scaleout.py and benchmarks/scaleout.py. Everything this starts, `stop()` stops.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

HAPROXY_CFG = """\
global
    maxconn 1024

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
    timeout http-request 10s
    option redispatch
    retries 3

frontend casa
    bind 127.0.0.1:{port}
    default_backend casa

backend casa
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server check inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 1 rise 1
{servers}

frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    """One unlabelled sample from a Prometheus exposition."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} not in /metrics")


class Replica:
    """One `casa serve` process (the bundled model unless `model_dir`)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        max_sessions: int,
        drain_seconds: float,
        model_dir: str | None,
        port: int | None = None,
    ) -> None:
        self.name, self.port = name, port or free_port()
        self.args = (workdir, max_sessions, drain_seconds, model_dir)
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"
        self.log_path = workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "casa_live.cli.main", "serve", "--port", str(self.port), "--max-sessions",
               str(max_sessions), "--drain-seconds", str(drain_seconds), "--threads", "1"]  # fmt: skip
        if model_dir:
            cmd += ["--model-dir", model_dir]
        with open(self.log_path, "a") as log:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} not ready after {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.3)

    def metrics(self) -> str:
        response = httpx.get(self.url + "/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    def sessions(self) -> int:
        return int(metric(self.metrics(), "casa_sessions_active"))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        replicas: int = 3,
        max_sessions: int = 2,
        drain_seconds: float = 20.0,
        check_ms: int = 200,
        model_dir: str | None = None,
    ) -> None:
        if shutil.which("haproxy") is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
        self.workdir, self.n, self.max_sessions = workdir, replicas, max_sessions
        self.drain_seconds, self.check_ms, self.model_dir = drain_seconds, check_ms, model_dir
        self.replicas: list[Replica] = []
        self.haproxy: subprocess.Popen | None = None
        self.port = self.stats_port = 0

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def start(self, timeout: float = 300.0) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.replicas = [
                Replica(f"r{i}", self.workdir, self.max_sessions, self.drain_seconds, self.model_dir)
                for i in range(self.n)
            ]
            with ThreadPoolExecutor(self.n) as pool:
                list(pool.map(lambda r: r.wait_ready(timeout), self.replicas))
            self.port, self.stats_port = free_port(), free_port()
            servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port}" for r in self.replicas)
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(
                HAPROXY_CFG.format(
                    port=self.port, stats_port=self.stats_port, check_ms=self.check_ms, servers=servers
                )
            )
            check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy refused its config:\n{check.stdout}{check.stderr}")
            with open(self.workdir / "haproxy.log", "w") as log:
                self.haproxy = subprocess.Popen(
                    ["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
                )
            self.wait_status(dict.fromkeys(self.names(), "UP"), timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def names(self) -> list[str]:
        return [r.name for r in self.replicas]

    def status(self) -> dict[str, str]:
        """HAProxy's view of each replica: UP, DOWN, ... (its stats CSV)."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row["status"].split(" ")[0] for row in rows if row["pxname"] == "casa"
                and row["svname"] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def wait_status(self, wanted: dict[str, str], timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.status()
            except httpx.HTTPError:
                status = {}
            if all(status.get(name) == state for name, state in wanted.items()):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy status {status}, waited for {wanted}")
            time.sleep(0.05)

    def wait_sessions(self, wanted: list[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := [r.sessions() for r in self.replicas]) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"sessions per replica {got}, waited for {wanted}")
            time.sleep(0.05)

    def replace(self, old: Replica, timeout: float = 300.0) -> Replica:
        """A rolling restart of one replica: wait for `old` to exit (SIGTERM it first), start a new one
        on the same port (HAProxy's health checks bring it back into rotation) and wait until it is UP."""
        old.proc.wait(timeout)
        new = Replica(old.name, *old.args, port=old.port)
        self.replicas[self.replicas.index(old)] = new
        new.wait_ready(timeout)
        self.wait_status({new.name: "UP"}, timeout=60)
        return new

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
        for r in self.replicas:
            r.stop()
