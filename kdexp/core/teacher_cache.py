"""On-disk teacher cache for logit distillation: top-k logits plus a tail summary that serves every temperature.

Per answer token: the top-k logits (float16, row max shifted to 0), their ids (bit-packed at ceil(log2 V) bits), and
2 numbers per rank bin of the other V - k logits, enough to recover the tail's log-sum-exp at any T; optionally S
ids sampled from the rest at build time, with their logits (:mod:`kdexp.core.sparse_target`). Reading gives
effective logits whose tempered softmax has the right top-k probabilities and tail mass, the tail spread uniformly,
or, with samples, an unbiased sampled target. See docs/teacher_cache.md.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from kdexp.core.artefacts import build_once
from kdexp.core.bitpack import id_bits, pack_ids, packed_width, unpack_ids
from kdexp.core.sparse_target import (
    reconstruct_teacher_probs,
    reference_logit,
    sample_design,
    sample_log_weights,
    shared_tail_logit,
    summarize_logits,
    tail_bin_edges,
    tail_entropy_correction,
    teacher_log_partition,
    teacher_logits_from_cache,
)

# The reading-as-a-target functions live in sparse_target; they stay importable from here.
__all__ = ["CacheInvalid", "Layout", "TeacherCache", "build_teacher_cache", "collate_cache_rows",
           "load_or_build_teacher_cache", "open_teacher_cache", "reconstruct_teacher_probs", "rows_from_logits",
           "shared_tail_logit", "summarize_logits", "tail_bin_edges", "tail_entropy_correction",
           "teacher_log_partition", "teacher_logits_from_cache"]

log = logging.getLogger(__name__)

# 2: every chunk carries a fletcher32 checksum, verified at open and on each read; 3: ids bit-packed at
# ceil(log2 V) bits, optional sampled tail (older files are rebuilt, never misread)
FORMAT_VERSION = 3
CHUNK_ROWS = 64  # token rows per HDF5 chunk: small enough that example i touches <= 2 chunks, big enough to compress
WRITE_BLOCK = 4096  # token rows buffered between HDF5 writes; resizing per example is slow
VERIFY_ROWS = CHUNK_ROWS * 1024  # rows per read of the checksum pass at open (8 MiB of top-k values at k=64)
COMPRESSIONS = ("lzf", "gzip", None)
ROW_DATASETS = ("topk_logits", "topk_ids", "tail", "sample_ids", "sample_logits", "sample_lse")


@dataclass(frozen=True)
class Layout:
    """What a token row holds: the exact head (k ids), and S tail ids sampled at T_s from a per-example seeded RNG."""

    vocab_size: int
    top_k: int
    samples: int = 0
    sample_temperature: float = 1.0
    sample_seed: int = 0

    def __post_init__(self):
        # Without draws the sampling knobs change no stored number: give them one value, so that caches that differ
        # only in them compare equal (a sweep over method.cache_seed must not rebuild a head_uniform cache).
        if not self.samples:
            object.__setattr__(self, "sample_temperature", 1.0)
            object.__setattr__(self, "sample_seed", 0)

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def design(self) -> str:
        return sample_design(self.vocab_size, self.top_k, self.samples)

    def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and dtype of each stored dataset; zero-width ones are not stored (HDF5 chunks need > 0)."""
        specs = {"topk_logits": ((self.top_k,), np.float16),
                 "topk_ids": ((packed_width(self.top_k, self.bits),), np.uint8),
                 "tail": ((2, len(tail_bin_edges(self.vocab_size, self.top_k)) - 1), np.float16)}
        if self.samples:
            specs |= {"sample_ids": ((packed_width(self.samples, self.bits),), np.uint8),
                      "sample_logits": ((self.samples,), np.float16), "sample_lse": ((), np.float32)}
        return {name: (shape, np.dtype(dt)) for name, (shape, dt) in specs.items()}

    def check(self) -> None:
        if not 0 <= self.top_k <= self.vocab_size:
            raise ValueError(f"method.top_k={self.top_k} exceeds the teacher vocabulary size {self.vocab_size} "
                             f"(it must be in [1, {self.vocab_size}])")
        if self.samples < 0 or self.top_k + self.samples < 1:
            raise ValueError(f"method.cache_samples={self.samples}: a cache needs top_k + cache_samples >= 1")
        if self.samples and not self.sample_temperature > 0:
            raise ValueError(f"method.cache_sample_temperature={self.sample_temperature} must be > 0")


