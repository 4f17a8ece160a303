"""The wheel works on its own: built from the tracked files, installed (not editable) into a fresh venv,
and `casa serve` run from outside the repository finds the bundled model and the demo page in the
installed package and captions a clip.

Fast and offline: the wheel is built with this venv's setuptools (no build isolation), installed with
`--no-deps`, and the fresh venv reaches torch and the other dependencies through a .pth line naming
this venv's site-packages. The editable install there is not active in the fresh venv (.pth files of a
directory added that way are not run), so every casa-live module comes from the wheel.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# (read without tomllib, which Python 3.10 lacks)
_SETUPTOOLS = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]", 1)[1]
PACKAGES = re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", _SETUPTOOLS, re.M | re.S).group(1))
PACKAGE_DIR = dict(
    re.findall(r'^"([\w.]+)" = "([^"]+)"$', _SETUPTOOLS.split("[tool.setuptools.package-dir]")[1], re.M)
)
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
WEB_FILES = {"index.html", "app.js", "watches.js", "style.css"}


def _tracked(root: Path) -> list[str]:
    result = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True)
    if result.returncode == 0 and result.stdout:
        return [p for p in result.stdout.split("\0") if p and (root / p).is_file()]
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(root).parts) and not p.name.endswith(".egg-info")
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    try:
        setuptools = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed in this venv (pip install 'setuptools>=77')")
    if int(setuptools.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools} is older than the build-system's setuptools>=77")
    # A clean copy of the tracked files: a build/ folder left in the checkout cannot leak into the wheel.
    src = tmp_path_factory.mktemp("src")
    for rel in _tracked(ROOT):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (built,) = dist.glob("casa_live-*.whl")
    return built


# The repository's folders that become subpackages of `casa_live` (pyproject.toml's package-dir).
FOLDERS = {"cli", "clients", "kernels", "model", "server"}


def _repo_packages() -> set[str]:
    """Every package the project ships, by its installed name: each folder with an __init__.py under
    the mapped folders, as casa_live.<folder path>."""
    return {
        "casa_live." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in FOLDERS
        for init in (ROOT / top).rglob("__init__.py")
    }


def test_package_list_names_every_package():
    listed = set(PACKAGES)
    assert _repo_packages() <= listed, f"add to [tool.setuptools] packages: {_repo_packages() - listed}"
    expected = {f"casa_live.{top}": top for top in FOLDERS}
    expected["casa_live.model.bundled"] = "checkpoints/default"
    assert expected == PACKAGE_DIR
    assert "casa_live.model.bundled" in listed and "casa_live.clients.web" in listed


def test_wheel_carries_the_model_and_the_demo_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"casa_live/model/bundled/{f}" for f in MODEL_FILES} <= names
    assert {f"casa_live/clients/web/{f}" for f in WEB_FILES} <= names
    assert "casa_live/kernels/cpu_attention.c" in names  # an installed server builds its CPU kernel
    for package in _repo_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    # one import package at the top of site-packages: no tests, benchmarks, docs, nor a generic
    # `model` or `server` that another distribution (or a user's model.py) would shadow
    tops = {n.split("/")[0] for n in names if not n.startswith("casa_live-")}
    assert tops == {"casa_live"}, tops
    assert "casa_live/__init__.py" not in names  # a namespace: no folder of its own in the repository
    size = {i.filename: i.file_size for i in zipfile.ZipFile(wheel).infolist()}
    assert (
        size["casa_live/model/bundled/model.safetensors"]
        == (ROOT / "checkpoints/default/model.safetensors").stat().st_size
    )


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "casa-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "--no-deps",
         "--no-index", "--ignore-installed", "--no-warn-script-location", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return path


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CASA_", "PYTHON", "VIRTUAL_ENV"))}


def test_installed_package_is_the_wheel(venv, tmp_path):
    probe = (
        "import casa_live.model as m, casa_live.server.demo as d, casa_live.server.settings as s; "
        "print(m.__file__); print(s.Settings().model_dir); print(d.web_dir())"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=_clean_env(), capture_output=True,
        text=True, check=True, timeout=120,
    ).stdout.split()  # fmt: skip
    site = str(venv / "lib")
    assert all(line.startswith(site) for line in out), out
    assert out[1].endswith("site-packages/casa_live/model/bundled")
    assert {p.name for p in Path(out[1]).iterdir()} >= MODEL_FILES
    assert {p.name for p in Path(out[2]).iterdir()} >= WEB_FILES


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_casa_serve_from_the_wheel_captions_a_clip(venv, tmp_path):
    from casa_live.model.world.scene import WorldConfig, generate_clip
    from casa_live.model.world.video import encode_video

    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "casa"), "serve", "--port", str(port)],
            cwd=tmp_path, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=5).json().get("status") == "ready":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        assert f"serving {venv}/lib/" in log.read_text()  # the bundled model from the installed package
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "app.js" in page.text, page.text[:300]
        assert httpx.get(f"{url}/web/style.css", timeout=10).status_code == 200
        clip = encode_video(list(generate_clip(5, WorldConfig(frames=1)).frames), fps=2.0, fmt="mp4")
        r = httpx.post(f"{url}/v1/captions?format=srt", content=clip, timeout=120)
        assert r.status_code == 200, r.text
        lines = r.text.strip().splitlines()
        assert lines[:2] == ["1", "00:00:00,000 --> 00:00:00,500"] and lines[2].strip(), r.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
