"""The config layer: where the YAML tree lives, the shared schema, and the one-line checks every layer uses.

Nothing here imports torch or any other kdexp package: every layer above may import it (see the import contract in
pyproject.toml).
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore

from kdexp.config.schema import Config

# conf/ sits beside the package in the source tree (an editable install, which the README uses).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# Keys that say where outputs go or how to treat an existing result, not what a run computes: never part of a run
# key, never a reason to split a report's settings.
BOOKKEEPING_KEYS = ("output_dir", "force", "cache_dir", "logger")
# Task keys added after content keys were in use, with their defaults: at the default a key stays out of every
# content key (teacher, caches, run registry), so what was built before it existed is still found.
LATER_TASK_DEFAULTS = {"validation_group": None}


def later_task_keys(task: dict) -> dict:
    """The keys of ``LATER_TASK_DEFAULTS`` that ``task`` (a resolved task config) sets to something else."""
    return {k: task[k] for k, default in LATER_TASK_DEFAULTS.items() if task.get(k, default) != default}


def register_base() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def default_cache_dir() -> Path:
    """Where ``cache_dir`` points unless a run sets it: ``$KDEXP_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdexp``, else
    ``~/.cache/kdexp`` — one cache per user, as pip and the HF hub keep theirs (conf/config.yaml says the same)."""
    if os.environ.get("KDEXP_CACHE_DIR"):
        return Path(os.environ["KDEXP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ.get("HOME", "."), ".cache")
    return Path(base) / "kdexp"
