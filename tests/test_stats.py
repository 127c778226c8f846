import dataclasses
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from kdexp.analysis.stats import Comparison, compare, describe, holm

# Degenerate inputs must be answered silently; any warning leaking out of kdexp.analysis.stats is a failure.
pytestmark = pytest.mark.filterwarnings("error")

# Student (1908) / Cushny & Peebles sleep data, as R's `sleep` dataset: extra hours of sleep per patient.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_sleep_paired_matches_published_r_output():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)
    res = compare(SLEEP_1, SLEEP_2, paired=True)
    assert res.n == 10 and res.df == 9 and res.paired
    assert res.mean_diff == pytest.approx(-1.58)
    assert res.t == pytest.approx(-4.0621, abs=5e-5)
    assert res.p == pytest.approx(0.002833, abs=5e-7)
    assert res.ci_low == pytest.approx(-2.4598858, abs=5e-8)
    assert res.ci_high == pytest.approx(-0.7001142, abs=5e-8)
    assert res.n_dropped == 0 and res.note == ""


def test_sleep_welch_matches_published_r_output():
    # R: t.test(extra ~ group, data = sleep)  (Welch is R's default)
    res = compare(SLEEP_1, SLEEP_2, paired=False)
    assert res.n == 20 and not res.paired
    assert res.mean_diff == pytest.approx(-1.58)
    assert res.t == pytest.approx(-1.8608, abs=5e-5)
    assert res.df == pytest.approx(17.776, abs=5e-4)
    assert res.p == pytest.approx(0.07939, abs=5e-6)
    assert res.ci_low == pytest.approx(-3.3654832, abs=5e-8)
    assert res.ci_high == pytest.approx(0.2054832, abs=5e-8)


@pytest.mark.parametrize("confidence", [0.95, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_matches_scipy(seed, confidence):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.8, 0.02, size=7)
    b = a - rng.normal(0.01, 0.01, size=7)
    res = compare(a, b, paired=True, confidence=confidence)
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(confidence)
    assert (res.t, res.p, res.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df), rel=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)