class CacheInvalid(ValueError):
    """The cache file is missing, unreadable, damaged, incomplete or was built for another configuration."""


def _decode(stored: dict[str, np.ndarray], layout: Layout, log_n: np.ndarray) -> dict[str, torch.Tensor]:
    """Stored arrays (ids unpacked) -> reader rows; tail becomes (n, 3, B) = [a, g, log bin count] so it describes
    itself; samples add sample_logw (log importance factor per slot) and tail_exact (n, 2) = [1/T_s, L_s]."""
    vals = torch.from_numpy(stored["topk_logits"].astype(np.float32))
    tail = torch.empty(vals.shape[0], 3, stored["tail"].shape[-1])
    tail[:, :2] = torch.from_numpy(stored["tail"].astype(np.float32))
    tail[:, 0] += torch.from_numpy(reference_logit(stored["topk_logits"]).astype(np.float32))
    tail[:, 2] = torch.from_numpy(log_n)
    rows = {"topk_logits": vals, "topk_ids": torch.from_numpy(stored["topk_ids"].astype(np.int64)), "tail": tail}
    if layout.samples:
        logits = torch.from_numpy(stored["sample_logits"].astype(np.float32))
        lse = torch.from_numpy(stored["sample_lse"].astype(np.float32))
        rows |= {"sample_ids": torch.from_numpy(stored["sample_ids"].astype(np.int64)), "sample_logits": logits,
                 "sample_logw": sample_log_weights(logits, lse, layout.sample_temperature, layout.design),
                 "tail_exact": torch.stack([torch.full_like(lse, 1.0 / layout.sample_temperature), lse], -1)}
    return rows


def rows_from_logits(logits: torch.Tensor, top_k: int, *, samples: int = 0, sample_temperature: float = 1.0,
                     seed: int = 0, index: int = 0) -> dict[str, torch.Tensor]:
    """What reading the cache would return for these full logits (n, V), as example ``index``, without disk."""
    layout = Layout(logits.shape[-1], top_k, samples, sample_temperature, seed)
    layout.check()
    stored = summarize_logits(logits, top_k, samples=samples, sample_temperature=sample_temperature,
                              rng=np.random.default_rng([seed, index]))
    return _decode(stored, layout, _log_counts(tail_bin_edges(logits.shape[-1], top_k)))


def _log_counts(edges) -> np.ndarray:
    return np.log(np.diff(np.asarray(edges, np.float64))).astype(np.float32)


def _create_datasets(f: h5py.File, layout: Layout, compression) -> dict[str, h5py.Dataset]:
    opts = _filter_opts(compression)
    return {name: f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                   chunks=(CHUNK_ROWS, *shape), **opts)
            for name, (shape, dtype) in layout.specs().items() if all(shape)}


def _append(dsets: dict[str, h5py.Dataset], buffers: dict[str, list]) -> None:
    for name, parts in buffers.items():
        if parts:
            block, ds = np.concatenate(parts), dsets[name]
            ds.resize(ds.shape[0] + block.shape[0], axis=0)
            ds[-block.shape[0]:] = block
            parts.clear()


def _stored_row(logits: torch.Tensor, layout: Layout, index: int) -> dict[str, np.ndarray]:
    # One generator per example, seeded by (seed, example index): the draws do not depend on the build order.
    rng = np.random.default_rng([layout.sample_seed, index]) if layout.samples else None
    stored = summarize_logits(logits, layout.top_k, samples=layout.samples,
                              sample_temperature=layout.sample_temperature, rng=rng)
    for name in ("topk_ids", "sample_ids"):
        if name in stored:
            stored[name] = pack_ids(stored[name], layout.bits)
    return stored


