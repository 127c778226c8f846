"""Where the dashboard looks for runs. Imports nothing heavy, so the launcher prints its URL at once (the app itself
imports torch through kdexp.analysis)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kdexp.config import default_cache_dir


@dataclass(frozen=True)
class Sources:
    """Where the dashboard looks: directories searched recursively, and the run registry's cache dir (or None)."""

    dirs: tuple[Path, ...]
    cache_dir: Path | None = None


def default_sources(cwd: Path | None = None) -> Sources:
    cwd = Path(cwd or Path.cwd())
    return Sources((cwd / "outputs", cwd / "multirun"), default_cache_dir())


# How the launcher tells the Streamlit script (and a test harness tells the app) where to look.
DIRS_ENV, CACHE_ENV = "KDEXP_DASHBOARD_DIRS", "KDEXP_DASHBOARD_CACHE_DIR"


def sources_from_env() -> Sources:
    """``KDEXP_DASHBOARD_DIRS`` (a JSON list) and ``KDEXP_DASHBOARD_CACHE_DIR`` ("" for no registry), else the
    defaults: ``outputs/`` and ``multirun/`` under the working directory and the default cache dir."""
    if DIRS_ENV not in os.environ:
        return default_sources()
    cache = os.environ.get(CACHE_ENV, "")
    return Sources(tuple(Path(d) for d in json.loads(os.environ[DIRS_ENV])), Path(cache) if cache else None)
