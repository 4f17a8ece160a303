"""Podman for the system tests: a working configuration, the Debian base image, builds and containers.

- Podman runs with tests/containers.conf when runc is installed and CONTAINERS_CONF is not set: crun
  (podman's default runtime) fails on hybrid cgroup hosts, and the default ulimits fail where the
  process may not raise RLIMIT_NOFILE. runc with explicit ulimits runs on both.
- The Dockerfile's base is `debian:bookworm-slim`. Where no image registry can be reached, the tests
  make a stand-in from the same release: `debootstrap --variant=minbase bookworm`, trimmed the way the
  official slim image is (no docs, man pages or locales, no apt caches, the same apt sources and
  apt/dpkg settings), then `podman import`. It is made once and kept in podman's storage like any
  pulled image; `podman rmi localhost/debian:bookworm-slim` makes the next run rebuild it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
BASE_IMAGE = "localhost/debian:bookworm-slim"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

# What the official image adds to a minbase root (debuerreotype's slim variant and its apt settings).
_SLIM_FILES = {
    "etc/apt/sources.list.d/debian.sources": """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""",
    "etc/apt/apt.conf.d/docker-clean": """DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
""",
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-autoremove-suggests": ('Apt::AutoRemove::SuggestsImportant "false";\n'),
    "etc/dpkg/dpkg.cfg.d/docker": """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
""",
}


def env() -> dict[str, str]:
    out = dict(os.environ)
    if "CONTAINERS_CONF" not in out and shutil.which("runc"):
        out["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return out


def podman(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], env=env(), capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result


@functools.cache
def unavailable() -> str | None:
    """Why podman cannot build and run images here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman not installed: apt-get install -y podman runc debootstrap (.ci/run does it)"
    try:
        info = podman("info", "--format", "{{.Store.GraphDriverName}}", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer in 60 s"
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-500:]}"
    if not image_exists(BASE_IMAGE):
        if shutil.which("debootstrap") is None:
            return f"no {BASE_IMAGE} and no debootstrap to make it: apt-get install -y debootstrap"
        if os.geteuid() != 0:
            return f"no {BASE_IMAGE}, and debootstrap needs root to make it"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False, timeout=60).returncode == 0


def ensure_base_image() -> float:
    """Make the Debian stand-in base when it is missing; returns the seconds it took (0 when present)."""
    if image_exists(BASE_IMAGE):
        return 0.0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="casa-debootstrap-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        result = subprocess.run(
            ["nice", "-n", "19", "debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        _slim(root)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "--change", 'CMD ["bash"]', "-", BASE_IMAGE, stdin=tar.stdout, timeout=600)
        tar.stdout.close()
        assert tar.wait() == 0, "tar of the debootstrap root failed"
    return time.monotonic() - t0


def _slim(root: Path) -> None:
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for rel, text in _SLIM_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    share = root / "usr/share"
    for name in ("groff", "info", "linda", "lintian", "locale", "man"):
        shutil.rmtree(share / name, ignore_errors=True)
    for doc in (share / "doc").glob("*"):
        for item in doc.iterdir() if doc.is_dir() else []:
            if item.name != "copyright":
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    # Caches and the build host's traces: a container gets its own resolv.conf and hostname.
    for pattern in ("var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "var/log/*",
                    "dev/*", "tmp/*", "etc/resolv.conf", "etc/hostname"):  # fmt: skip
        for path in root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def image_id(name: str) -> str | None:
    result = podman("image", "inspect", name, "--format", "{{.Id}}", check=False, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else None


def drop_replaced(name: str, previous: str | None) -> None:
    """Remove the image a rebuild has just untagged, so that storage holds one build of each tag and the
    layer cache, not one image per source change. Kept when a container still uses it."""
    if previous and previous != image_id(name):
        podman("rmi", previous, check=False, timeout=120)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