def _write_rows(f: h5py.File, rows: Iterable, n_examples: int, layout: Layout, compression, progress: bool) -> int:
    dsets = _create_datasets(f, layout, compression)
    starts, counts = np.full(n_examples, -1, np.int64), np.zeros(n_examples, np.int64)
    buffers, n_tok, pending = {name: [] for name in dsets}, 0, 0
    for index, logits in tqdm(rows, total=n_examples, disable=not progress, desc="teacher cache", unit="ex"):
        index = int(index)
        if not 0 <= index < n_examples or starts[index] >= 0:
            raise ValueError(f"teacher cache rows: example index {index} is out of range or repeated")
        if logits.ndim != 2 or logits.shape[-1] != layout.vocab_size:
            raise ValueError(f"teacher cache rows: example {index} logits shape {tuple(logits.shape)}, "
                             f"expected (n_tokens, {layout.vocab_size})")
        stored = _stored_row(logits, layout, index)
        for name in dsets:
            buffers[name].append(stored[name])
        starts[index], counts[index] = n_tok, len(logits)
        n_tok, pending = n_tok + len(logits), pending + len(logits)
        if pending >= WRITE_BLOCK:
            _append(dsets, buffers)
            pending = 0
    _append(dsets, buffers)
    missing = np.flatnonzero(starts < 0)
    if missing.size:
        raise ValueError(f"teacher cache rows: {missing.size} of {n_examples} examples never came, e.g. {missing[:5]}")
    f.create_dataset("row_start", data=starts.astype(np.uint64), **_filter_opts(compression))
    f.create_dataset("row_count", data=counts.astype(np.uint32), **_filter_opts(compression))
    return n_tok


def _filter_opts(compression) -> dict:
    # Shuffle groups the float16 high bytes (sign + exponent, near-constant on sorted logits) so lzf/gzip bite.
    # fletcher32 checksums each stored chunk (4 bytes); HDF5 verifies it on every read, so damage raises, never
    # reaches a loss.
    return {"compression": compression, "shuffle": compression is not None, "fletcher32": True}


def _meta_json(meta: dict | None) -> str:
    return json.dumps(meta if meta is not None else {}, sort_keys=True, default=str)


def build_teacher_cache(path, rows, *, n_examples, vocab_size, top_k=64, samples=0, sample_temperature=1.0,
                        sample_seed=0, compression="lzf", meta: dict, progress=True) -> Path:
    """Write the cache for ``rows`` = iterable of (example_index, logits (n_i, vocab)) to ``path``, once.

    ``samples`` > 0 adds S tail ids per token drawn at ``sample_temperature`` (seeded by ``sample_seed`` and the
    example index). Through :func:`kdexp.core.artefacts.build_once`: a valid file with the same meta and layout
    already at ``path`` (e.g. one a concurrent builder finished first) is kept, anything else is replaced atomically.
    """
    layout = Layout(vocab_size, top_k, samples, float(sample_temperature), sample_seed)
    _build(Path(path), lambda: rows, n_examples=n_examples, layout=layout, compression=compression, meta=meta,
           progress=progress)
    return Path(path)


def _build(path: Path, make_rows: Callable[[], Iterable], *, n_examples, layout: Layout, compression, meta,
           progress=True) -> list[TeacherCache]:
    """Build unless a cache that verifies and matches is there; returns [that cache, opened] or [] (built here)."""
    layout.check()
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    opened = []

    def write(tmp: Path) -> None:
        # The 1.10 file format checksums HDF5's own metadata (object headers, attributes, chunk index) as well.
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            n_tok = _write_rows(f, make_rows(), n_examples, layout, compression, progress)
            f.attrs.update({"format_version": FORMAT_VERSION, "vocab_size": layout.vocab_size,
                            "top_k": layout.top_k, "samples": layout.samples,
                            "sample_temperature": layout.sample_temperature, "sample_seed": layout.sample_seed,
                            "id_bits": layout.bits, "n_examples": n_examples, "n_tokens": n_tok,
                            "compression": str(compression),
                            "tail_bin_edges": np.asarray(tail_bin_edges(layout.vocab_size, layout.top_k), np.int64)})
            # Last, so a reader can trust a file that has them: a crash before this leaves no complete flag.
            f.attrs["complete"] = True
            f.attrs["meta"] = _meta_json(meta)
        with open(tmp, "rb") as fh:  # a power cut after the rename must not leave a complete-flagged file of garbage
            os.fsync(fh.fileno())

    build_once(path, write, ready=lambda p: _reusable(p, meta, (n_examples, *astuple(layout)), opened),
               what=f"teacher cache {path}")
    return opened


