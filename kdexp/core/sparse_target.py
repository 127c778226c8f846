"""Sparse teacher targets read from cache rows: the uniform-tail reconstruction, and sampled tails (drawn at build
time) with the forward-KL estimator that reads them.

Build time (:func:`sample_tail`): per token, S ids drawn by systematic sampling from the teacher's distribution at
the proposal temperature T_s restricted to the ids outside the exact head, r(v) = e^{u_v / T_s - L_s}, with their
logits and the exact log-partition L_s; when S covers the whole remaining set, every id is stored once instead. Read
time (:func:`sampled_forward_kl`): importance weights turn those ids into an unbiased estimate of forward KL and of
its gradient at any T, given the teacher's log-partition F(1/T). Derivation and what is only consistent:
docs/teacher_cache.md ("Sampled tail").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdexp.core.losses import cached_forward_kl

SAMPLE_DESIGNS = ("systematic", "all")  # systematic: S draws on one stratified grid; all: each remaining id once
# What a cache keeps of a token's distribution besides the tail summary (method.cache_mode, docs/teacher_cache.md).
CACHE_MODES = ("head_uniform", "head_sampled", "sampled")
TAIL_BIN_RATIO = 4  # bin widths 1, 4, 16, ... over the sorted tail; see the doc for the accuracy/size trade-off


def cache_layout(mode: str, top_k: int, samples: int) -> tuple[int, int]:
    """(head size, sampled ids) per token for a cache mode: the exact top_k only, top_k + samples, or samples only."""
    if mode not in CACHE_MODES:
        raise ValueError(f"method.cache_mode={mode!r} must be one of {', '.join(CACHE_MODES)}")
    return {"head_uniform": (top_k, 0), "head_sampled": (top_k, samples), "sampled": (0, samples)}[mode]


# ---- build time: what is stored per token ------------------------------------------------------------------------

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


def summarize_logits(logits: torch.Tensor, top_k: int, *, samples: int = 0, sample_temperature: float = 1.0,
                     rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Full logits (n, V) -> the arrays stored for them, ids not yet packed: topk_logits fp16 (n, k), topk_ids
    (n, k), tail fp16 (n, 2, B); with ``samples``: sample_ids (n, S), sample_logits fp16 (n, S), sample_lse (n,)."""
    z = logits.detach().float()
    shifted = z - z.max(dim=-1, keepdim=True).values
    vals, ids = torch.topk(shifted, top_k, dim=-1)
    vals16, ids = vals.to(torch.float16).cpu().numpy(), ids.cpu().numpy()
    out = {"topk_logits": vals16, "topk_ids": ids, "tail": _tail_summary(shifted.cpu().numpy(), top_k, vals16)}
    if samples:
        # Sample from the logits as stored (fp16), so the proposal the reader rebuilds is the one drawn from.
        u16 = shifted.to(torch.float16).float().cpu().numpy()
        out["sample_ids"], out["sample_logits"], out["sample_lse"] = sample_tail(
            u16, ids, samples, sample_temperature, rng if rng is not None else np.random.default_rng(0))
    return out


def _tail_summary(shifted: np.ndarray, top_k: int, vals16: np.ndarray) -> np.ndarray:
    n, vocab = shifted.shape
    edges = tail_bin_edges(vocab, top_k)
    stats = np.zeros((n, 2, len(edges) - 1))
    if len(edges) > 1:
        # One multi-pivot partition puts each rank bin in a contiguous slice in O(V); a full sort is 2x slower.
        neg = np.partition(-shifted, [top_k + e for e in edges[:-1]])
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            seg = -neg[:, top_k + lo:top_k + hi]
            # a = log-mean-exp at T=1 (so T=1 is exact), g = a - mean >= 0 (Jensen gap) sets the spread: each bin
            # gets the Gaussian log-partition log n + beta*(a - g) + beta^2*g (see doc). seg[:, 0] is the bin max.
            a = np.log(np.exp(seg - seg[:, :1]).mean(-1, dtype=np.float64)) + seg[:, 0]
            stats[:, 0, b], stats[:, 1, b] = a, np.maximum(a - seg.mean(-1, dtype=np.float64), 0)
        # a is stored relative to the stored k-th logit: fp16 is then precise where the tail mass lives (near it).
        stats[:, 0] -= reference_logit(vals16)
    return stats.astype(np.float16)


