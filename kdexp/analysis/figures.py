"""Figures of the report: one figure per name, one panel per setting (tasks are never drawn together).

Each figure is written three ways: ``<name>.png`` (110 dpi, for the web page and the dashboard), ``300dpi/<name>.png``
(print) and ``<name>.pdf`` (vector, for LaTeX). Panel titles say the setting in words; every figure has a caption
(what is plotted, over which runs, n, what the bars are) that index.html and report.md show. A figure with nothing
to plot in any setting is left out, and the report says why.

Add a figure: a ``draw(ax, group)`` function and one line in :data:`FIGURES`; give it a caption in :data:`CAPTIONS`
(a function of the groups; without one, the draw function's docstring is the caption) and, when it can have nothing
to plot, a rule in :data:`EMPTY`.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are built on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from kdexp.analysis.diagnostics_figure import (  # noqa: E402
    diagnostics_caption,
    diagnostics_empty,
    diagnostics_vs_temperature,
)
from kdexp.analysis.tables import BASELINE, FLAG, Group, significance_rows  # noqa: E402

TEACHER_COLOR, STUDENT_COLOR, CELL_COLOR = "#b2182b", "#2166ac", "#777777"
WEB_DPI, PRINT_DPI = 110, 300
TASK_TITLES = {"sst2": "SST-2 sentiment", "squad": "SQuAD v1.1 question answering"}
METRIC_TITLES = {"accuracy": "accuracy", "f1": "F1 (0–100)", "exact_match": "exact match (0–100)"}
PROTOCOL_TITLES = {"sweep": "plain sweep, no tuning", "fair_compare": "every method tuned with the same budget"}
LABEL_PT = 8  # the smallest text on any figure


@dataclass
class Drawn:
    name: str
    title: str
    caption: str
    png: Path  # the web PNG; files holds it, the 300 dpi PNG and the PDF
    files: list[Path] = field(default_factory=list)


@dataclass
class Figures:
    drawn: list[Drawn]
    omitted: dict[str, str]  # figure name -> why it was left out


def setting_title(g: Group) -> str:
    """"SST-2 sentiment: tiny teacher → tiny student\\n(plain sweep, no tuning)", with any differing setting keys."""
    run = g.first_run().data
    extras = [part.split(".")[-1].replace("_", " ").replace("=", " = ") for part in g.label.split(" · ")[2:]]
    return (f"{TASK_TITLES.get(g.task, g.task)}: {run.get('teacher')} teacher → {run.get('student')} student"
            + "".join(f", {e}" for e in extras) + f"\n({PROTOCOL_TITLES.get(g.protocol, g.protocol)})")


def metric_title(g: Group) -> str:
    return f"eval {METRIC_TITLES.get(g.metric, g.metric)}"


def _panels(n: int, width: float = 5.2):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 4.2 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _models(g: Group) -> list[tuple[str, dict, str]]:
    """(label, mean efficiency entry, colour) for each selected method's student and the teacher."""
    models = [(f"student\n({method})", v.efficiency("student"), STUDENT_COLOR) for method, v in g.selected().items()]
    teacher = g.teacher_efficiency()
    return models + ([("teacher", teacher, TEACHER_COLOR)] if not math.isnan(teacher["total_params"]) else [])


def _sd(sd: float) -> float:
    return 0 if math.isnan(sd) else sd


def _mark(v) -> str:
    return f" {FLAG}" if v.degenerate_seeds() else ""


def perf_vs_size(ax, g: Group) -> None:
    points = [(v.efficiency("student")["total_params"], *v.stats()[:2], f"student ({m}){_mark(v)}", "o", None)
              for m, v in g.selected().items()]
    t_mean, t_sd, t_n = g.teacher()
    if t_n:
        points.append((g.teacher_efficiency()["total_params"], t_mean, t_sd, "teacher", "s", TEACHER_COLOR))
    points = [p for p in points if not math.isnan(p[0])]
    sizes = sorted({p[0] for p in points})
    for x in sizes:  # methods whose students have one size: spread sideways (log units) so none hides another
        same = [p for p in points if p[0] == x]
        for i, (_, mean, sd, label, marker, color) in enumerate(same):
            dx = 10 ** ((i - (len(same) - 1) / 2) * 0.035)
            ax.errorbar(x * dx, mean, yerr=_sd(sd), fmt=marker, color=color, capsize=4, label=label)
    ax.set_xscale("log")
    if sizes:  # ticks at the sizes drawn: a log axis's decades can all miss a 3.3 M student
        ax.set_xticks(sizes, [_millions(x) for x in sizes], fontsize=LABEL_PT)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(sizes[0] / 2, sizes[-1] * 2)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"{metric_title(g)}, mean ± sd")
    ax.legend(fontsize=LABEL_PT)


