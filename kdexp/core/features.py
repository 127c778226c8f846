"""Encoded features, content-addressed: a list of examples is tokenised once per tokenizer and answer formatting,
then reused by every later run of the process (sweep jobs of one ``--multirun``) and, through
``<cache_dir>/features/<key>.json``, by every later process (docs/teacher_cache.md, "Per-run fixed costs").

This module stores and finds ``(prompt_ids, answer_ids)`` rows; :func:`kdexp.core.models.encode` computes them and
asks here first. The key (:func:`features_key`) hashes what the rows depend on: the tokenizer's full definition
(vocabulary, merges, normaliser: :func:`tokenizer_identity`), every example's id and rendered prompt (so the task,
split, selection and prompt template), the answer texts, ``max_prompt_tokens``, ``max_answer_tokens``,
``append_eos`` with the EOS id, and :data:`FORMAT_VERSION`. A file holds its key and the SHA-256 of its rows, both
checked before use; one that does not match is rebuilt (with a warning) under the lock of
:func:`kdexp.core.artefacts.build_once`, so concurrent sweep jobs tokenise once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from pathlib import Path

from kdexp.core.artefacts import FILE_MODE, build_once, content_hash

log = logging.getLogger(__name__)

# Bump when what a row holds or how encode() forms it changes: old files are then never read.
FORMAT_VERSION = 1
# Lists shorter than this are tokenised directly: a file per evaluation chunk or probe would cost more than it saves.
MIN_CACHED = 64
# In-process rows kept (least recently used dropped first): the default KD1 run encodes ~13k examples.
MEMO_ROWS = 200_000

Rows = list[tuple[list[int], list[int]]]
_memo: OrderedDict[str, Rows] = OrderedDict()
_tokenizer_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_state: dict = {"dir": None}


def use_dir(path: Path | None) -> None:
    """Store and find features under ``path`` too (runner.setup: ``<cache_dir>/features``); None: in memory only."""
    _state["dir"] = Path(path) if path is not None else None


def clear_memo() -> None:
    _memo.clear()


def tokenizer_identity(tokenizer) -> str:
    """Hash of everything that decides a tokenizer's ids: a fast tokenizer's whole serialised definition (vocabulary,
    merges, normaliser, pre-tokeniser, added tokens), else its vocabulary; computed once per tokenizer object."""
    try:
        return _tokenizer_ids[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    ident = hashlib.sha256(f"{type(tokenizer).__name__}\n{len(tokenizer)}\n{definition}".encode()).hexdigest()[:32]
    try:
        _tokenizer_ids[tokenizer] = ident
    except TypeError:  # an object that takes no weak reference: hash it again next time
        pass
    return ident


def features_key(tokenizer, task_cfg, prompts: list[tuple[str, str]], targets: list[str]) -> str:
    """The content address of ``encode``'s rows for ``prompts`` ((id, prompt) pairs) answered by ``targets``."""
    return content_hash({
        "format": FORMAT_VERSION, "tokenizer": tokenizer_identity(tokenizer),
        "examples": content_hash(prompts, n=64), "targets": content_hash(targets, n=64),
        "max_prompt_tokens": task_cfg.max_prompt_tokens, "max_answer_tokens": task_cfg.max_answer_tokens,
        "append_eos": bool(task_cfg.append_eos), "eos": tokenizer.eos_token_id if task_cfg.append_eos else None,
    }, n=32)


def _digest(rows: Rows) -> str:
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def read(path: Path, key: str) -> Rows | None:
    """The rows stored at ``path`` when it is a complete file for ``key`` whose checksum matches; else None."""
    try:
        stored = json.loads(Path(path).read_text())
        rows = [(list(p), list(a)) for p, a in stored["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored.get("key") != key or stored.get("format") != FORMAT_VERSION or stored.get("n") != len(rows):
        return None
    return rows if stored.get("sha256") == _digest(rows) else None


def write(path: Path, key: str, rows: Rows) -> None:
    blob = {"format": FORMAT_VERSION, "key": key, "n": len(rows), "sha256": _digest(rows), "rows": rows}
    Path(path).write_text(json.dumps(blob, separators=(",", ":")))
    Path(path).chmod(FILE_MODE)


def _remember(key: str, rows: Rows) -> Rows:
    _memo[key] = rows
    _memo.move_to_end(key)
    while sum(len(r) for r in _memo.values()) > MEMO_ROWS and len(_memo) > 1:
        _memo.popitem(last=False)
    return rows


def cached_rows(key: str, compute) -> Rows:
    """``compute()``'s rows for ``key``: from this process's memo, else the features folder (verified), else
    computed (and stored in both). Callers must copy what they change: the rows are shared."""
    if key in _memo:
        _memo.move_to_end(key)
        return _memo[key]
    folder = _state["dir"]
    if folder is None or not folder.parent.is_dir():  # a run's cache_dir that is gone (a test's): memory only
        return _remember(key, compute())
    path = folder / f"{key}.json"
    rows = read(path, key)
    if rows is None:
        folder.mkdir(parents=True, exist_ok=True)
        made: list[Rows] = []

        def build(tmp: Path) -> None:
            made.append(compute())
            write(tmp, key, made[0])

        build_once(path, build, ready=lambda p: read(p, key) is not None, what="encoded features")
        rows = made[0] if made else read(path, key)
        if rows is None:  # another writer's file vanished between its build and our read: compute our own
            rows = compute()
    return _remember(key, rows)
