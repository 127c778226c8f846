"""How far a cached sparse teacher target is from full-vocabulary forward KL: loss error and gradient cosine.

Used by the KD1 bench and the cache tests on real or synthetic full logits (N, V) of a teacher and a student; the
cached side goes through exactly what a cache stores (:func:`kdexp.core.teacher_cache.rows_from_logits`) and what
training computes from it (:func:`kdexp.core.sparse_target.cached_forward_kl_estimate`, or its dense equivalent for
per-token values).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import h5py
import torch

from kdexp.core.losses import forward_kl
from kdexp.core.sparse_target import (
    CACHE_MODES,
    sampled_forward_kl,
    tail_entropy_correction,
    teacher_log_partition,
    teacher_logits_from_cache,
)
from kdexp.core.teacher_cache import Layout, build_teacher_cache, rows_from_logits

MODES = CACHE_MODES


def mode_layout(mode: str, ids: int) -> tuple[int, int]:
    """(top_k, samples) storing ``ids`` ids per token in a cache mode: all head, half head + half sampled, or all
    sampled (how the bench compares modes at one id budget)."""
    return {"head_uniform": (ids, 0), "head_sampled": (ids // 2, ids - ids // 2), "sampled": (0, ids)}[mode]


def _cached_per_token(student: torch.Tensor, rows: dict, vocab: int, t: float) -> torch.Tensor:
    """(N,) the cached forward KL per token, differentiable in ``student`` (N, V)."""
    if "sample_ids" in rows:
        mask = torch.ones(student.shape[0], dtype=torch.bool)
        return sampled_forward_kl(student, rows["topk_logits"], rows["topk_ids"], rows["sample_ids"],
                                  rows["sample_logits"], rows["sample_logw"], teacher_log_partition(rows, t),
                                  temperature=t, mask=mask, reduction="none")
    z = teacher_logits_from_cache(rows, vocab, t)
    return forward_kl(student, z, temperature=t, reduction="none") + tail_entropy_correction(rows, t)


def sparse_target_report(teacher_logits, student_logits, *, top_k: int, samples: int = 0,
                         sample_temperature: float = 1.0, seed: int = 0, temperatures=(1, 2, 4),
                         chunk_rows: int = 64) -> dict[str, dict[str, float]]:
    """Per temperature ("1", "2", ...): ``abs_error`` = mean |cached − full| forward KL per token (nats),
    ``mean_error`` = mean(cached) − mean(full) over the tokens (what an unbiased target drives to 0), and
    ``grad_cosine`` = cosine between the gradients of the summed cached and full losses w.r.t. the student's
    logits (all tokens as one vector). Student and teacher both tempered by T, no T² factor."""
    vocab = teacher_logits.shape[-1]
    Layout(vocab, top_k, samples, sample_temperature, seed).check()
    teacher_logits, student_logits = teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab)
    sums = {f"{t:g}": dict.fromkeys(("abs", "signed", "dot", "full2", "cached2"), 0.0) for t in temperatures}
    for lo in range(0, teacher_logits.shape[0], chunk_rows):
        teacher = teacher_logits[lo:lo + chunk_rows].detach().float()
        rows = rows_from_logits(teacher, top_k, samples=samples, sample_temperature=sample_temperature,
                                seed=seed, index=lo)
        for t in temperatures:
            student = student_logits[lo:lo + chunk_rows].detach().float().requires_grad_(True)
            with torch.enable_grad():  # callers (the bench) may run under no_grad
                full = forward_kl(student, teacher, temperature=t, reduction="none")
                (g_full,) = torch.autograd.grad(full.sum(), student)
                cached = _cached_per_token(student, rows, vocab, t)
                (g_cached,) = torch.autograd.grad(cached.sum(), student)
            s, diff = sums[f"{t:g}"], (cached - full).detach()
            s["abs"] += diff.abs().sum().item()
            s["signed"] += diff.sum().item()
            s["dot"] += (g_full * g_cached).sum().item()
            s["full2"] += g_full.square().sum().item()
            s["cached2"] += g_cached.square().sum().item()
    n = max(teacher_logits.shape[0], 1)
    return {key: {"abs_error": s["abs"] / n, "mean_error": s["signed"] / n,
                  "grad_cosine": s["dot"] / max(math.sqrt(s["full2"] * s["cached2"]), 1e-30)}
            for key, s in sums.items()}


def cached_forward_kl_error_report(teacher_logits, student_logits, *, top_k, temperatures=(1, 2, 4),
                                   chunk_rows: int = 64) -> dict[str, float]:
    """Mean |cached − full| forward KL(p_T ‖ p_S) in nats per token of the head + uniform-tail target, for full
    logits (N, V) of both models (fp16 top-k + tail summary, uniform tail + ``tail_entropy_correction``)."""
    report = sparse_target_report(teacher_logits, student_logits, top_k=top_k, temperatures=temperatures,
                                  chunk_rows=chunk_rows)
    return {t: figures["abs_error"] for t, figures in report.items()}


def stored_bytes_per_token(path) -> float:
    """Bytes per token a cache file's datasets take on disk (compressed chunks + checksums), without the file's fixed
    HDF5 overhead, which a real cache of thousands of tokens amortises but a small measurement would not."""
    with h5py.File(path, "r", locking=False) as f:
        return sum(ds.id.get_storage_size() for ds in f.values()) / int(f.attrs["n_tokens"])


def bytes_per_token_by_mode(teacher_logits, *, ids=(64, 128), compression="lzf", sample_temperature=1.0,
                            seed=0) -> dict[str, dict[str, float]]:
    """mode -> id budget K -> stored bytes per token of a cache of ``teacher_logits`` (N, V), one token per example
    (SST-2's layout), at ``mode_layout(mode, K)``."""
    rows = [(i, teacher_logits[i:i + 1]) for i in range(teacher_logits.shape[0])]
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            for k in ids:
                top_k, samples = mode_layout(mode, k)
                path = build_teacher_cache(Path(tmp) / f"{mode}-{k}.h5", rows, n_examples=len(rows),
                                           vocab_size=teacher_logits.shape[-1], top_k=top_k, samples=samples,
                                           sample_temperature=sample_temperature, sample_seed=seed,
                                           compression=compression, meta={}, progress=False)
                out.setdefault(mode, {})[str(k)] = stored_bytes_per_token(path)
    return out