def _millions(x: float) -> str:
    return f"{x / 1e6:.3g} M" if x >= 1e5 else f"{x:,.0f}"


def _bars(ax, g: Group, key: str, ylabel: str) -> None:
    models = _models(g)
    bars = ax.bar([m[0] for m in models], [m[1][key] for m in models], color=[m[2] for m in models])
    noisy = [bar for bar, (_, eff, _) in zip(bars, models, strict=True) if eff.get("timing")]
    for bar in noisy:
        bar.set_hatch("//")
        bar.set_edgecolor("white")
    if noisy:
        ax.legend([Patch(facecolor="0.5", hatch="//", edgecolor="white")], ["timed under load (noisy)"],
                  fontsize=LABEL_PT)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=LABEL_PT)


def latency(ax, g: Group) -> None:
    _bars(ax, g, "latency_ms_per_example", "latency (ms / example, eval)")


def peak_memory(ax, g: Group) -> None:
    """Parameters + buffers of each model, with activations at the eval batch stacked on top where measured (GPU)."""
    models = _models(g)
    weights = [m[1]["model_memory_mb"] for m in models]
    if all(math.isnan(w) for w in weights):
        ax.text(0.5, 0.5, "no model-memory measurement in these runs", ha="center", va="center",
                transform=ax.transAxes, fontsize=LABEL_PT)
        return
    labels, colors = [m[0] for m in models], [m[2] for m in models]
    acts = [0.0 if math.isnan(m[1]["activation_memory_mb"]) else m[1]["activation_memory_mb"] for m in models]
    ax.bar(labels, weights, color=colors, label="parameters + buffers")
    if any(acts):
        ax.bar(labels, acts, bottom=weights, color=colors, alpha=0.4, label="activations at eval batch (GPU)")
        ax.legend(fontsize=LABEL_PT)
    ax.set_ylabel("model memory (MB)")
    ax.tick_params(axis="x", labelsize=LABEL_PT)


def kd_methods(ax, g: Group) -> None:
    selected = g.selected()
    stats = [v.stats() for v in selected.values()]
    labels = [textwrap.fill(v.label + _mark(v), 16) for v in selected.values()]
    ax.bar(labels, [s[0] for s in stats], yerr=[_sd(s[1]) for s in stats], capsize=5, color=STUDENT_COLOR)
    t_mean, _, t_n = g.teacher()
    if t_n:
        ax.axhline(t_mean, color=TEACHER_COLOR, linestyle="--", label="teacher")
        ax.legend(fontsize=LABEL_PT, loc="lower right")
        if t_mean > 0:  # autoscale stops at the tallest bar; keep the teacher line off the frame
            ax.set_ylim(top=max(ax.get_ylim()[1], 1.05 * t_mean))
    ax.set_xlabel("method (its variant with the best mean validation score)")
    ax.set_ylabel(f"{metric_title(g)}, mean ± sd over seeds")
    ax.tick_params(axis="x", labelsize=LABEL_PT, rotation=0)


def pareto(ax, g: Group) -> None:
    """Every variant and the teacher; the front holds the points no other point beats on both axes."""
    points = [(v.efficiency("student")["latency_ms_per_example"], v.stats()[0], v.label + _mark(v))
              for v in g.variants.values()]
    t_mean, _, t_n = g.teacher()
    if t_n:
        points.append((g.teacher_efficiency()["latency_ms_per_example"], t_mean, "teacher"))
    points = [p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))]
    for x, y, label in points:
        ax.scatter(x, y, color=TEACHER_COLOR if label == "teacher" else STUDENT_COLOR, s=18, zorder=3)
    front, best = [], -math.inf
    for x, y, _ in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", color="k", linewidth=1,
                marker="o", markersize=10, markerfacecolor="none", label="Pareto front")
        ax.legend(fontsize=LABEL_PT)
    _label_column(ax, points)
    ax.set_xlabel("latency (ms / example, eval)")
    ax.set_ylabel(metric_title(g))