def reference_logit(vals) -> np.ndarray:
    """(n, 1) the stored k-th logit, or the row max (0) when there is no head."""
    return vals[:, -1:].astype(np.float64) if vals.shape[-1] else np.zeros((vals.shape[0], 1))




def sample_design(vocab_size: int, top_k: int, samples: int) -> str:
    return "all" if samples >= vocab_size - top_k else "systematic"


def sample_tail(u: np.ndarray, head_ids: np.ndarray, samples: int, temperature: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the stored tail sample of each row of ``u``.

    ``u`` (n, V): the logits exactly as stored (fp16-rounded, row max 0), so the proposal the reader reconstructs is
    the one sampled from; ``head_ids`` (n, k) are excluded. Returns ids (n, S) int64 sorted per row, their logits
    (n, S) float16 (``-inf`` on padding slots of the ``all`` design) and L_s = log Σ_{v ∉ head} e^{u_v / T_s} (n,)
    float32, exact (the reader's log-partition at T_s).
    """
    n, vocab = u.shape
    rows = np.arange(n)[:, None]
    logit = u.astype(np.float64) / temperature
    logit[rows, head_ids] = -np.inf
    top = logit.max(-1, keepdims=True) if vocab > head_ids.shape[1] else np.zeros((n, 1))
    cdf = np.cumsum(np.exp(logit - top), axis=-1)
    with np.errstate(divide="ignore"):  # nothing left outside the head: L_s = -inf
        lse = (top[:, 0] + np.log(cdf[:, -1])).astype(np.float32)
    if sample_design(vocab, head_ids.shape[1], samples) == "all":
        rest = np.nonzero(np.isfinite(logit))[1].reshape(n, vocab - head_ids.shape[1])
        ids = np.zeros((n, samples), np.int64)
        ids[:, :rest.shape[1]] = rest
        vals = np.full((n, samples), -np.inf, np.float16)
        vals[:, :rest.shape[1]] = u[rows, rest]
        return ids, vals, lse
    # Systematic draws: one uniform offset per row, then S evenly spaced points on the CDF. Each draw alone is uniform
    # (so every id is drawn r(v) S times on average: unbiased), but counts are floor/ceil of S r(v), far less noisy
    # than i.i.d. draws. Inverse CDF: an id of zero mass (a head id) never has cdf[i] > draw >= cdf[i - 1].
    draws = (rng.random((n, 1)) + np.arange(samples)) / samples * cdf[:, -1:]
    ids = np.stack([np.searchsorted(c, d, side="right") for c, d in zip(cdf, draws, strict=True)]).reshape(n, samples)
    ids = np.sort(np.minimum(ids, vocab - 1), axis=-1)
    return ids, u[rows, ids].astype(np.float16), lse


def sample_log_weights(sample_logits: torch.Tensor, sample_lse: torch.Tensor, temperature: float,
                       design: str) -> torch.Tensor:
    """log(1 / (S r(x_j))) per slot (..., S): the importance factor that turns draws from r into sums over the tail."""
    if design == "all":
        return torch.zeros_like(sample_logits)
    n_samples = sample_logits.shape[-1]
    return sample_lse.unsqueeze(-1) - math.log(n_samples) - sample_logits / temperature


def sampled_forward_kl(student_logits, head_logits, head_ids, sample_ids, sample_logits, sample_logw, log_partition,
                       *, temperature: float, mask, reduction: str = "sum") -> torch.Tensor:
    """Σ over masked tokens of an estimate of forward ``KL(p_T‖p_S)`` from a head-plus-sampled-tail teacher target.

    Shapes: ``student_logits`` (B, A, V); ``head_logits`` / ``head_ids`` (B, A, k) the exact head (k may be 0);
    ``sample_ids`` / ``sample_logits`` / ``sample_logw`` (B, A, S) the stored draws, their logits and
    log(1 / (S r(x_j))) (:func:`sample_log_weights`); ``log_partition`` (B, A) the teacher's F(β) = log Σ_v e^{β u_v},
    β = 1/T; ``mask`` (B, A). Both sides tempered by T, no T² factor; ``reduction="none"`` gives one value per masked
    token (N,). With log p = β u − F and q = p_S:

        KL̂ = Σ_head p_h (log p_h − log q_h) + Σ_j π_j (log p_{x_j} − log q_{x_j}),   π_j = p_{x_j} / (S r(x_j))

    E[KL̂] = KL and E[∇KL̂] = ∇KL when F is exact (docs/teacher_cache.md). Only the student's log-softmax is
    vocabulary-sized.
    """
    keep = mask.bool()
    beta = 1.0 / temperature
    logq = torch.log_softmax(student_logits[keep].float() * beta, dim=-1)
    ids = torch.cat([head_ids[keep], sample_ids[keep]], -1).long()
    logp = torch.cat([head_logits[keep], sample_logits[keep]], -1).float() * beta - log_partition[keep].unsqueeze(-1)
    logw = torch.cat([torch.zeros_like(head_logits[keep]), sample_logw[keep]], -1).float()
    weight = torch.exp(logp + logw)
    # Padding slots carry u = -inf: weight 0, and 0 * (-inf) must not become NaN.
    live = weight > 0
    terms = torch.where(live, weight * (torch.where(live, logp, 0.0) - logq.gather(-1, ids)), 0.0)
    per_token = terms.sum(-1)
    return per_token if reduction == "none" else per_token.sum()


# ---- the uniform-tail reconstruction (head_uniform) and the teacher's log-partition -----------------------------

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


def teacher_log_partition(rows: dict, temperature: float) -> torch.Tensor:
    """(...,) F(1/T) = log Σ_v e^{u_v / T} over the whole vocabulary: head exact, tail from the summary, or exact at
    the sampling temperature T_s where the rows carry ``tail_exact`` (the stored log-partition of a sampled cache)."""
    lse_top, lse_tail, _, _ = _tail_terms(rows, temperature)
    if "tail_exact" in rows:
        beta_s, exact = rows["tail_exact"][..., 0], rows["tail_exact"][..., 1]
        lse_tail = torch.where((beta_s - 1.0 / temperature).abs() <= 1e-6 * beta_s, exact, lse_tail)
    return torch.logaddexp(lse_top, lse_tail)


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


def cached_forward_kl_estimate(student_logits, rows: dict, *, vocab_size: int, temperature: float,
                               mask) -> torch.Tensor:
    """Σ over masked tokens of forward ``KL(p_T‖p_S)`` against cache rows (B, A, ...), student (B, A, V), mask (B, A).

    Rows with a sampled tail: :func:`sampled_forward_kl` (unbiased; docs/teacher_cache.md). Head-only rows: the
    uniform-tail reconstruction (``kdexp.core.losses.cached_forward_kl``, no (B, A, V) teacher tensor) plus
    :func:`tail_entropy_correction`, so the value is the full-vocabulary one up to the tail's cross term.
    """
    if "sample_ids" in rows:
        return sampled_forward_kl(student_logits, rows["topk_logits"], rows["topk_ids"], rows["sample_ids"],
                                  rows["sample_logits"], rows["sample_logw"], teacher_log_partition(rows, temperature),
                                  temperature=temperature, mask=mask)
    tail = shared_tail_logit(rows, vocab_size, temperature)
    kd = cached_forward_kl(student_logits, rows["topk_logits"], rows["topk_ids"], tail, temperature=temperature,
                           mask=mask, vocab_size=vocab_size)
    # The uniform tail misstates the teacher's entropy, a student-independent constant: corrected so logged values
    # match the full-vocabulary loss.
    return kd + (tail_entropy_correction(rows, temperature) * mask).sum()
