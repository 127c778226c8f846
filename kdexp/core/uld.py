"""Universal Logit Distillation (ULD, Boizard et al. 2024): logit KD between two different vocabularies.

A teacher and a student with different tokenizers have probability vectors over different, unmatched ids. ULD
compares what survives without an id matching: the *sorted* probability vectors. Per aligned answer position
(kdexp/core/alignment.py), with p_T and q_S sorted in descending order and the shorter one padded with zeros to the
longer vocabulary V = max(V_T, V_S):

    W1(p_T, q_S) = Σ_{i=1..V} |p_T,(i) − q_S,(i)|

the closed form of the Wasserstein-1 distance between the two sorted vectors (Boizard et al., Eq. 5) with unit cost
between ranks. It is symmetric (no KL direction), in [0, 2], 0 iff the sorted vectors are equal, and invariant to any
permutation of either vocabulary: it matches the *shape* (confidence, entropy profile) of the teacher's
distribution, not which token gets the mass. The token itself is taught by CE on gold (and by the teacher's answers
on the transfer set); the KD1 loss is assembled by :func:`kdexp.core.losses.blend`:
``L = (1 − alpha)·CE + alpha·T²·W1``. The temperature applies to both sides (``softmax(z / T)``) as for every other
divergence; ``blend`` multiplies by T² (the paper uses T = 1 and weights CE 1, W1 λ).

Shapes: logits ``(batch, seq, V_S)`` / ``(batch, seq, V_T)`` or ``(N, V)``, any float dtype, computed in float32;
``mask`` ``(batch, seq)``; reductions as in kdexp/core/losses.py: ``"sum"`` over counted tokens, ``"mean"`` divided by
their number, ``"none"`` the per-token values.

A span of several tokens (``method.alignment=offsets``) is one joint event: its vector is the span's first
position's distribution scaled by the probability of the span's remaining actual tokens, ``p(v)·Π_{j>1} p_j(x_j)``
(the probability that the span's text starts with token v and then continues as written), sorted.

The teacher cache (kdexp/core/teacher_cache.py) stores no ids ULD would need: :func:`sorted_probs_from_cache` builds
the sorted teacher vector from the top-k head and the tail summary's rank bins, each bin's mass spread evenly over
its ranks (docs/cross_tokenizer.md measures the error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdexp.core.teacher_cache import reconstruct_teacher_probs, rows_from_logits

_REDUCTIONS = ("mean", "sum", "none")


def sorted_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / T)`` over the last dim, float32, sorted in descending order; differentiable."""
    return torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values