def _label_column(ax, points: list[tuple[float, float, str]]) -> None:
    """Labels in a column right of the axes, in the order of their points' heights, each joined to its point by a
    leader line: no label covers a marker or another label however close the points are, and lines do not cross."""
    order = sorted(points, key=lambda p: (p[1], -p[0]))  # at equal height the rightmost point gets the lowest slot
    for i, (x, y, label) in enumerate(order):
        ax.annotate(label, xy=(x, y), xytext=(1.04, (i + 0.5) / len(order)), textcoords="axes fraction",
                    fontsize=LABEL_PT, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3})


def kd_gain(ax, g: Group) -> None:
    rows = [r for r in significance_rows(g) if r["family"].endswith(f"vs {BASELINE.upper()}")]
    if not rows:
        ax.text(0.5, 0.5, _no_comparison(g), ha="center", va="center", transform=ax.transAxes, fontsize=LABEL_PT)
        return
    ys = list(range(len(rows)))
    selected = f"methods vs {BASELINE.upper()}"
    for y, r in zip(ys, rows, strict=True):
        err = None if math.isnan(r["ci_low"]) else [[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]]
        ax.errorbar(r["mean_diff"], y, xerr=err, fmt="o", capsize=4,
                    color=STUDENT_COLOR if r["family"] == selected else CELL_COLOR)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(ys, [("selected " if r["family"] == selected else "cell ") + r["comparison"]
                       + (" *" if r["p_holm"] < 0.05 else "") for r in rows], fontsize=LABEL_PT)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ {metric_title(g)} vs {BASELINE.upper()} (95% CI; * Holm p < 0.05)")


def _no_comparison(g: Group) -> str:
    return f"no {BASELINE.upper()} and other method in this setting: nothing to compare"


FIGURES: dict[str, Callable] = {"perf_vs_size": perf_vs_size, "latency": latency, "kd_methods": kd_methods,
                                "pareto": pareto, "kd_gain": kd_gain, "peak_memory": peak_memory}
# A figure whose rule gives a reason for every setting has nothing to show: it is left out and the report says why.
EMPTY: dict[str, Callable[[Group], str | None]] = {
    "kd_gain": lambda g: None if significance_rows(g) else _no_comparison(g),
    "peak_memory": lambda g: None if any(not math.isnan(e["model_memory_mb"]) for _, e, _ in _models(g))
    else "no run recorded the model's own memory (results.json written before kdexp measured it)",
}
FIG_TITLES = {"perf_vs_size": "Score against model size", "latency": "Eval latency", "kd_methods": "Score per method",
              "pareto": "Score against latency", "kd_gain": f"Gain over {BASELINE.upper()}",
              "peak_memory": "Model memory"}


