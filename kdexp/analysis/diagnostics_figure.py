"""The report's diagnostics figure: across a temperature sweep, what the sparse teacher target keeps (the teacher's
top-k mass at each T), how closely the student follows the teacher (top-1 agreement, top-k overlap on eval) and how
well calibrated it is (ECE). Values come from each run's results.json ``diagnostics`` (kdexp/core/diagnostics.py);
registered in :data:`kdexp.analysis.figures.FIGURES` as ``diagnostics``.
"""

from __future__ import annotations

import math
import statistics

from kdexp.analysis.tables import BASELINE, Group

SERIES = {"teacher_top_k_mass": ("teacher top-k mass", "#b2182b", "o"),
          "top1_agreement": ("top-1 agreement", "#2166ac", "s"),
          "top_k_overlap": ("top-k overlap", "#4dac26", "^"),
          "student_ece": ("student ECE", "#7b3294", "D")}


def _runs(g: Group):
    return [r for v in g.variants.values() for r in v.runs.values() if r.data.get("diagnostics")]


def by_temperature(g: Group) -> dict[float, dict[str, float]]:
    """T → diagnostic → mean over the runs at that T (runs whose diagnostics carry the run's temperature)."""
    per_t: dict[float, dict[str, list[float]]] = {}
    for r in _runs(g):
        d = r.data["diagnostics"]
        if d.get("temperature") is None:
            continue
        for key in SERIES:
            if isinstance(d.get(key), int | float) and not math.isnan(d[key]):
                per_t.setdefault(float(d["temperature"]), {}).setdefault(key, []).append(d[key])
    return {t: {k: statistics.fmean(v) for k, v in found.items()} for t, found in sorted(per_t.items())}


def _baseline(g: Group) -> dict[str, float]:
    runs = [r.data["diagnostics"] for r in _runs(g) if r.method == BASELINE]
    return {k: statistics.fmean(d[k] for d in runs) for k in ("top1_agreement", "student_ece")
            if runs and all(isinstance(d.get(k), int | float) for d in runs)}


def diagnostics_vs_temperature(ax, g: Group) -> None:
    """KD diagnostics against the distillation temperature T: the teacher's tempered probability mass on its cached
    top-k ids (the rest is the tail the cache summarises), the student's top-1 agreement and top-k overlap with the
    teacher on eval answer tokens, and the student's expected calibration error; points are means over the runs at
    each T (every seed and alpha), dotted lines the baseline's agreement and ECE."""
    points = by_temperature(g)
    temps = list(points)
    for key, (label, color, marker) in SERIES.items():
        ts = [t for t in temps if key in points[t]]
        if ts:
            ax.plot(ts, [points[t][key] for t in ts], marker=marker, color=color, label=label)
    for key, value in _baseline(g).items():
        label, color, _ = SERIES[key]
        ax.axhline(value, color=color, linestyle=":", linewidth=1, label=f"{BASELINE.upper()} {label}")
    if temps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("temperature T")
    ax.set_ylabel("fraction (mass, agreement, overlap, ECE)")
    ax.legend(fontsize=7)


def diagnostics_empty(g: Group) -> str | None:
    return None if by_temperature(g) else "no run in this setting recorded diagnostics at a temperature"


def diagnostics_caption(groups: list[Group]) -> str:
    """The figure's caption, with the numbers of each setting in one line."""
    parts = []
    for g in groups:
        cells = [f"T={t:g}: mass {p.get('teacher_top_k_mass', math.nan):.3f}, agreement "
                 f"{p.get('top1_agreement', math.nan):.3f}, ECE {p.get('student_ece', math.nan):.3f}"
                 for t, p in by_temperature(g).items()]
        if cells:
            parts.append(f"{g.label}: " + "; ".join(cells))
    return " ".join(diagnostics_vs_temperature.__doc__.split()) + " Means — " + " | ".join(parts) + "."