def w1_sorted(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Σ_i |p_(i) − q_(i)|`` per row for descending-sorted (N, V_p) and (N, V_q), the shorter zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def uld(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """ULD distance ``W1(sort p_T, sort p_S)`` per token, over position-aligned rows of two vocabularies.

    ``student_logits`` (..., V_S) and ``teacher_logits`` (..., V_T) share every dim but the last; ``mask`` (...) as
    in kdexp/core/losses.py; ``chunk_size`` rows are sorted at a time. Returns a float32 scalar (or (N,) for
    ``"none"``). No T² here: :func:`kdexp.core.losses.blend` applies it.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student/teacher positions differ: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).to(device=student.device, dtype=torch.bool)
        student, teacher = student[keep], teacher[keep]
    step = chunk_size or max(student.shape[0], 1)
    values = torch.cat([w1_sorted(sorted_probs(teacher[i:i + step], temperature),
                                  sorted_probs(student[i:i + step], temperature))
                        for i in range(0, max(student.shape[0], 1), step)])[:student.shape[0]]
    if reduction == "none":
        return values
    return values.sum() / max(values.shape[0], 1) if reduction == "mean" else values.sum()


def _span_scale(logp_rest_actual: torch.Tensor, rest_span: torch.Tensor, n_spans: int) -> torch.Tensor:
    """(K,) Σ over each span's non-first positions of log p(actual token); 0 for one-token spans."""
    return logp_rest_actual.new_zeros(n_spans).index_add(0, rest_span, logp_rest_actual)


def span_probs(logits: torch.Tensor, actual_ids: torch.Tensor, first: torch.Tensor, rest: torch.Tensor,
               rest_span: torch.Tensor, temperature: float) -> torch.Tensor:
    """(K, V) descending joint probabilities of K spans from flat slots: ``logits`` (S, V) and ``actual_ids`` (S,)
    the tokens that were fed; ``first`` (K,) each span's first slot; ``rest`` / ``rest_span`` (R,) the other slots
    and the span they belong to (kdexp.core.alignment.span_index)."""
    scale = _span_scale(
        torch.log_softmax(logits[rest].float() / temperature, -1).gather(-1, actual_ids[rest, None]).squeeze(-1),
        rest_span, first.shape[0])
    return sorted_probs(logits[first], temperature) * scale.exp().unsqueeze(-1)


def sorted_probs_from_cache(rows: dict, temperature: float) -> torch.Tensor:
    """(N, V_T) descending teacher probabilities from cache rows (``topk_logits`` (N, k), ``tail`` (N, 3, B)).

    The head is exact (fp16 logits); tail rank bin b, which holds the n_b logits ranked within its edges, gets its
    modelled mass ``exp(K_b(β) − F)`` spread evenly over its n_b ranks, with the bin log-partition
    ``K_b(β) = log n_b + β(a_b − g_b) + β² g_b`` of docs/teacher_cache.md and ``F`` the total. ULD needs no ids, so
    the rank bins place the tail mass where it really sits in the sorted vector, not uniformly over all V − k ranks.
    """
    beta, vals, tail = 1.0 / temperature, rows["topk_logits"].float(), rows["tail"].float()
    a, g, log_n = tail[..., 0, :], tail[..., 1, :], tail[..., 2, :]
    k_bins = log_n + beta * (a - g) + beta**2 * g
    total = torch.logaddexp(torch.logsumexp(beta * vals, -1), torch.logsumexp(k_bins, -1)).unsqueeze(-1)
    counts = log_n[0].exp().round().long() if log_n.shape[0] else log_n.new_zeros(0).long()
    per_rank = torch.repeat_interleave((k_bins - log_n - total).exp(), counts, dim=-1)
    probs = torch.cat([(beta * vals - total).exp(), per_rank], -1)
    # Head and rank bins come in rank order, so this is sorted already unless the bin model bends it; a 50k-wide sort
    # costs ~10x the softmax on CPU, so pay for it only then.
    return probs if bool((probs[..., :-1] >= probs[..., 1:]).all()) else probs.sort(dim=-1, descending=True).values


def span_probs_from_cache(rows: dict, actual_ids: torch.Tensor, first: torch.Tensor, rest: torch.Tensor,
                          rest_span: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """:func:`span_probs` for a cached teacher: ``rows`` flat (S, ...) cache rows. A non-first token's probability
    is its head probability, or the uniform-tail one when it is not in the top-k."""
    rest_rows = {k: v[rest] for k, v in rows.items()}
    p_rest = reconstruct_teacher_probs(rest_rows, vocab_size, temperature)
    logp = p_rest.gather(-1, actual_ids[rest, None]).squeeze(-1).clamp_min(1e-30).log()
    scale = _span_scale(logp, rest_span, first.shape[0])
    return sorted_probs_from_cache({k: v[first] for k, v in rows.items()}, temperature) * scale.exp().unsqueeze(-1)


def cached_uld_error_report(teacher_logits, student_logits, *, top_k: int, temperatures=(1, 2, 4)) -> dict:
    """Mean |cached − full| ULD distance per token for full logits (N, V_T) / (N, V_S), three ways of filling the
    tail of the sorted teacher vector: ``bins`` (what KD1 uses), ``uniform`` (one value over all V − k ranks, as the
    KL path reconstructs it) and ``dropped`` (head only: the tail's mass is lost)."""
    teacher, student = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float(), student_logits.float()
    student = student.reshape(-1, student.shape[-1])
    rows, vocab = rows_from_logits(teacher, top_k), teacher.shape[-1]
    out = {}
    for t in temperatures:
        q = sorted_probs(student, t)
        full = w1_sorted(sorted_probs(teacher, t), q)
        ways = {"bins": sorted_probs_from_cache(rows, t),
                "uniform": reconstruct_teacher_probs(rows, vocab, t).sort(-1, descending=True).values,
                "dropped": F.pad(sorted_probs_from_cache(rows, t)[:, :top_k], (0, vocab - top_k))}
        for name, p in ways.items():
            out[f"T={t:g} {name}"] = (w1_sorted(p, q) - full).abs().mean().item()
        out[f"T={t:g} full"] = full.mean().item()
    return out
