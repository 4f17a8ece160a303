"""Hub repo ids (model/checkpoint/hub.py): resolved from a cache directory in the Hub's own layout, offline.

The cache is built by the test: a tiny Qwen2.5-VL saved by transformers, stored as blobs named by
their sha256 with snapshot symlinks and refs, as huggingface_hub lays it out. Nothing is downloaded:
every test runs with HF_HUB_OFFLINE=1 or with HF_ENDPOINT at a closed local port.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from casa_live.cli import convert
from casa_live.cli.main import build_parser
from casa_live.model.checkpoint.hub import HubError, parse_repo_id, resolve_model
from casa_live.model.checkpoint.load import load
from casa_live.model.engine.engine import Engine
from tests.test_hf_import import write_hf_checkpoint

pytest.importorskip("transformers")
REPO = "tiny-org/Tiny-Qwen2.5-VL"


def add_snapshot(cache: Path, repo: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Store src's files as one commit of `repo` in a hub-layout cache; point `refs` at it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(f.relative_to(src).parts) + "../blobs") / blob.name)
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, str, str]:
    """A cache with two commits of REPO: `old` (tagged v1) and `new` (main)."""
    work = tmp_path_factory.mktemp("hub")
    src = work / "src"
    write_hf_checkpoint(src)
    cache = work / "cache"
    old, new = "a" * 40, "b" * 40
    add_snapshot(cache, REPO, src, old, refs=("v1",))
    (src / "generation_config.json").write_text('{"eos_token_id": [2, 0], "top_p": 0.5}')  # tells them apart
    add_snapshot(cache, REPO, src, new)
    return cache, old, new


@pytest.fixture
def offline(monkeypatch, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    return hub


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_parse_repo_id() -> None:
    assert parse_repo_id("kyutai/CASA-Qwen2_5-VL-3B-LiveCC") == ("kyutai/CASA-Qwen2_5-VL-3B-LiveCC", None)
    assert parse_repo_id("Qwen/Qwen2.5-VL-3B-Instruct@v1.0") == ("Qwen/Qwen2.5-VL-3B-Instruct", "v1.0")
    for not_an_id in ("checkpoints/default/x", "./a/b", "/models/x", "a", "a/b c", "a//b"):
        assert parse_repo_id(not_an_id) is None, not_an_id


def test_a_repo_id_resolves_offline_and_loads(offline, tmp_path) -> None:
    cache, _old, new = offline
    path = resolve_model(REPO)
    assert path == cache / "models--tiny-org--Tiny-Qwen2.5-VL" / "snapshots" / new
    model, _tok, gen = load(path)
    assert gen.top_p == 0.5 and model.config.processor == "qwen"  # main's generation config
    engine = Engine.from_checkpoint(path, max_sessions=1, max_context_tokens=256)
    row = engine.open()
    frame = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    assert list(engine.caption(row, frame))[-1].done
    # casa convert ORG/NAME DST
    assert convert.main([REPO, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_revisions_pin_a_commit_tag_or_branch(offline) -> None:
    cache, old, new = offline
    snaps = cache / "models--tiny-org--Tiny-Qwen2.5-VL" / "snapshots"
    assert resolve_model(f"{REPO}@{old}") == snaps / old
    assert resolve_model(REPO, revision="v1") == snaps / old
    assert resolve_model(REPO, revision="main") == snaps / new
    assert load(resolve_model(f"{REPO}@v1"))[2].top_p == 1.0
    with pytest.raises(HubError, match="two revisions"):
        resolve_model(f"{REPO}@v1", revision="main")
    with pytest.raises(HubError, match="revision nope"):
        resolve_model(REPO, revision="nope")


def test_offline_and_not_cached_fails_at_once_naming_the_repo(offline) -> None:
    t0 = time.monotonic()
    with pytest.raises(HubError) as err:
        resolve_model("kyutai/CASA-Qwen2_5-VL-3B-LiveCC")
    msg = str(err.value)
    assert time.monotonic() - t0 < 5
    assert "kyutai/CASA-Qwen2_5-VL-3B-LiveCC" in msg and "HF_HUB_OFFLINE" in msg and "hf download" in msg


def test_no_network_fails_at_once_or_uses_the_cache(monkeypatch, hub) -> None:
    cache, _, new = hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(HubError) as err:
        resolve_model("kyutai/CASA-Qwen2_5-VL-3B")
    assert time.monotonic() - t0 < 15
    assert "kyutai/CASA-Qwen2_5-VL-3B" in str(err.value) and "could not be reached" in str(err.value)
    assert resolve_model(REPO).name == new  # cached: the copy in the cache serves


def test_a_directory_wins_and_a_bad_spec_says_so(offline, tmp_path, monkeypatch) -> None:
    local = tmp_path / "tiny-org" / "Tiny-Qwen2.5-VL"
    shutil.copytree(resolve_model(REPO), local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)  # the relative directory of the same spelling
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        resolve_model("no such dir")


def test_serve_and_convert_flags_take_a_repo_id(offline, capsys, tmp_path) -> None:
    from casa_live.cli.serve import settings_from_args

    _cache, old, _new = offline
    args = build_parser().parse_args(["serve", "--model", REPO, "--revision", "v1"])
    assert settings_from_args(args).model_dir.name == old
    args = build_parser().parse_args(["serve", "--model", "kyutai/CASA-Qwen2_5-VL-3B-LiveCC"])
    assert args.func(args) == 2
    assert "kyutai/CASA-Qwen2_5-VL-3B-LiveCC" in capsys.readouterr().out
    assert convert.main(["nobody/none", str(tmp_path / "x")]) == 1
    assert "nobody/none" in capsys.readouterr().err