def _n_seeds(groups: list[Group]) -> str:
    ns = sorted({v.stats()[2] for g in groups for v in g.selected().values()})
    return "n = " + (f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") + " seeds per method" if ns else "no runs"


def _metrics(groups: list[Group]) -> str:
    return " / ".join(dict.fromkeys(metric_title(g) for g in groups))


def _panels_text(groups: list[Group]) -> str:
    return f" One panel per setting ({len(groups)} settings)." if len(groups) > 1 else ""


def _runs(groups: list[Group], role: str) -> list[dict]:
    return [e for g in groups for v in g.variants.values() for r in v.runs.values()
            if (e := (r.data.get("efficiency") or {}).get(role))]


def _latency_caption(groups: list[Group]) -> str:
    entries = _runs(groups, "student") + _runs(groups, "teacher")
    noisy = sum(bool(g_eff.get("timing")) for g in groups for _, g_eff, _ in _models(g))
    load = (f"a hatched bar ({noisy} here) includes runs timed while the 1-minute load average exceeded the cores "
            "available, whose timings are not comparable (benchmarks table: timing column)" if noisy else
            "no timing here was taken while the 1-minute load average exceeded the cores available")
    return ("Eval latency in ms per example at the eval batch size, for each method's selected student and the "
            f"teacher; bars are means over runs ({len(entries)} timed evaluations in all). Timings depend on the "
            f"machine's load: {load}.")


def _memory_caption(groups: list[Group]) -> str:
    measured = any(e.get("activation_memory_mb") is not None for e in _runs(groups, "student"))
    acts = (", with the activations at the eval batch (peak allocated above the weights, measured on GPU) stacked "
            "on top" if measured else "; activations are not included (measured on GPU only, these runs ran on CPU)")
    return ("The models' own memory: parameter and buffer bytes of each method's selected student and of the "
            f"teacher, mean over runs{acts}. This is not the process peak, which also holds the Python runtime, the "
            "data and, in a student's run, the teacher; that is in the benchmarks table (process peak memory MB).")


def _gain_caption(groups: list[Group]) -> str:
    flagged = ("included (--include-flagged)" if any(g.include_flagged for g in groups)
               else "left out (--include-flagged keeps them)")
    return (f"Difference in {_metrics(groups)} to {BASELINE.upper()}, paired by seed: dots are mean differences, bars "
            "95% t confidence intervals (none with one pair); * marks Holm-adjusted p < 0.05 (no test below 3 pairs). "
            "Blue: each method's selected variant; grey: every grid cell. Runs flagged degenerate are "
            f"{flagged}.{_panels_text(groups)}")


CAPTIONS: dict[str, Callable[[list[Group]], str]] = {
    "perf_vs_size": lambda gs: (
        f"{_metrics(gs).capitalize()} against parameter count (log scale) of each method's selected student (its "
        f"variant with the best mean validation score) and the teacher. Points are means over seeds ({_n_seeds(gs)}; "
        "the teacher is one model), bars ± 1 sample sd (none where n = 1). Students of the same size are drawn side "
        f"by side; the tick labels give the true sizes.{_panels_text(gs)}"),
    "latency": _latency_caption,
    "kd_methods": lambda gs: (
        f"{_metrics(gs).capitalize()} of each method's selected variant (best mean validation score): bars are means "
        f"over seeds ({_n_seeds(gs)}), error bars ± 1 sample sd; the dashed line is the teacher. {FLAG} marks a "
        f"variant with runs flagged degenerate (main table footnotes); they are in these means.{_panels_text(gs)}"),
    "pareto": lambda gs: (
        f"{_metrics(gs).capitalize()} against eval latency of every variant "
        f"({sum(len(g.variants) for g in gs)} variants, each the mean over its seeds) and the teacher. The black "
        "step line is the Pareto front: the points no other point beats on both score and speed. Labels are listed "
        f"beside each panel in the order of their points' heights, joined to them by lines.{_panels_text(gs)}"),
    "kd_gain": _gain_caption,
    "peak_memory": _memory_caption,
}
FIGURES["diagnostics"], EMPTY["diagnostics"], CAPTIONS["diagnostics"] = (  # kdexp/analysis/diagnostics_figure.py
    diagnostics_vs_temperature, diagnostics_empty, diagnostics_caption)


def _caption(name: str, draw: Callable, groups: list[Group]) -> str:
    if name in CAPTIONS:
        return CAPTIONS[name](groups)
    return " ".join((draw.__doc__ or name.replace("_", " ")).split())


def draw_all(groups: list[Group], out: Path) -> Figures:
    """Every figure of :data:`FIGURES` as web PNG, 300 dpi PNG and PDF; figures with nothing to plot left out."""
    (out / "300dpi").mkdir(parents=True, exist_ok=True)
    drawn, omitted = [], {}
    for name, draw in FIGURES.items():
        files = [out / f"{name}.png", out / "300dpi" / f"{name}.png", out / f"{name}.pdf"]
        reasons = [EMPTY[name](g) for g in groups] if name in EMPTY else [None]
        if all(reasons):
            omitted[name] = "; ".join(dict.fromkeys(reasons))
            for path in files:  # a report rebuilt into the same folder must not keep a stale figure
                path.unlink(missing_ok=True)
            continue
        fig, axes = _panels(len(groups))
        for ax, g in zip(axes, groups, strict=True):
            draw(ax, g)
            ax.set_title(setting_title(g), fontsize=9)
            ax.grid(alpha=0.3)
        with warnings.catch_warnings():  # long tick labels can defeat tight_layout; the figure is still readable
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
            for path, dpi in zip(files, (WEB_DPI, PRINT_DPI, "figure"), strict=True):
                fig.savefig(path, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        drawn.append(Drawn(name, FIG_TITLES.get(name, name.replace("_", " ").capitalize()),
                           _caption(name, draw, groups), files[0], files))
    return Figures(drawn, omitted)
