"""Figures of the report: one PNG per figure, one panel per setting (tasks are never drawn together)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are built on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402

from kdexp.analysis.tables import Group, significance_rows  # noqa: E402

TEACHER_COLOR, STUDENT_COLOR = "#b2182b", "#2166ac"


def _panels(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _models(g: Group, key: str) -> tuple[list[str], list[float], list[str]]:
    """Labels, values of an efficiency key, and colours for each selected method's student and the teacher."""
    labels, values, colors = [], [], []
    for method, v in g.selected().items():
        labels.append(f"student\n({method})")
        values.append(v.efficiency("student")[key])
        colors.append(STUDENT_COLOR)
    teacher = g.teacher_efficiency()[key]
    if not math.isnan(teacher):
        labels.append("teacher")
        values.append(teacher)
        colors.append(TEACHER_COLOR)
    return labels, values, colors


def perf_vs_size(ax, g: Group) -> None:
    for method, v in g.selected().items():
        mean, sd, _ = v.stats()
        ax.errorbar(v.efficiency("student")["total_params"], mean, yerr=0 if math.isnan(sd) else sd, fmt="o",
                    capsize=4, label=f"student ({method})")
    t_mean, t_sd, t_n = g.teacher()
    if t_n:
        ax.errorbar(g.teacher_efficiency()["total_params"], t_mean, yerr=0 if math.isnan(t_sd) else t_sd, fmt="s",
                    color=TEACHER_COLOR, capsize=4, label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{g.metric} (eval)")
    ax.legend(fontsize=8)


def _bars(ax, g: Group, key: str, ylabel: str) -> None:
    labels, values, colors = _models(g, key)
    ax.bar(labels, values, color=colors)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)


def latency(ax, g: Group) -> None:
    _bars(ax, g, "latency_ms_per_example", "latency (ms / example, eval)")


def peak_memory(ax, g: Group) -> None:
    _bars(ax, g, "peak_memory_mb", "peak memory during eval (MB)")


def kd_methods(ax, g: Group) -> None:
    selected = g.selected()
    stats = [v.stats() for v in selected.values()]
    ax.bar([v.label for v in selected.values()], [s[0] for s in stats],
           yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], capsize=5, color=STUDENT_COLOR)
    t_mean, _, t_n = g.teacher()
    if t_n:
        ax.axhline(t_mean, color=TEACHER_COLOR, linestyle="--", label="teacher")
        ax.legend(fontsize=8, loc="lower right")
        if t_mean > 0:  # autoscale stops at the tallest bar; keep the teacher line off the frame
            ax.set_ylim(top=max(ax.get_ylim()[1], 1.05 * t_mean))
    ax.set_ylabel(f"{g.metric} (eval, mean ± sd over seeds)")
    ax.tick_params(axis="x", labelsize=7, rotation=20)


def pareto(ax, g: Group) -> None:
    """Every variant and the teacher; the front holds the points no other point beats on both axes."""
    points = [(v.efficiency("student")["latency_ms_per_example"], v.stats()[0], v.label)
              for v in g.variants.values()]
    t_mean, _, t_n = g.teacher()
    if t_n:
        points.append((g.teacher_efficiency()["latency_ms_per_example"], t_mean, "teacher"))
    points = [p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))]
    for x, y, label in points:
        ax.scatter(x, y, color=TEACHER_COLOR if label == "teacher" else STUDENT_COLOR, s=18)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front, best = [], -math.inf
    for x, y, _ in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", color="k", linewidth=1,
                marker="o", markersize=10, markerfacecolor="none", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("latency (ms / example)")
    ax.set_ylabel(f"{g.metric} (eval)")


def kd_gain(ax, g: Group) -> None:
    rows = significance_rows(g)
    if not rows:
        ax.text(0.5, 0.5, "no B0 to compare against", ha="center", va="center", transform=ax.transAxes)
        return
    ys = list(range(len(rows)))
    for y, r in zip(ys, rows, strict=True):
        err = None if math.isnan(r["ci_low"]) else [[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]]
        color = STUDENT_COLOR if r["family"] == "methods vs B0" else "#777777"
        ax.errorbar(r["mean_diff"], y, xerr=err, fmt="o", capsize=4, color=color)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(ys, [("selected " if r["family"] == "methods vs B0" else "cell ") + r["comparison"]
                       + (" *" if r["p_holm"] < 0.05 else "") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ {g.metric} vs B0 (eval, 95% CI; * Holm p < 0.05)")


FIGURES = {"perf_vs_size": perf_vs_size, "latency": latency, "kd_methods": kd_methods, "pareto": pareto,
           "kd_gain": kd_gain, "peak_memory": peak_memory}


def draw_all(groups: list[Group], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        fig, axes = _panels(len(groups))
        for ax, g in zip(axes, groups, strict=True):
            draw(ax, g)
            ax.set_title(f"{g.label}\n[{g.protocol}]", fontsize=9)
            ax.grid(alpha=0.3)
        with warnings.catch_warnings():  # long tick labels can defeat tight_layout; the figure is still readable
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
