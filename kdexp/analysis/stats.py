"""Significance tests and summaries for comparing runs across seeds.

Thin layer over ``scipy.stats`` that always returns an answer: degenerate inputs (too few seeds, zero
variance, missing seeds, NaN results of failed runs) yield NaN/inf fields plus an explanatory ``note``
instead of an exception or a RuntimeWarning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from scipy import stats

__all__ = ["Comparison", "compare", "describe", "holm"]

# Differences of floats carry rounding error of order eps * |value|, so e.g. (0.91 - 0.90) and (0.81 - 0.80)
# differ in the last bits. Without a tolerance such "constant" differences give a spurious d of ~1e15.
_ROUNDING_TOL = 16 * np.finfo(float).eps

_NAN = math.nan


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare`; the difference is always a - b and the CI is for that mean difference.

    ``n`` is the number of pairs when paired, and ``n_a + n_b`` when unpaired.
    """

    n: int
    mean_diff: float
    t: float
    df: float
    p: float
    ci_low: float
    ci_high: float
    cohens_d: float
    paired: bool
    n_dropped: int = 0
    note: str = ""


@contextmanager
def _quiet():
    # scipy warns on constant or tiny samples; those cases are reported through Comparison.note instead.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _align(a, b, paired: bool) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """Turn the inputs into float arrays; for dicts, pair by seed and report seeds seen on one side only."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("a and b must both be sequences or both be {seed: value} mappings")
    notes: list[str] = []
    dropped = 0
    if isinstance(a, Mapping):
        if paired:
            only_a = [k for k in a if k not in b]
            only_b = [k for k in b if k not in a]
            if only_a or only_b:
                dropped = len(only_a) + len(only_b)
                notes.append(f"dropped {dropped} unpaired seed(s): only in a {only_a}, only in b {only_b}")
            keys = [k for k in a if k in b]
            a, b = [a[k] for k in keys], [b[k] for k in keys]
        else:
            # Independent samples need no alignment, so every seed on each side is used.
            a, b = list(a.values()), list(b.values())
    xa, xb = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if paired and xa.size != xb.size:
        raise ValueError(f"paired comparison needs equal lengths, got {xa.size} and {xb.size}")
    return xa, xb, dropped, notes


def _drop_nan(xa: np.ndarray, xb: np.ndarray, paired: bool) -> tuple[np.ndarray, np.ndarray, int, str]:
    # NaN marks a failed run: treating it as a missing seed keeps the test meaningful instead of all-NaN.
    if paired:
        keep = ~(np.isnan(xa) | np.isnan(xb))
        nan_count = int((~keep).sum())
        xa, xb = xa[keep], xb[keep]
        what = "pair(s)"
    else:
        nan_count = int(np.isnan(xa).sum() + np.isnan(xb).sum())
        xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
        what = "value(s)"
    note = f"dropped {nan_count} {what} with NaN" if nan_count else ""
    return xa, xb, nan_count, note


def _effect_size(mean_diff: float, sd: float, scale: float) -> tuple[float, bool]:
    """Cohen's d = mean_diff / sd, with +-inf / NaN when sd is zero up to rounding."""
    if math.isnan(sd) or math.isnan(mean_diff):
        return _NAN, False
    tol = _ROUNDING_TOL * scale
    if sd > tol:
        return mean_diff / sd, False
    if abs(mean_diff) <= tol:
        return _NAN, True
    return math.copysign(math.inf, mean_diff), True


def _scale(xa: np.ndarray, xb: np.ndarray) -> float:
    finite = np.abs(np.concatenate([xa, xb]))
    finite = finite[np.isfinite(finite)]
    return float(finite.max()) if finite.size else 0.0


def _no_test(n: int, mean_diff: float, paired: bool, note: str) -> Comparison:
    return Comparison(n, mean_diff, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, paired=paired, note=note)