def _reusable(path: Path, meta: dict | None, shape: tuple, opened: list) -> bool:
    """``build_once``'s ready check: open ``path`` (every checksum verified) into ``opened`` if it can serve as this
    cache; a file that cannot is rebuilt with a warning saying why."""
    if not path.exists():
        log.info("building teacher cache %s", path)
        return False
    try:
        cache = open_teacher_cache(path, expected_meta=meta)
        got = (cache.n_examples, *astuple(cache.layout))
        if got != shape:
            raise CacheInvalid(f"it holds (n_examples, vocab_size, top_k, samples, sample_temperature, "
                               f"sample_seed)={got}, expected {shape}")
    except CacheInvalid as e:
        warnings.warn(f"rebuilding teacher cache: {e}", stacklevel=5)
        return False
    opened.append(cache)
    return True


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class TeacherCache:
    """Read-only random access to a cache file; the HDF5 handle is opened lazily in each process (DataLoader-safe)."""

    def __init__(self, path, attrs: dict, starts: np.ndarray, counts: np.ndarray):
        self.path = Path(path)
        self.n_examples = int(attrs["n_examples"])
        self.layout = Layout(int(attrs["vocab_size"]), int(attrs["top_k"]), int(attrs["samples"]),
                             float(attrs["sample_temperature"]), int(attrs["sample_seed"]))
        self.vocab_size, self.top_k, self.samples = self.layout.vocab_size, self.layout.top_k, self.layout.samples
        self.meta = json.loads(attrs["meta"])
        self._log_n = _log_counts(attrs["tail_bin_edges"])
        self._starts, self._counts = starts, counts
        self._h5, self._pid, self._dsets = None, None, {}

    def __len__(self) -> int:
        return self.n_examples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n_examples <= i < self.n_examples:
            raise IndexError(f"example {i} out of range for a teacher cache of {self.n_examples}")
        s = int(self._starts[i])
        sl = slice(s, s + int(self._counts[i]))
        try:
            if self._h5 is None or self._pid != os.getpid():  # an h5py handle inherited through fork is not usable
                self._h5, self._pid = _h5_open(self.path), os.getpid()
                # Dataset lookups by name cost ~30 us each, more than the reads themselves: resolve them once.
                self._dsets = {name: self._h5[name] for name in ROW_DATASETS if name in self._h5}
            return self._decode_rows({name: ds[sl] for name, ds in self._dsets.items()}, sl.stop - sl.start)
        except (OSError, RuntimeError, KeyError) as e:  # a chunk failing its checksum raises OSError
            raise CacheInvalid(f"teacher cache {self.path}: example {i} cannot be read, the file was damaged after "
                               f"it was opened ({_first_line(e)}); the next run rebuilds it") from e

    def _decode_rows(self, stored: dict[str, np.ndarray], n: int) -> dict[str, torch.Tensor]:
        lay = self.layout
        for name, (shape, dtype) in lay.specs().items():  # zero-width datasets are not stored
            stored.setdefault(name, np.zeros((n, *shape), dtype))
        stored["topk_ids"] = unpack_ids(stored["topk_ids"], lay.top_k, lay.bits)
        if lay.samples:
            stored["sample_ids"] = unpack_ids(stored["sample_ids"], lay.samples, lay.bits)
        return _decode(stored, lay, self._log_n)

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._dsets = None, {}

    def __getstate__(self):
        return {**self.__dict__, "_h5": None, "_pid": None, "_dsets": {}}


def _h5_open(path) -> h5py.File:
    # The file never changes once published, so HDF5 file locking buys nothing and breaks on some NFS mounts.
    return h5py.File(path, "r", locking=False)


