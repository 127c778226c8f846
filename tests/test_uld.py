"""ULD (kdexp/core/uld.py): identities, a direct Wasserstein-1 reference, spans, the sorted teacher from the cache."""

import math

import pytest
import torch
from scipy.stats import wasserstein_distance

from kdexp.core.alignment import span_index
from kdexp.core.teacher_cache import rows_from_logits
from kdexp.core.uld import (
    cached_uld_error_report,
    sorted_probs,
    sorted_probs_from_cache,
    span_probs,
    uld,
    w1_sorted,
)


def _logits(*shape, scale=3.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_same_distribution_is_zero_across_vocabulary_sizes():
    teacher = _logits(2, 3, 10)
    # The same distribution over a larger vocabulary: two extra ids with zero probability, shuffled in.
    student = torch.cat([teacher, torch.full((2, 3, 2), -math.inf)], -1)[..., torch.randperm(12)]
    assert uld(student, teacher, reduction="sum").item() == pytest.approx(0.0, abs=1e-6)
    assert uld(teacher, teacher, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_invariant_to_permutations_of_either_vocabulary():
    student, teacher = _logits(5, 7, seed=1), _logits(5, 11, seed=2)
    base = uld(student, teacher, reduction="none")
    assert base.min() > 0.05  # different distributions: the check below is not 0 == 0
    permuted = uld(student[:, torch.randperm(7)], teacher[:, torch.randperm(11)], reduction="none")
    torch.testing.assert_close(permuted, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_equals_the_wasserstein_distance_of_the_sorted_values(temperature):
    """Σ|p_(i) − q_(i)| over V zero-padded sorted ranks is V · W1 between the empirical distributions of the V values
    (equal weights: the 1-D optimal coupling pairs them in sorted order), scipy's wasserstein_distance."""
    student, teacher = _logits(4, 6, seed=3), _logits(4, 9, seed=4)
    got = uld(student, teacher, temperature=temperature, reduction="none")
    for row in range(4):
        p = torch.softmax(teacher[row].double() / temperature, -1).numpy()
        q = torch.cat([torch.softmax(student[row].double() / temperature, -1), torch.zeros(3, dtype=torch.float64)])
        pairs = zip(sorted(p, reverse=True), sorted(q.tolist(), reverse=True), strict=True)
        explicit = sum(abs(a - b) for a, b in pairs)
        assert got[row].item() == pytest.approx(9 * wasserstein_distance(p, q.numpy()), abs=1e-6)
        assert got[row].item() == pytest.approx(explicit, abs=1e-6)


def test_mask_reductions_and_gradient_reach_only_the_student():
    student = _logits(2, 4, 8, seed=5).requires_grad_()
    teacher = _logits(2, 4, 13, seed=6)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    per_token = uld(student, teacher, mask=mask, reduction="none")
    assert per_token.shape == (5,) and bool(((per_token > 0) & (per_token <= 2)).all())
    total = uld(student, teacher, mask=mask, reduction="sum")
    assert uld(student, teacher, mask=mask).item() == pytest.approx(total.item() / 5, rel=1e-6)
    assert uld(student, teacher, mask=mask, reduction="sum", chunk_size=2).item() == pytest.approx(total.item())
    total.backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 0].abs().sum() == 0 and student.grad.abs().sum() > 0


def test_spans_are_joint_events():
    """A one-token span is that position's sorted distribution; a two-token span is scaled by p(second token)."""
    logits, actual = _logits(6, 10, seed=7), torch.tensor([0, 3, 5, 1, 2, 9])
    # Batch of 2 rows, window 3: row 0 has 3 answer tokens, row 1 has 2 (slot 3 is padding).
    idx = span_index([[(0, 1, 0, 1), (1, 3, 1, 2)], [(0, 2, 0, 1)]], [3, 2], [2, 1], 3, 3)
    assert idx["s_first"].tolist() == [0, 1, 4] and idx["s_rest"].tolist() == [2, 5]
    assert idx["s_rest_span"].tolist() == [1, 2] and idx["t_first"].tolist() == [1, 2, 5]
    probs = span_probs(logits, actual, idx["s_first"], idx["s_rest"], idx["s_rest_span"], 1.0)
    torch.testing.assert_close(probs[0], sorted_probs(logits[0]))
    torch.testing.assert_close(probs[1], sorted_probs(logits[1]) * torch.softmax(logits[2], -1)[5])
    torch.testing.assert_close(probs[2], sorted_probs(logits[4]) * torch.softmax(logits[5], -1)[9])


def test_cached_sorted_teacher_is_exact_without_a_tail_and_a_distribution_with_one():
    teacher = _logits(3, 40, seed=8)
    full = sorted_probs(teacher, 2.0)
    no_tail = sorted_probs_from_cache(rows_from_logits(teacher, 40), 2.0)
    torch.testing.assert_close(no_tail, full, atol=2e-3, rtol=0)  # fp16 logits only
    with_tail = sorted_probs_from_cache(rows_from_logits(teacher, 8), 2.0)
    assert with_tail.shape == full.shape and bool((with_tail[:, :-1] >= with_tail[:, 1:]).all())
    torch.testing.assert_close(with_tail.sum(-1), torch.ones(3), atol=1e-4, rtol=0)


def test_rank_bins_beat_a_uniform_tail_on_a_zipf_teacher():
    """The tail's shape matters to ULD: spreading it by rank bin is closer to the full-logit loss than spreading it
    uniformly, and much closer than dropping it (a statistical check over 64 tokens, not a golden number)."""
    vocab, ranks = 4000, torch.arange(1, 4001, dtype=torch.float32)
    teacher = (-1.1 * ranks.log()).expand(64, vocab) + _logits(64, vocab, scale=0.5, seed=9)
    teacher = teacher[:, torch.randperm(vocab)]
    report = cached_uld_error_report(teacher, _logits(64, 700, seed=10), top_k=16, temperatures=(1, 2))
    for t in ("1", "2"):
        assert report[f"T={t} bins"] < 0.5 * report[f"T={t} uniform"]
        assert report[f"T={t} bins"] < 0.5 * report[f"T={t} dropped"]
        assert report[f"T={t} bins"] < 0.05 * report[f"T={t} full"]


def test_w1_is_a_metric_on_sorted_vectors():
    a, b, c = (sorted_probs(_logits(3, n, seed=s)) for s, n in ((11, 5), (12, 9), (13, 7)))
    assert torch.equal(w1_sorted(a, b), w1_sorted(b, a))
    assert bool((w1_sorted(a, c) <= w1_sorted(a, b) + w1_sorted(b, c) + 1e-6).all())