@pytest.mark.parametrize("confidence", [0.95, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_scipy(seed, confidence):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.80, 0.01, size=5), rng.normal(0.78, 0.03, size=8)
    res = compare(a, b, paired=False, confidence=confidence)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(confidence)
    assert (res.t, res.p, res.df) == pytest.approx((ref.statistic, ref.pvalue, ref.df), rel=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)


def test_cohens_dz_by_hand():
    # diffs [2, 3, 1, 3]: mean 2.25, squared deviations sum to 2.75, so sd = sqrt(2.75 / 3).
    res = compare([3, 5, 4, 6], [1, 2, 3, 3])
    assert res.mean_diff == pytest.approx(2.25)
    assert res.cohens_d == pytest.approx(2.25 / math.sqrt(11 / 12))


def test_welch_df_and_pooled_d_by_hand():
    # var(a) = 1, var(b) = 4, n = 3 each: se^2 = 1/3 + 4/3, df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17;
    # pooled sd = sqrt((2 * 1 + 2 * 4) / 4) = sqrt(2.5).
    res = compare([1, 2, 3], [2, 4, 6], paired=False)
    assert res.df == pytest.approx(50 / 17)
    assert res.mean_diff == pytest.approx(-2.0)
    assert res.cohens_d == pytest.approx(-2 / math.sqrt(2.5))


def test_swapping_sides_negates():
    ab, ba = compare(SLEEP_1, SLEEP_2), compare(SLEEP_2, SLEEP_1)
    assert (ba.mean_diff, ba.t, ba.cohens_d) == pytest.approx((-ab.mean_diff, -ab.t, -ab.cohens_d))
    assert (ba.ci_low, ba.ci_high) == pytest.approx((-ab.ci_high, -ab.ci_low))
    assert ba.p == pytest.approx(ab.p)


@pytest.mark.parametrize(("a", "b", "n", "mean_diff"), [([0.9], [0.7], 1, 0.2), ([], [], 0, math.nan)])
def test_paired_fewer_than_two_pairs(a, b, n, mean_diff):
    res = compare(a, b)
    assert res.n == n
    assert res.mean_diff == pytest.approx(mean_diff, nan_ok=True)
    assert all(math.isnan(v) for v in (res.t, res.p, res.ci_low, res.ci_high, res.cohens_d, res.df))
    assert res.note == f"n={n}: no test (need at least 2 pairs)"


def test_unpaired_group_of_one():
    res = compare([0.9], [0.7, 0.8, 0.75], paired=False)
    assert res.n == 4 and math.isnan(res.p) and math.isnan(res.cohens_d)
    assert res.mean_diff == pytest.approx(0.15)
    assert "need at least 2 values per group" in res.note


def test_zero_variance_nonzero_mean():
    a, b = [3.0, 4.0, 5.0], [2.0, 3.0, 4.0]
    res = compare(a, b)
    # scipy 1.17 ttest_rel on constant non-zero differences returns t = +inf, p = 0.0; passed through as is.
    assert res.t == math.inf and res.p == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy itself warns here; kdexp must not
        assert (res.t, res.p) == (stats.ttest_rel(a, b).statistic, stats.ttest_rel(a, b).pvalue)
    assert res.cohens_d == math.inf
    assert (res.ci_low, res.ci_high) == (1.0, 1.0)
    assert res.note == "zero variance of differences: d undefined"
    assert compare(b, a).cohens_d == -math.inf


def test_zero_variance_zero_mean():
    res = compare([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    # scipy 1.17 ttest_rel on all-zero differences returns t = nan, p = nan (0/0).
    assert math.isnan(res.t) and math.isnan(res.p) and math.isnan(res.cohens_d)
    assert res.mean_diff == 0.0 and res.df == 2
    assert res.note == "zero variance of differences: d undefined"


def test_zero_variance_up_to_float_rounding():
    # The differences are all 0.01 in decimal but not bit-identical in binary, so sd is ~1e-17, not 0.
    res = compare([0.91, 0.81, 0.71], [0.90, 0.80, 0.70])
    assert res.cohens_d == math.inf
    assert res.note == "zero variance of differences: d undefined"


def test_unpaired_zero_variance():
    res = compare([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], paired=False)
    # scipy 1.17 ttest_ind(equal_var=False) gives t = -inf, p = 0.0; Welch df is 0/0, the CI is a point.
    assert res.t == -math.inf and res.p == 0.0 and math.isnan(res.df)
    assert res.cohens_d == -math.inf
    assert (res.ci_low, res.ci_high) == (-1.0, -1.0)
    assert res.note == "zero variance in both groups: d undefined"


def test_dict_pairing_by_seed_with_missing_seeds():
    a = {0: 0.81, 1: 0.83, 2: 0.80, 3: 0.85, 7: 0.90}
    b = {3: 0.84, 2: 0.78, 1: 0.80, 0: 0.80, 9: 0.10}  # different order: pairing must be by key
    res = compare(a, b)
    expected = compare([0.81, 0.83, 0.80, 0.85], [0.80, 0.80, 0.78, 0.84])
    assert res.n == 4 and res.n_dropped == 2
    assert (res.t, res.p, res.mean_diff) == pytest.approx((expected.t, expected.p, expected.mean_diff))
    assert "only in a [7]" in res.note and "only in b [9]" in res.note


def test_dict_unpaired_uses_all_seeds():
    res = compare({0: 1.0, 1: 2.0, 5: 3.0}, {2: 2.0, 3: 4.0, 4: 6.0, 8: 8.0}, paired=False)
    assert res.n == 7 and res.n_dropped == 0
    assert res.mean_diff == pytest.approx(2.0 - 5.0)


def test_nan_runs_are_dropped_and_reported():
    res = compare([1.0, math.nan, 3.0, 4.0], [0.0, 1.0, 1.0, 1.0])
    assert res.n == 3 and res.n_dropped == 1 and "NaN" in res.note
    assert res.t == pytest.approx(stats.ttest_rel([1.0, 3.0, 4.0], [0.0, 1.0, 1.0]).statistic)
    unpaired = compare([1.0, math.nan, 3.0], [math.nan, 2.0, 4.0, 6.0], paired=False)
    assert unpaired.n == 5 and unpaired.n_dropped == 2


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="equal lengths"):
        compare([1, 2, 3], [1, 2])
    with pytest.raises(TypeError, match="both"):
        compare({0: 1.0, 1: 2.0}, [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        compare([1, 2], [3, 4], confidence=95)


def test_comparison_is_frozen():
    res = compare(SLEEP_1, SLEEP_2)
    assert isinstance(res, Comparison)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.p = 0.5


def test_holm_hand_example():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 by monotonicity.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_handles_ties():
    assert holm([0.5, 0.6, 0.7]) == [1.0, 1.0, 1.0]
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])
    assert holm([]) == []


def test_holm_nan_excluded_from_family():
    # Family size is 2, not 3: 0.01 * 2 = 0.02, then 0.02 * 1 = 0.02.
    out = holm([0.01, math.nan, 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_holm_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.2, size=12)
    assert holm(p) == pytest.approx(multitest.multipletests(p, method="holm")[1].tolist())


def test_describe():
    mean, sd, n = describe([1.0, 2.0, 3.0, 6.0])
    assert (mean, n) == (3.0, 4)
    assert sd == pytest.approx(math.sqrt(14 / 3))
    assert describe({0: 1.0, 1: 3.0}) == (2.0, pytest.approx(math.sqrt(2)), 2)
    mean1, sd1, n1 = describe([0.7])
    assert (mean1, n1) == (0.7, 1) and math.isnan(sd1)
    mean0, sd0, n0 = describe([])
    assert n0 == 0 and math.isnan(mean0) and math.isnan(sd0)
    assert describe([1.0, math.nan, 3.0])[2] == 2