def _paired(xa: np.ndarray, xb: np.ndarray, confidence: float) -> Comparison:
    n = int(xa.size)
    diff = xa - xb
    if n < 2:
        mean_diff = float(diff[0]) if n else _NAN
        return _no_test(n, mean_diff, True, f"n={n}: no test (need at least 2 pairs)")
    mean_diff = float(diff.mean())
    sd = float(diff.std(ddof=1))
    res = stats.ttest_rel(xa, xb)
    t_crit = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    half = t_crit * sd / math.sqrt(n)
    d, zero_var = _effect_size(mean_diff, sd, _scale(xa, xb))
    note = "zero variance of differences: d undefined" if zero_var else ""
    return Comparison(
        n,
        mean_diff,
        t=float(res.statistic),
        df=float(n - 1),
        p=float(res.pvalue),
        ci_low=mean_diff - half,
        ci_high=mean_diff + half,
        cohens_d=d,
        paired=True,
        note=note,
    )


def _welch(xa: np.ndarray, xb: np.ndarray, confidence: float) -> Comparison:
    na, nb = int(xa.size), int(xb.size)
    if na < 2 or nb < 2:
        mean_diff = float(xa.mean() - xb.mean()) if na and nb else _NAN
        return _no_test(na + nb, mean_diff, False, f"n_a={na}, n_b={nb}: no test (need at least 2 values per group)")
    mean_diff = float(xa.mean() - xb.mean())
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    se = math.sqrt(va / na + vb / nb)
    res = stats.ttest_ind(xa, xb, equal_var=False)
    # Welch-Satterthwaite; NaN (0/0) when both groups are constant, where the CI collapses to a point anyway.
    # numpy scalars so that underflow of tiny variances gives NaN rather than ZeroDivisionError.
    wa, wb = np.float64(va / na), np.float64(vb / nb)
    df = float((wa + wb) ** 2 / (wa**2 / (na - 1) + wb**2 / (nb - 1)))
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se if se > 0 else 0.0
    pooled_sd = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    d, zero_var = _effect_size(mean_diff, pooled_sd, _scale(xa, xb))
    note = "zero variance in both groups: d undefined" if zero_var else ""
    return Comparison(
        na + nb,
        mean_diff,
        t=float(res.statistic),
        df=df,
        p=float(res.pvalue),
        ci_low=mean_diff - half,
        ci_high=mean_diff + half,
        cohens_d=d,
        paired=False,
        note=note,
    )


def compare(a, b, paired: bool = True, confidence: float = 0.95) -> Comparison:
    """Compare a against b with a t-test, CI of the mean difference (a - b) and Cohen's d.

    ``a`` and ``b`` are sequences of floats or ``{seed: value}`` mappings. Paired (default): Student's
    paired t (``scipy.stats.ttest_rel``), df = n - 1, d_z = mean(diff) / sd(diff); mappings are paired by
    seed and seeds on one side only are dropped. Unpaired: Welch's t, Welch-Satterthwaite df, d with the
    pooled sd. NaN values count as missing runs and are dropped. Every drop is counted in ``n_dropped``
    and described in ``note``; degenerate cases return NaN/inf fields rather than raising.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xa, xb, dropped, notes = _align(a, b, paired)
    xa, xb, nan_dropped, nan_note = _drop_nan(xa, xb, paired)
    if nan_note:
        notes.append(nan_note)
    with _quiet():
        result = _paired(xa, xb, confidence) if paired else _welch(xa, xb, confidence)
    if result.note:
        notes.append(result.note)
    return dataclasses.replace(result, n_dropped=dropped + nan_dropped, note="; ".join(notes))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order (step-down, monotone, capped at 1).

    NaN p-values (e.g. from an untestable comparison) stay NaN and do not count towards the family size.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError("pvalues must be a flat sequence")
    valid = np.flatnonzero(~np.isnan(p))
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    adjusted = np.full(p.shape, _NAN)
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    # The running maximum enforces monotonicity: a smaller raw p never ends up with a larger adjusted p.
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.empty(0)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.tolist()


def describe(values) -> tuple[float, float, int]:
    """(mean, sample sd with ddof=1, n) for mean +- sd tables; NaN values are ignored, sd is NaN for n < 2.

    ``values`` may be a sequence or a ``{seed: value}`` mapping.
    """
    if isinstance(values, Mapping):
        values = list(values.values())
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    with np.errstate(all="ignore"):  # an inf value gives sd = NaN, which is the answer, not a warning
        mean = float(x.mean()) if n else _NAN
        sd = float(x.std(ddof=1)) if n >= 2 else _NAN
    return mean, sd, n
