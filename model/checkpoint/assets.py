"""Where the bundled default model is, wherever casa-live is installed.

An installed wheel carries the repository's checkpoints/default as the package data of
`casa_live.model.bundled` (pyproject.toml maps it there), so `casa serve` finds its model without the
repository. A source checkout, editable install included, has no model/bundled folder: the model is
then the repository's own checkpoints/default. Nothing here imports torch, so settings can use it at
import time.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from casa_live.model.checkpoint.common import CONFIG


def default_model_dir() -> Path:
    """The bundled default model: casa_live/model/bundled in a wheel, checkpoints/default in a checkout."""
    package = Path(str(files("casa_live.model")))
    packaged = package / "bundled"
    if (packaged / CONFIG).is_file():
        return packaged
    return package.parent / "checkpoints" / "default"
