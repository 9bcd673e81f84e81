"""Where tiergate keeps its files. Light: the gateway imports it too."""

from __future__ import annotations

import os
import pathlib

__all__ = ["cache_root", "default_model_dir", "DEFAULT_MODEL_NAME", "BUILD_INFO_FILE"]

DEFAULT_MODEL_NAME = "tiergate-sentiment-minilm-v1"
# The record inference.build writes into every model it builds (accuracy, held-out split).
BUILD_INFO_FILE = "tiergate_build.json"


def cache_root() -> pathlib.Path:
    """$TIERGATE_CACHE_DIR, else $XDG_CACHE_HOME/tiergate, else ~/.cache/tiergate."""
    explicit = os.environ.get("TIERGATE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "tiergate"


def default_model_dir() -> pathlib.Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME
