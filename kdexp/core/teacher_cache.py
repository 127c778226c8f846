"""On-disk teacher cache for logit distillation: top-k logits plus a tail summary that serves every temperature.

Per answer token: the top-k logits (float16, row max shifted to 0), their ids, and 2 numbers per rank bin of the
other V - k logits, enough to recover the tail's log-sum-exp at any T. Reading gives effective logits whose tempered
softmax has the right top-k probabilities and tail mass, the tail spread uniformly. See docs/teacher_cache.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from kdexp.core.artefacts import build_once
from kdexp.core.losses import forward_kl

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: every chunk carries a fletcher32 checksum, verified at open and on each read
TAIL_BIN_RATIO = 4  # bin widths 1, 4, 16, ... over the sorted tail; see the doc for the accuracy/size trade-off
CHUNK_ROWS = 64  # token rows per HDF5 chunk: small enough that example i touches <= 2 chunks, big enough to compress
WRITE_BLOCK = 4096  # token rows buffered between HDF5 writes; resizing per example is slow
VERIFY_ROWS = CHUNK_ROWS * 1024  # rows per read of the checksum pass at open (8 MiB of top-k values at k=64)
COMPRESSIONS = ("lzf", "gzip", None)


class CacheInvalid(ValueError):
    """The cache file is missing, unreadable, damaged, incomplete or was built for another configuration."""


def tail_bin_edges(vocab_size: int, top_k: int) -> list[int]:
    """Bin boundaries, as offsets into the descending-sorted tail (rank ``top_k + 1`` is offset 0)."""
    n, edges, width = vocab_size - top_k, [0], 1
    while edges[-1] < n:
        edges.append(min(n, edges[-1] + width))
        width *= TAIL_BIN_RATIO
    # A sliver of a last bin costs two numbers per token and says almost nothing the neighbour does not.
    if len(edges) > 3 and edges[-1] - edges[-2] < (edges[-2] - edges[-3]) // 2:
        del edges[-2]
    # The last bin spans most of the vocabulary; its bottom quarter (the skewed low end of a bell-shaped logit
    # histogram) gets its own bin, which keeps the Gaussian bin model accurate at T >= 2.
    if len(edges) > 2 and n - edges[-2] >= 8:
        edges.insert(-1, n - (n - edges[-2]) // 4)
    return edges


def _id_dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _check_top_k(top_k: int, vocab_size: int) -> None:
    if top_k < 1 or top_k > vocab_size:
        raise ValueError(f"method.top_k={top_k} exceeds the teacher vocabulary size {vocab_size} "
                         f"(it must be in [1, {vocab_size}])")


def summarize_logits(logits: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full logits (n, V) -> (topk_logits fp16 (n,k), topk_ids (n,k), tail fp16 (n, 2, B)), exactly as stored."""
    z = logits.detach().float()
    vals, ids = torch.topk(z - z.max(dim=-1, keepdim=True).values, top_k, dim=-1)
    vals16 = vals.to(torch.float16).cpu().numpy()
    edges = tail_bin_edges(z.shape[-1], top_k)
    stats = np.zeros((z.shape[0], 2, len(edges) - 1))
    if len(edges) > 1:
        # One multi-pivot partition puts each rank bin in a contiguous slice in O(V); a full sort is 2x slower.
        neg = np.partition((z.max(dim=-1, keepdim=True).values - z).cpu().numpy(), [top_k + e for e in edges[:-1]])
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            seg = -neg[:, top_k + lo:top_k + hi]
            # a = log-mean-exp at T=1 (so T=1 is exact), g = a - mean >= 0 (Jensen gap) sets the spread: each bin
            # gets the Gaussian log-partition log n + beta*(a - g) + beta^2*g (see doc). seg[:, 0] is the bin max.
            a = np.log(np.exp(seg - seg[:, :1]).mean(-1, dtype=np.float64)) + seg[:, 0]
            stats[:, 0, b], stats[:, 1, b] = a, np.maximum(a - seg.mean(-1, dtype=np.float64), 0)
        # a is stored relative to the stored k-th logit: fp16 is then precise where the tail mass lives (near it).
        stats[:, 0] -= vals16[:, -1:].astype(np.float64)
    return vals16, ids.cpu().numpy(), stats.astype(np.float16)


def _decode(vals16: np.ndarray, ids: np.ndarray, tail16: np.ndarray, log_n: np.ndarray) -> dict[str, torch.Tensor]:
    """Stored arrays -> reader rows; tail becomes (n, 3, B) = [a, g, log bin count] so it describes itself."""
    vals = torch.from_numpy(vals16.astype(np.float32))
    tail = torch.empty(tail16.shape[0], 3, tail16.shape[-1])
    tail[:, :2] = torch.from_numpy(tail16.astype(np.float32))
    tail[:, 0] += vals[:, -1:]
    tail[:, 2] = torch.from_numpy(log_n)
    return {"topk_logits": vals, "topk_ids": torch.from_numpy(ids.astype(np.int64)), "tail": tail}


def rows_from_logits(logits: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What reading the cache would return for these full logits (n, V), without touching disk."""
    return _decode(*summarize_logits(logits, top_k), _log_counts(tail_bin_edges(logits.shape[-1], top_k)))


def _log_counts(edges) -> np.ndarray:
    return np.log(np.diff(np.asarray(edges, np.float64))).astype(np.float32)


def _create_datasets(f: h5py.File, top_k: int, n_bins: int, id_dtype, compression) -> dict[str, h5py.Dataset]:
    opts = _filter_opts(compression)
    shapes = {"topk_logits": ((top_k,), np.float16), "topk_ids": ((top_k,), id_dtype),
              "tail": ((2, n_bins), np.float16)}
    return {name: f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                   chunks=(CHUNK_ROWS, *shape), **opts)
            for name, (shape, dtype) in shapes.items()}


def _append(dsets: dict[str, h5py.Dataset], buffers: dict[str, list]) -> None:
    for name, parts in buffers.items():
        if parts:
            block, ds = np.concatenate(parts), dsets[name]
            ds.resize(ds.shape[0] + block.shape[0], axis=0)
            ds[-block.shape[0]:] = block
            parts.clear()


def _write_rows(f: h5py.File, rows: Iterable, n_examples: int, vocab_size: int, top_k: int, compression,
                progress: bool) -> int:
    dsets = _create_datasets(f, top_k, len(tail_bin_edges(vocab_size, top_k)) - 1, _id_dtype(vocab_size),
                             compression)
    starts, counts = np.full(n_examples, -1, np.int64), np.zeros(n_examples, np.int64)
    buffers, n_tok, pending = {name: [] for name in dsets}, 0, 0
    for index, logits in tqdm(rows, total=n_examples, disable=not progress, desc="teacher cache", unit="ex"):
        index = int(index)
        if not 0 <= index < n_examples or starts[index] >= 0:
            raise ValueError(f"teacher cache rows: example index {index} is out of range or repeated")
        if logits.ndim != 2 or logits.shape[-1] != vocab_size:
            raise ValueError(f"teacher cache rows: example {index} logits shape {tuple(logits.shape)}, "
                             f"expected (n_tokens, {vocab_size})")
        vals, ids, tail = summarize_logits(logits, top_k)
        buffers["topk_logits"].append(vals)
        buffers["topk_ids"].append(ids.astype(dsets["topk_ids"].dtype))
        buffers["tail"].append(tail)
        starts[index], counts[index] = n_tok, len(vals)
        n_tok, pending = n_tok + len(vals), pending + len(vals)
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


def build_teacher_cache(path, rows, *, n_examples, vocab_size, top_k=64, compression="lzf", meta: dict,
                        progress=True) -> Path:
    """Write the cache for ``rows`` = iterable of (example_index, logits (n_i, vocab)) to ``path``, once.

    Through :func:`kdexp.core.artefacts.build_once`: a valid file with the same meta and shape already at ``path``
    (e.g. one a concurrent builder finished first) is kept, anything else is replaced atomically.
    """
    _build(Path(path), lambda: rows, n_examples=n_examples, vocab_size=vocab_size, top_k=top_k,
           compression=compression, meta=meta, progress=progress)
    return Path(path)


def _build(path: Path, make_rows: Callable[[], Iterable], *, n_examples, vocab_size, top_k, compression, meta,
           progress=True) -> list[TeacherCache]:
    """Build unless a cache that verifies and matches is there; returns [that cache, opened] or [] (built here)."""
    _check_top_k(top_k, vocab_size)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    shape, opened = (n_examples, vocab_size, top_k), []

    def write(tmp: Path) -> None:
        # The 1.10 file format checksums HDF5's own metadata (object headers, attributes, chunk index) as well.
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            n_tok = _write_rows(f, make_rows(), n_examples, vocab_size, top_k, compression, progress)
            f.attrs.update({"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "top_k": top_k,
                            "n_examples": n_examples, "n_tokens": n_tok, "compression": str(compression),
                            "tail_bin_edges": np.asarray(tail_bin_edges(vocab_size, top_k), np.int64)})
            # Last, so a reader can trust a file that has them: a crash before this leaves no complete flag.
            f.attrs["complete"] = True
            f.attrs["meta"] = _meta_json(meta)
        with open(tmp, "rb") as fh:  # a power cut after the rename must not leave a complete-flagged file of garbage
            os.fsync(fh.fileno())

    build_once(path, write, ready=lambda p: _reusable(p, meta, shape, opened), what=f"teacher cache {path}")
    return opened


def _reusable(path: Path, meta: dict | None, shape: tuple[int, int, int], opened: list) -> bool:
    """``build_once``'s ready check: open ``path`` (every checksum verified) into ``opened`` if it can serve as this
    cache; a file that cannot is rebuilt with a warning saying why."""
    if not path.exists():
        log.info("building teacher cache %s", path)
        return False
    try:
        cache = open_teacher_cache(path, expected_meta=meta)
        got = (cache.n_examples, cache.vocab_size, cache.top_k)
        if got != shape:
            raise CacheInvalid(f"it holds (n_examples, vocab_size, top_k)={got}, expected {shape}")
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
        self.n_examples, self.vocab_size, self.top_k = (int(attrs[k]) for k in ("n_examples", "vocab_size", "top_k"))
        self.meta = json.loads(attrs["meta"])
        self._log_n = _log_counts(attrs["tail_bin_edges"])
        self._starts, self._counts = starts, counts
        self._h5, self._pid, self._dsets = None, None, ()

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
                self._dsets = tuple(self._h5[name] for name in ("topk_logits", "topk_ids", "tail"))
            return _decode(*(ds[sl] for ds in self._dsets), self._log_n)
        except (OSError, RuntimeError, KeyError) as e:  # a chunk failing its checksum raises OSError
            raise CacheInvalid(f"teacher cache {self.path}: example {i} cannot be read, the file was damaged after "
                               f"it was opened ({_first_line(e)}); the next run rebuilds it") from e

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._dsets = None, ()

    def __getstate__(self):
        return {**self.__dict__, "_h5": None, "_pid": None, "_dsets": ()}


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
            for name in ("topk_logits", "topk_ids", "tail"):
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
                                compression, meta) -> TeacherCache:
    """Reuse a valid cache whose meta and shape match (checksums verified once, under the lock); otherwise (re)build
    it, warning when a file was replaced."""
    # make_rows is called only if build_once decides to build: a reused cache never runs the teacher.
    opened = _build(Path(path), make_rows, n_examples=n_examples, vocab_size=vocab_size, top_k=top_k,
                    compression=compression, meta=meta)
    return opened[0] if opened else open_teacher_cache(path, expected_meta=meta)


def collate_cache_rows(rows: list[dict], window: int) -> dict[str, torch.Tensor]:
    """Stack examples into (B, window, ...) right-aligned: example rows fill the last n_i slots; see cache_mask."""
    out = {name: rows[0][name].new_zeros(len(rows), window, *rows[0][name].shape[1:])
           for name in ("topk_logits", "topk_ids", "tail")}
    mask = torch.zeros(len(rows), window, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = row["topk_logits"].shape[0]
        if n > window:
            raise ValueError(f"an example has {n} cached answer tokens but the window is {window}")
        for name in out:
            out[name][b, window - n:] = row[name]
        mask[b, window - n:] = True
    return {**out, "cache_mask": mask}


def _tail_terms(rows: dict, temperature: float):
    """Per token: log-partition of the top-k part and of the tail at beta = 1/T, and the tail's mean logit."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    beta, vals, tail = 1.0 / temperature, rows["topk_logits"].float(), rows["tail"].float()
    a, g, log_n = tail[..., 0, :], tail[..., 1, :], tail[..., 2, :]
    k_bins = log_n + beta * (a - g) + beta**2 * g  # Gaussian log-partition of each bin, exact at beta = 0 and 1
    lse_top = torch.logsumexp(beta * vals, dim=-1)
    if tail.shape[-1] == 0:
        return lse_top, torch.full_like(lse_top, -math.inf), torch.zeros_like(lse_top), torch.zeros_like(lse_top)
    lse_tail = torch.logsumexp(k_bins, dim=-1)
    mean_z = (torch.softmax(k_bins, dim=-1) * (a - g + 2 * beta * g)).sum(-1)  # d lse_tail / d beta
    return lse_top, lse_tail, mean_z, torch.logsumexp(log_n, dim=-1)


def shared_tail_logit(batch: dict, vocab_size: int, temperature: float) -> torch.Tensor:
    """(...,) the one logit every tail id gets, chosen so the tail's total tempered mass equals the stored one."""
    _, lse_tail, _, _ = _tail_terms(batch, temperature)
    n_tail = vocab_size - batch["topk_logits"].shape[-1]
    return temperature * (lse_tail - math.log(n_tail)) if n_tail else torch.zeros_like(lse_tail)


def teacher_logits_from_cache(batch: dict, vocab_size: int, temperature: float) -> torch.Tensor:
    """Effective logits z (..., V) float32 with softmax(z / temperature) = reconstructed teacher p_T (this T only)."""
    vals, ids = batch["topk_logits"].float(), batch["topk_ids"].long()
    shared = shared_tail_logit(batch, vocab_size, temperature)
    z = shared.unsqueeze(-1).expand(*shared.shape, vocab_size).clone()
    z.scatter_(-1, ids, vals)
    if "cache_mask" in batch:
        z = z.masked_fill(~batch["cache_mask"].to(z.device).unsqueeze(-1), 0.0)
    return z


def reconstruct_teacher_probs(rows_or_batch: dict, vocab_size: int, temperature: float) -> torch.Tensor:
    """The full-vocabulary reconstructed teacher distribution p_T (..., V), for analysis; padding slots are 0.

    Normalised analytically: a float32 softmax over ~V identical tail logits accumulates a ~1e-4 rounding bias.
    """
    vals, ids = rows_or_batch["topk_logits"].float(), rows_or_batch["topk_ids"].long()
    lse_top, lse_tail, _, _ = _tail_terms(rows_or_batch, temperature)
    lse_all = torch.logaddexp(lse_top, lse_tail)
    n_tail = vocab_size - vals.shape[-1]
    tail_p = torch.exp(lse_tail - math.log(n_tail) - lse_all) if n_tail else torch.zeros_like(lse_all)
    p = tail_p.unsqueeze(-1).expand(*tail_p.shape, vocab_size).clone()
    p.scatter_(-1, ids, torch.exp(vals / temperature - lse_all.unsqueeze(-1)))
    if "cache_mask" in rows_or_batch:
        p = p.masked_fill(~rows_or_batch["cache_mask"].to(p.device).unsqueeze(-1), 0.0)
    return p


def tail_entropy_correction(batch: dict, temperature: float) -> torch.Tensor:
    """Per token: true sum_tail p log p minus the reconstructed (uniform-tail) one = m_T * KL(tail || uniform) >= 0.

    Add it to a forward KL computed from ``teacher_logits_from_cache`` to get the true teacher-entropy part (up to
    the tail-summary error). Forward KL only; padding slots (cache_mask False) get 0.
    """
    lse_top, lse_tail, mean_z, log_n_tail = _tail_terms(batch, temperature)
    if batch["tail"].shape[-1] == 0:
        return torch.zeros_like(lse_top)
    # sum_tail p log p = m * (beta * E_tail[z] - lse_all); the uniform one is m * (log m - log n_tail).
    mass = torch.exp(lse_tail - torch.logaddexp(lse_top, lse_tail))
    corr = (mass * (mean_z / temperature - lse_tail + log_n_tail)).clamp_min(0)
    if "cache_mask" in batch:
        corr = corr * batch["cache_mask"].to(corr.device)
    return corr


def cached_forward_kl_error_report(teacher_logits, student_logits, *, top_k, temperatures=(1, 2, 4),
                                   chunk_rows: int = 64) -> dict[str, float]:
    """Mean |cached - full| forward KL(p_T || p_S) in nats per token, for full logits (N, V) of both models.

    The cached loss uses exactly what the cache would store (fp16 top-k + tail summary), the uniform-tail
    reconstruction and ``tail_entropy_correction``; student and teacher are both tempered by T, no T^2 factor.
    """
    vocab = teacher_logits.shape[-1]
    teacher_logits, student_logits = teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab)
    total = {f"{t:g}": 0.0 for t in temperatures}
    _check_top_k(top_k, vocab)
    for lo in range(0, teacher_logits.shape[0], chunk_rows):
        teacher, student = teacher_logits[lo:lo + chunk_rows].float(), student_logits[lo:lo + chunk_rows].float()
        rows = {k: v.to(teacher.device) for k, v in rows_from_logits(teacher, top_k).items()}
        for t in temperatures:
            full = forward_kl(student, teacher, temperature=t, reduction="none")
            cached = forward_kl(student, teacher_logits_from_cache(rows, vocab, t), temperature=t, reduction="none")
            cached = cached + tail_entropy_correction(rows, t)
            total[f"{t:g}"] += (cached - full).abs().sum().item()
    return {k: v / max(teacher_logits.shape[0], 1) for k, v in total.items()}
