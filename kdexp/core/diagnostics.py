"""Per-run KD diagnostics (results.json ``diagnostics``, the W&B summary, the report): how much of the teacher's
distribution a top-k cache keeps at the run's T, how closely the student follows the teacher on eval, and how well
calibrated the student is.

- ``teacher_top_k_mass`` / ``teacher_tail_mass``: mean over the cached answer tokens of the teacher's tempered
  probability mass on its top-k ids and on the other V − k ids (they sum to 1), read from the KD1 logit cache at
  the run's temperature (the tail's log-partition comes from the cache's tail summary); ``tail_samples``: the
  cache's sampled tail ids per token (0: head + uniform tail).
- ``top1_agreement``: fraction of eval answer tokens (teacher-forced on gold) where the student's argmax is the
  teacher's; ``top_k_overlap``: mean |top-k_S ∩ top-k_T| / k there, k = ``overlap_k``.
- ``student_ece``: expected calibration error of the student's next-token prediction on the same tokens (confidence
  = the largest softmax probability at T = 1, correct = that token is the gold one), ``ece_bins`` equal-width bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kdexp.core.live import token_disagreements
from kdexp.core.models import answer_logits, collate, encode
from kdexp.core.teacher_cache import shared_tail_logit

OVERLAP_K = 10  # the head where the student's ranking matters; the teacher-eval cache stores this many ids
ECE_BINS = 15
MASS_MAX_EXAMPLES = 4096  # cache examples read for the mass figures: bounded time, stable to ~1e-3


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)| over ``n_bins`` equal-width confidence bins.

    ``confidence`` (N,) in [0, 1], ``correct`` (N,) bool. Bin b holds confidences in ((b−1)/n, b/n] (a confidence
    of exactly 0 falls in the first bin), as in Guo et al. 2017. Empty input → NaN.
    """
    confidence, correct = confidence.double().flatten(), correct.double().flatten()
    if confidence.numel() == 0:
        return math.nan
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.double).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.double).index_add_(0, bins, correct)
    # |B_b| · |acc_b − conf_b| = |Σ_b correct − Σ_b confidence|
    return float((conf_sum - acc_sum).abs().sum() / confidence.numel())


def agreement(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, k: int = OVERLAP_K) -> dict[str, float]:
    """Sums over N tokens: ``top1`` (student argmax == teacher's first id) and ``overlap`` (|top-k_S ∩ top-k_T| / k).

    ``student_logits`` (N, V); ``teacher_topk_ids`` (N, ≥ k), the teacher's ids in descending order.
    """
    teacher = teacher_topk_ids[:, :k].long()
    student = student_logits.topk(k, dim=-1).indices
    top1 = (student[:, 0] == teacher[:, 0]).double().sum()
    overlap = (student.unsqueeze(-1) == teacher.unsqueeze(-2)).any(-1).double().sum(-1) / k
    return {"top1": float(top1), "overlap": float(overlap.sum())}


@torch.no_grad()
def answer_rows(model, tokenizer, examples, task_cfg, batch_size: int) -> Iterator[tuple[int, list, torch.Tensor]]:
    """Yield (example index, gold answer ids, float32 logits (n_answer_tokens, V) predicting them), teacher-forced."""
    feats = encode(examples, tokenizer, task_cfg)
    device = next(model.parameters()).device
    mode = model.training
    model.eval()
    try:
        for start in range(0, len(feats), batch_size):
            chunk = feats[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
            logits = answer_logits(model, batch)[0].float().cpu()
            window = logits.shape[1]
            for row, f in enumerate(chunk):
                yield f.index, f.answer_ids, logits[row, window - len(f.answer_ids):]
    finally:
        model.train(mode)


def eval_diagnostics(student, tokenizer, examples, task_cfg, batch_size: int, teacher_topk: list | None = None,
                     teacher_samples: list | None = None) -> tuple[dict, list[dict] | None]:
    """The student's diagnostics on ``examples`` and, when ``teacher_samples`` (the teacher's logits on the first
    examples) is given, the dashboard's disagreement rows for those examples (``live.disagreement_samples``'s
    format, computed from the cached teacher logits). ``teacher_topk``: per example, the teacher's top ids (n_i, ≥ k)
    at its answer tokens; None leaves the agreement figures out."""
    conf, correct, sums, rows = [], [], {"top1": 0.0, "overlap": 0.0}, []
    n_rows = len(teacher_samples) if teacher_samples is not None else 0
    for i, answer_ids, logits in answer_rows(student, tokenizer, examples, task_cfg, batch_size):
        probs = logits.softmax(-1)
        top = probs.max(-1)
        conf.append(top.values)
        correct.append(top.indices == torch.as_tensor(answer_ids))
        if teacher_topk is not None:
            for key, value in agreement(logits, teacher_topk[i]).items():
                sums[key] += value
        if i < n_rows:
            rows.append(_disagreement_row(examples[i], answer_ids, logits, teacher_samples[i], tokenizer))
    n_tokens = sum(len(c) for c in conf)
    out = {"student_ece": expected_calibration_error(torch.cat(conf), torch.cat(correct)) if conf else math.nan,
           "ece_bins": ECE_BINS, "eval_tokens": n_tokens}
    if teacher_topk is not None:
        out.update(top1_agreement=sums["top1"] / max(n_tokens, 1), top_k_overlap=sums["overlap"] / max(n_tokens, 1),
                   overlap_k=OVERLAP_K)
    return out, (rows if teacher_samples is not None else None)


def _disagreement_row(example, answer_ids, student_logits, teacher_logits, tokenizer, k: int = 5) -> dict:
    tokens = token_disagreements(student_logits, teacher_logits, answer_ids, tokenizer, k)
    return {"id": example.id, "prompt": example.prompt, "gold": example.answers,
            "answer_tokens": [tokenizer.decode([i]) for i in answer_ids], "tokens": tokens,
            "kl_sum": round(sum(t["kl"] for t in tokens), 6), "kl_max": max((t["kl"] for t in tokens), default=0.0)}


def top_k_mass(rows: dict, vocab_size: int, temperature: float) -> torch.Tensor:
    """Per token (...,): the teacher's tempered mass on its cached top-k ids, from cache rows (``topk_logits``
    (..., k) and the tail summary): sigmoid(lse_top − lse_tail), both log-partitions at β = 1/T."""
    beta = 1.0 / temperature
    lse_top = torch.logsumexp(beta * rows["topk_logits"].float(), dim=-1)
    n_tail = vocab_size - rows["topk_logits"].shape[-1]
    if n_tail == 0:
        return torch.ones_like(lse_top)
    # shared_tail_logit is the one logit whose n_tail copies carry the tail's tempered partition.
    lse_tail = beta * shared_tail_logit(rows, vocab_size, temperature) + math.log(n_tail)
    return torch.sigmoid(lse_top - lse_tail)


def teacher_mass(cache, temperature: float, max_examples: int = MASS_MAX_EXAMPLES) -> dict:
    """``teacher_top_k_mass`` / ``teacher_tail_mass`` at ``temperature``: token means over the first
    ``max_examples`` examples of a KD1 logit cache (:class:`kdexp.core.teacher_cache.TeacherCache`)."""
    total, n = 0.0, 0
    for i in range(min(len(cache), max_examples)):
        mass = top_k_mass(cache[i], cache.vocab_size, temperature)
        total, n = total + float(mass.sum()), n + mass.numel()
    top = total / n if n else math.nan
    return {"teacher_top_k_mass": top, "teacher_tail_mass": 1 - top, "top_k": cache.top_k,
            "tail_samples": cache.samples, "temperature": float(temperature), "mass_tokens": n}