def open_teacher_cache(path, *, expected_meta: dict | None = None) -> TeacherCache:
    """Open and validate ``path``, reading every chunk once so that HDF5 checks each one's checksum; raises
    CacheInvalid (one line) when it must not be used. Costs one sequential read of the file (docs/teacher_cache.md)."""
    path = Path(path)
    if not path.is_file():
        raise CacheInvalid(f"teacher cache {path} does not exist")
    try:
        with _h5_open(path) as f:
            attrs = dict(f.attrs)
            if not attrs.get("complete", False) or "meta" not in attrs:
                raise CacheInvalid(f"teacher cache {path} is incomplete (its writer did not finish)")
            if attrs.get("format_version") != FORMAT_VERSION:
                raise CacheInvalid(f"teacher cache {path} has format {attrs.get('format_version')}, "
                                   f"expected {FORMAT_VERSION}")
            stored, expected = json.loads(attrs["meta"]), json.loads(_meta_json(expected_meta or {}))
            diff = sorted(k for k in stored.keys() | expected.keys() if stored.get(k, ...) != expected.get(k, ...))
            if expected_meta is not None and diff:  # before the checksum pass, which a stale file need not pay
                raise CacheInvalid(f"teacher cache {path} was built for another configuration "
                                   f"(meta differs in: {', '.join(diff)})")
            starts, counts = f["row_start"][:].astype(np.int64), f["row_count"][:].astype(np.int64)
            n_tok = int(attrs["n_tokens"])
            if len(starts) != int(attrs["n_examples"]) or np.any(starts + counts > n_tok):
                raise CacheInvalid(f"teacher cache {path} has an inconsistent example index")
            for name in ROW_DATASETS:
                if name in f:
                    _verify_dataset(path, f[name], n_tok)
        return TeacherCache(path, attrs, starts, counts)
    except CacheInvalid:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, RuntimeError... for damaged files
        raise CacheInvalid(f"teacher cache {path} is unreadable ({_first_line(e)})") from e


def _verify_dataset(path: Path, ds: h5py.Dataset, n_tok: int) -> None:
    """Read every chunk of ``ds``: HDF5 verifies each one's fletcher32 checksum and raises on a mismatch."""
    if ds.shape[0] != n_tok:
        raise CacheInvalid(f"teacher cache {path}: dataset {ds.name} has {ds.shape[0]} rows, expected {n_tok}")
    for lo in range(0, n_tok, VERIFY_ROWS):
        hi = min(lo + VERIFY_ROWS, n_tok)
        try:
            ds[lo:hi]
        except OSError as e:
            raise CacheInvalid(f"teacher cache {path} is damaged: dataset {ds.name} rows {lo}-{hi - 1} fail their "
                               f"checksum or cannot be read ({_first_line(e)})") from e


def load_or_build_teacher_cache(path, make_rows: Callable[[], Iterable], *, n_examples, vocab_size, top_k,
                                compression, meta, samples=0, sample_temperature=1.0, sample_seed=0) -> TeacherCache:
    """Reuse a valid cache whose meta and layout match (checksums verified once, under the lock); otherwise
    (re)build it, warning when a file was replaced."""
    # make_rows is called only if build_once decides to build: a reused cache never runs the teacher.
    layout = Layout(vocab_size, top_k, samples, float(sample_temperature), sample_seed)
    opened = _build(Path(path), make_rows, n_examples=n_examples, layout=layout, compression=compression, meta=meta)
    return opened[0] if opened else open_teacher_cache(path, expected_meta=meta)


def collate_cache_rows(rows: list[dict], window: int) -> dict[str, torch.Tensor]:
    """Stack examples into (B, window, ...) right-aligned: example rows fill the last n_i slots; see cache_mask."""
    out = {name: rows[0][name].new_zeros(len(rows), window, *rows[0][name].shape[1:])
           for name in rows[0] if name != "cache_mask"}
    mask = torch.zeros(len(rows), window, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = row["topk_logits"].shape[0]
        if n > window:
            raise ValueError(f"an example has {n} cached answer tokens but the window is {window}")
        for name in out:
            out[name][b, window - n:] = row[name]
        mask[b, window - n:] = True
    return {**out, "cache_mask": mask}
