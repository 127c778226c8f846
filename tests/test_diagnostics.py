"""Diagnostics (kdexp/core/diagnostics.py): ECE against a hand computation, agreement and overlap on constructed
logits, the teacher's top-k mass from cache rows against the full-vocabulary value."""

import math

import pytest
import torch

from kdexp.core.diagnostics import agreement, expected_calibration_error, teacher_mass, top_k_mass
from kdexp.core.teacher_cache import rows_from_logits


def test_ece_matches_a_hand_computation():
    # 5 bins of width 0.2. (0.8, 1]: 0.9 ✓, 0.95 ✓ → |1 − 0.925| · 2/5 = 0.03; (0.6, 0.8]: 0.75 ✗, 0.65 ✓ →
    # |0.5 − 0.7| · 2/5 = 0.08; (0.2, 0.4]: 0.3 ✗ → 0.3 · 1/5 = 0.06. Total 0.17.
    conf = torch.tensor([0.9, 0.75, 0.3, 0.65, 0.95])
    correct = torch.tensor([True, False, False, True, True])
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.17, abs=1e-6)
    # One bin of everything: |accuracy − mean confidence| = |3/5 − 0.71|.
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.11, abs=1e-6)


def test_ece_is_zero_when_calibrated_and_one_when_confidently_wrong():
    half = torch.full((10,), 0.5)
    assert expected_calibration_error(half, torch.arange(10) % 2 == 0) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.ones(4), torch.zeros(4, dtype=torch.bool)) == pytest.approx(1.0)
    assert expected_calibration_error(torch.zeros(2), torch.zeros(2, dtype=torch.bool)) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


def _logits_ranking(ranking: list[int], vocab: int) -> torch.Tensor:
    """Logits whose descending order starts with ``ranking``."""
    z = torch.zeros(vocab)
    for rank, token in enumerate(ranking):
        z[token] = 10.0 - rank
    return z


def test_agreement_and_overlap_on_constructed_logits():
    vocab = 20
    student = torch.stack([_logits_ranking([3, 5, 7], vocab), _logits_ranking([1, 2, 4], vocab),
                           _logits_ranking([9, 8, 6], vocab)])
    teacher = torch.tensor([[3, 7, 11], [2, 1, 4], [0, 12, 13]])
    got = agreement(student, teacher, k=3)
    assert got["top1"] == 1  # only row 0 has the same argmax
    assert got["overlap"] == pytest.approx(2 / 3 + 3 / 3 + 0)  # {3, 7}; {1, 2, 4}; nothing
    assert agreement(student, teacher, k=1) == {"top1": 1.0, "overlap": 1.0}


def test_top_k_mass_from_cache_rows_matches_the_full_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 500, generator=gen)
    rows = rows_from_logits(logits, 16)
    for t, tol in ((1.0, 2e-3), (2.0, 2e-2), (4.0, 2e-2)):
        full = torch.softmax(logits / t, -1).topk(16).values.sum(-1)
        assert torch.allclose(top_k_mass(rows, 500, t), full, atol=tol), t
    assert torch.allclose(top_k_mass(rows_from_logits(logits, 500), 500, 2.0), torch.ones(6))


class _Cache(list):
    vocab_size, top_k, samples = 500, 16, 0


def test_teacher_mass_is_a_token_mean_over_the_cache():
    gen = torch.Generator().manual_seed(1)
    examples = [3 * torch.randn(n, 500, generator=gen) for n in (1, 4, 2)]
    cache = _Cache(rows_from_logits(z, 16) for z in examples)
    got = teacher_mass(cache, 1.0)
    full = torch.cat([torch.softmax(z, -1).topk(16).values.sum(-1) for z in examples]).mean()
    assert got["mass_tokens"] == 7 and got["top_k"] == 16 and got["temperature"] == 1.0 and got["tail_samples"] == 0
    assert got["teacher_top_k_mass"] == pytest.approx(float(full), abs=2e-3)
    assert got["teacher_top_k_mass"] + got["teacher_tail_mass"] == pytest.approx(1.0)
    assert teacher_mass(cache, 1.0, max_examples=1)["mass_tokens"] == 1


def _group(points: list[tuple[str, float | None, dict]]):
    from kdexp.analysis.report import Run
    from kdexp.analysis.tables import Group, Variant

    variants = {}
    for i, (method, t, diag) in enumerate(points):
        label = f"{method}-T{t}"
        data = {"method": method, "diagnostics": {**diag, **({"temperature": t} if t else {})}}
        variants.setdefault(label, Variant(label, method, {})).runs[i] = Run(path=None, data=data, protocol="p")
    return Group(protocol="p", task="sst2", label="sst2", variants=variants, note="")


def test_the_diagnostics_figure_averages_runs_per_temperature(tmp_path):
    import matplotlib.pyplot as plt

    from kdexp.analysis.diagnostics_figure import (
        by_temperature,
        diagnostics_caption,
        diagnostics_empty,
        diagnostics_vs_temperature,
    )

    d = {"teacher_top_k_mass": 0.9, "top1_agreement": 0.5, "top_k_overlap": 0.4, "student_ece": 0.1}
    g = _group([("kd1", 1.0, d), ("kd1", 1.0, {**d, "top1_agreement": 0.7}), ("kd1", 4.0, {**d, "student_ece": 0.3}),
                ("b0", None, {"top1_agreement": 0.2, "student_ece": 0.05})])
    assert diagnostics_empty(_group([("b0", None, {"student_ece": 0.1})])).startswith("no run")
    assert diagnostics_empty(g) is None
    points = by_temperature(g)
    assert list(points) == [1.0, 4.0]
    assert points[1.0]["top1_agreement"] == pytest.approx(0.6) and points[4.0]["student_ece"] == pytest.approx(0.3)
    assert "T=4: mass 0.900, agreement 0.500, ECE 0.300" in diagnostics_caption([g])
    fig, ax = plt.subplots()
    diagnostics_vs_temperature(ax, g)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "top-1 agreement" in labels and "B0 student ECE" in labels
    plt.close(fig)
