"""Hugging Face Hub repo ids -> local checkpoint directories (`--model ORG/NAME`, `casa convert ORG/NAME`).

    path = resolve_model("Qwen/Qwen2.5-VL-3B-Instruct")           # the usual HF cache, branch main
    path = resolve_model("kyutai/CASA-Qwen2_5-VL-3B-LiveCC@<commit>")  # a pinned revision
    path = resolve_model("/models/x")                               # a directory: returned as it is

Design choices (docs/checkpoints.md, "From the Hugging Face Hub"):
- an existing directory always wins over a repo id of the same spelling;
- downloads go through `huggingface_hub.snapshot_download` into the standard cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), only the files casa-live
  reads (configs, tokenizer, safetensors): a Kyutai repo's remote code is never fetched or run;
- `HF_HUB_OFFLINE=1` means the cache only; `HF_ENDPOINT` names a mirror. Both are read when a model
  is resolved, not when the library was imported;
- every failure is a `HubError` naming the repo and revision and saying what to do; when the cache
  has no copy and the Hub cannot be reached it fails at once (one connection attempt).
huggingface_hub is imported here only, lazily: loading a local directory never touches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from casa_live.model.checkpoint.common import CheckpointError

# what casa-live reads from a checkpoint (model/checkpoint/format.py, model/checkpoint/hf/): never remote code
PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "*.safetensors",
    "*.safetensors.index.json",
]
# ORG/NAME as the Hub spells them, optionally @revision (a branch, tag or commit)
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(CheckpointError):
    """A repo id that cannot be resolved to a local directory; the message says what to do."""


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision) for "ORG/NAME[@REV]", None for anything else."""
    m = REPO_ID.match(spec)
    if m is None or spec.startswith((".", "/", "~")):
        return None
    return m["repo"], m["revision"]


def cache_dir() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory for `spec`: an existing directory, or a Hub repo id resolved (and, when
    online, downloaded) into the HF cache. `revision` (or "@REV" in the spec) pins a branch, tag or
    commit; the default is the repo's main branch. Raises HubError with the fix."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    parsed = parse_repo_id(str(spec))
    if parsed is None:
        raise HubError(
            f"{spec}: no such directory, and not a Hugging Face repo id (ORG/NAME, optionally @REVISION)"
        )
    repo, rev = parsed
    if revision is not None and rev is not None and revision != rev:
        raise HubError(f"{spec}: two revisions given ({rev} in the id, {revision} as --revision); give one")
    return download(repo, revision or rev)


def download(repo: str, revision: str | None = None) -> Path:
    """snapshot_download of the files casa-live reads; HubError with the fix on any failure."""
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise HubError(
            f"{repo}: resolving a Hub repo id needs huggingface_hub (pip install huggingface_hub)"
        ) from None

    cache, no_network = cache_dir(), offline()
    where = f"{repo} (revision {revision or 'main'})"
    fetch = f"`hf download {repo}{f' --revision {revision}' if revision else ''}` on a machine that is online"
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache,
            local_files_only=no_network,
            allow_patterns=PATTERNS,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            etag_timeout=10,
        )
    except hf_errors.GatedRepoError:
        raise HubError(
            f"{where} is gated: accept its terms on huggingface.co/{repo}, then log in "
            "(`hf auth login`, or set HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"{where}: no such repository on the Hub, or it is private (log in with `hf auth login` or HF_TOKEN); "
            "docs/checkpoints.md lists the released ids"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no such revision (a branch, tag or commit)") from None
    except hf_errors.LocalEntryNotFoundError:
        if no_network:
            raise HubError(
                f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, so nothing is "
                f"downloaded: fetch it with {fetch} and copy the cache over (or set HF_HUB_CACHE to it), "
                "unset HF_HUB_OFFLINE to download it, or pass a local checkpoint directory"
            ) from None
        raise HubError(
            f"{where} is not in the Hugging Face cache ({cache}) and the Hub could not be reached: connect "
            f"this machine, or fetch it with {fetch} and copy the cache over (or set HF_HUB_CACHE to it), "
            "or pass a local checkpoint directory"
        ) from None
    except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError, OSError) as exc:
        raise HubError(f"{where}: could not be resolved ({type(exc).__name__}: {exc})") from None
    path = Path(folder)
    if not (path / "config.json").exists():
        raise HubError(f"{where}: the snapshot at {path} has no config.json; is this a model repository?")
    return path
