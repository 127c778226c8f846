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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# Files kdexp writes are shared by a team through one cache_dir: give them the mode the process umask allows, as
# open() would, not mkstemp's private 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
# How long a build waits for another process's build of the same artefact (seconds; < 0 waits forever).
LOCK_TIMEOUT_ENV = "KDEXP_LOCK_TIMEOUT_S"


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
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _holder(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text())
        return f"{info['host']}:{info['pid']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def locked(path: Path, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` (``flock`` through the filelock package), held while the block runs.

    The kernel drops an flock when its holder dies, so a killed job never leaves a lock to break by hand, whatever
    the lock file holds; on NFS the client maps flock to NFS byte-range locks, which hold across hosts
    (docs/design.md lists the filesystems). The holder's host:pid goes to ``<path>.lock.owner`` for the log line a
    waiting process prints. ``timeout_s`` (default ``$KDEXP_LOCK_TIMEOUT_S``, else wait forever) ends a wait with
    a one-line TimeoutError naming the holder.
    """
    lock, owner = FileLock(f"{path}.lock"), Path(f"{path}.lock.owner")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, -1)) if timeout_s is None else timeout_s
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s held by %s (lock %s)", what, _holder(owner), lock.lock_file)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise TimeoutError(f"gave up after {timeout:g}s waiting for {what}, held by {_holder(owner)} (lock "
                               f"{lock.lock_file}; {LOCK_TIMEOUT_ENV} sets the wait)") from None
    try:
        atomic_write_json(owner, {"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        owner.unlink(missing_ok=True)
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
        # Any other writer's temporary is an orphan: a live writer would hold the lock we hold now.
        for orphan in target.parent.glob(f".{target.name}.tmp-*"):
            _remove(orphan)
        tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
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
