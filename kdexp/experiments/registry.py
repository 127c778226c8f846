"""Run registry: one JSON pointer per completed run, keyed by the hash of its resolved config.

A run writes results.json (status "complete") atomically at the very end, and only then registers; so a crashed run
is never found as complete, and a rerun of the same config (or a re-launched sweep) skips what already finished.
"""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path

from omegaconf import OmegaConf

from kdexp.config import BOOKKEEPING_KEYS, LATER_TASK_DEFAULTS, later_task_keys
from kdexp.core.artefacts import atomic_write_json, content_hash

log = logging.getLogger(__name__)
# Task keys read only through interpolations (method.unlabeled_samples, teacher.prepare.*) whose resolved values are
# in the key already. Hashing the source too would split equal runs: B0 never reads the transfer-set size, so a sweep
# over it must not train B0 twice, and `teacher.prepare.epochs=4` is the same teacher as `task.teacher_epochs=4`.
DEFAULT_SOURCES = ("unlabeled_samples", "teacher_train_samples", "teacher_epochs", "teacher_batch_size",
                   "teacher_lr")


def run_key(cfg) -> str:
    """Hash of what the run computes: the resolved config with the method node as its schema has it
    (:func:`kdexp.methods.prepare` has dropped other methods' knobs), without bookkeeping keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for k in BOOKKEEPING_KEYS:
        container.pop(k, None)
    for k in DEFAULT_SOURCES:
        container["task"].pop(k, None)
    set_later = later_task_keys(container["task"])
    container["task"] = {k: v for k, v in container["task"].items() if k not in LATER_TASK_DEFAULTS} | set_later
    return content_hash(container)


def _pointer(cfg, key: str) -> Path:
    return Path(cfg.cache_dir) / "runs" / f"{key}.json"


def lookup(cfg, key: str) -> dict | None:
    """The results of a completed run with this key, or None."""
    pointer = _pointer(cfg, key)
    if not pointer.exists():
        return None
    try:
        results_path = Path(json.loads(pointer.read_text())["results"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        # A truncated pointer must not block this config forever: the run is simply done again.
        log.warning("registry pointer %s is unreadable (%s: %s); treating the run as not done", pointer,
                    type(err).__name__, err)
        return None
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") != "complete" or results.get("run_key") != key:
        return None
    results["_path"] = str(results_path)
    return results


def record(cfg, key: str, results_path: Path) -> None:
    atomic_write_json(_pointer(cfg, key), {"results": str(Path(results_path).resolve())})


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("kdexp", "torch", "transformers", "hydra-core", "h5py", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
