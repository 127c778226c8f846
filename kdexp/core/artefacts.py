"""Content-addressed artefacts: hashing, atomic writes, seeding, and the one locked build-once helper.

Prepared teachers, teacher logit caches and teacher answers are all built the same way: under a lock on the target
path, reuse it if a complete copy is there, else build into a temporary name of this writer's own and rename it into
place, so a reader sees nothing or the whole artefact and two builders never share a temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def content_hash(obj: Any, n: int = 16) -> str:
    """Stable hash of JSON-able data (dict keys sorted), used as a content address."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def atomic_write_json(path: Path, data: Any) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def locked(path: Path, what: str, timeout_s: float = -1) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` (``flock`` through the filelock package), held while the block runs.

    The kernel drops an flock when its holder dies, so a killed job never leaves a lock to break by hand.
    ``timeout_s`` < 0 waits forever; a wait is logged once so a blocked job says what it waits for.
    """
    lock = FileLock(f"{path}.lock")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another process holds %s", what, lock.lock_file)
        lock.acquire(timeout=timeout_s)
    try:
        yield
    finally:
        lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def build_once(target: Path, build: Callable[[Path], None], *, ready: Callable[[Path], bool], what: str) -> bool:
    """Make ``target`` (a file or a directory) exist exactly once across concurrent processes; True if built here.

    Under the lock: ``ready(target)`` → reuse it. Otherwise ``build(tmp)`` writes the whole artefact to ``tmp`` (a
    name of this host and process, beside the target so the rename is atomic), a stale or damaged target is
    removed, and ``tmp`` is renamed into place. A crash leaves at most the temporary name, never a partial target.
    """
    target = Path(target)
    with locked(target, what):
        if ready(target):
            return False
        tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        _remove(tmp)
        try:
            build(tmp)
            if target.exists():
                log.warning("rebuilt %s: the existing %s was incomplete or damaged", what, target)
                _remove(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                _remove(tmp)
    return True
