"""Tables of the report: aggregation over seeds, paired significance vs B0 (and vs KD1), and their Markdown cells.

Every table is a list of row dicts carrying ``protocol`` and ``setting`` columns, so a CSV never mixes tasks without
saying so, and the Markdown / HTML versions get one section per setting with its protocol note on top
(:mod:`kdexp.analysis.pages` writes them). Runs flagged degenerate (``results.json["flags"]``,
:mod:`kdexp.core.degenerate`) are marked ⚠ and left out of the significance tests unless ``include_flagged``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from kdexp.analysis.stats import compare, describe, holm
from kdexp.core.degenerate import is_degenerate
from kdexp.core.evaluate import timing_noisy
from kdexp.methods import METHODS

# What the report shows for each method comes from its module: the baseline every other method is tested against,
# and the ablation grid over a method's two label knobs (KD1: temperature × alpha).
BASELINE = next(name for name, module in METHODS.items() if module.BASELINE)
# The method a newer KD method must beat to be worth its cost (logit KD): every other KD method is also tested
# against it, paired by seed, in its own Holm family.
KD_REFERENCE = next((name for name, module in METHODS.items() if getattr(module, "KD_REFERENCE", False)), None)
REFERENCES = " and ".join(m.upper() for m in (BASELINE, KD_REFERENCE) if m)
GRIDS = {name: tuple(module.LABEL_KNOBS.items()) for name, module in METHODS.items() if len(module.LABEL_KNOBS) == 2}

EFFICIENCY = {"total_params": "params", "disk_mb": "disk MB", "latency_ms_per_example": "latency ms/ex",
              "throughput_examples_per_s": "throughput ex/s",
              "model_memory_mb": "model memory MB (params + buffers)",
              "activation_memory_mb": "activation memory MB (eval batch, GPU)",
              "peak_memory_mb": "process peak memory MB"}
TABLES = {
    "main_results": "Main results (eval split, mean ± sd over seeds)",
    "significance": f"Significance vs {REFERENCES} (paired by seed, eval split)",
    **{f"{m}_ablation": f"{m.upper()} ablation: {a} × {b} (eval split, mean ± sd)"
       for m, ((a, _), (b, _)) in GRIDS.items()},
    "benchmarks": "Benchmarks (means over runs)",
}
# A paired t-test on 2 pairs has 1 degree of freedom: its p rests on a single spread estimate (t_crit = 12.7), so
# the report gives the difference and its CI but no test below 3 pairs.
MIN_PAIRS = 3
FLAG = "⚠"


@dataclass
class Variant:
    label: str
    method: str
    params: dict
    runs: dict = field(default_factory=dict)  # seed -> report.Run

    def values(self, key: str = "value") -> dict:
        return {seed: run.main(key) for seed, run in sorted(self.runs.items())}

    def stats(self, key: str = "value") -> tuple[float, float, int]:
        return describe(self.values(key))

    def efficiency(self, role: str) -> dict:
        return _mean_efficiency([r.data.get("efficiency", {}).get(role) for r in self.runs.values()])

    def flags(self, who: str | None = None) -> dict[int, list[dict]]:
        """seed -> the run's flags (only ``who``'s when given): empty lists for clean runs."""
        return {seed: [f for f in run.data.get("flags") or [] if who is None or f.get("who") == who]
                for seed, run in sorted(self.runs.items())}

    def degenerate_seeds(self) -> list[int]:
        """Seeds whose student outcome is flagged degenerate. A teacher flag is shown on the teacher row but leaves
        the runs in: B0 never sees the teacher, and a KD student that learnt nothing from it carries its own flag."""
        return [seed for seed, flags in self.flags().items()
                if is_degenerate([f for f in flags if f.get("who", "student") == "student"])]


@dataclass
class Group:
    protocol: str
    task: str
    label: str
    variants: dict  # label -> Variant
    note: str
    include_flagged: bool = False  # keep flagged runs in the significance tests

    @property
    def metric(self) -> str:
        return self.first_run().data["main_metric"]["name"]

    def first_run(self):
        return next(iter(next(iter(self.variants.values())).runs.values()))

    def candidates(self, method: str) -> list[Variant]:
        """The method's variants run on its largest number of seeds: a cell with fewer seeds has a noisier mean, so
        it would win the selection by chance more often, and its missing seeds could not be paired."""
        cells = [v for v in self.variants.values() if v.method == method]
        most = max(len(v.runs) for v in cells)
        return [v for v in cells if len(v.runs) == most]

    def selected(self) -> dict[str, Variant]:
        """Per method, the candidate variant with the best mean validation score (selection never looks at eval)."""
        best = {m: max(self.candidates(m), key=lambda v: v.stats("validation_value")[0])
                for m in {v.method for v in self.variants.values()}}
        return dict(sorted(best.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])))

    def teacher(self) -> tuple[float, float, int]:
        """(mean, sd, n) over distinct teachers: every run re-evaluates the same prepared teacher, so counting runs
        would report n=25 and a float-rounding sd for what is one model measured once."""
        per_teacher: dict[str, list[float]] = {}
        for v in self.variants.values():
            for r in v.runs.values():
                key = (r.data.get("teacher_info") or {}).get("key") or str(r.data.get("teacher"))
                per_teacher.setdefault(key, []).append(r.main("teacher_value"))
        return describe([describe(values)[0] for values in per_teacher.values()])

    def teacher_efficiency(self) -> dict:
        return _mean_efficiency(self._teacher_entries())

    def _teacher_entries(self) -> list[dict | None]:
        return [r.data.get("efficiency", {}).get("teacher") for v in self.variants.values() for r in v.runs.values()]

    def teacher_flags(self) -> dict[int, list[dict]]:
        """Every run's teacher flags, keyed by a running index (the teacher is the same model in every run)."""
        flags = [v.flags("teacher") for v in self.variants.values()]
        return dict(enumerate(f for per_seed in flags for f in per_seed.values()))

    def cells(self, method: str) -> list[Variant]:
        return [v for v in self.variants.values() if v.method == method]


def _mean_efficiency(entries: list[dict | None]) -> dict:
    entries = [e for e in entries if e]
    means = {k: describe([e.get(k) if e.get(k) is not None else math.nan for e in entries])[0] for k in EFFICIENCY}
    loads = [e["load_avg_1m"] for e in entries if e.get("load_avg_1m") is not None]
    noisy = sum(timing_noisy(e) for e in entries)
    means["load_avg_1m"] = max(loads) if loads else math.nan
    means["timing"] = f"noisy: load > cores in {noisy}/{len(entries)} run(s)" if noisy else ""
    return means


def flag_summary(per_seed: dict) -> str:
    """"⚠ single_class 5/5, dominant_loss_term 5/5": how many of the runs carry each flag code ("" when none)."""
    counts = Counter(code for flags in per_seed.values() for code in dict.fromkeys(f["code"] for f in flags))
    return (FLAG + " " + ", ".join(f"{code} {k}/{len(per_seed)}" for code, k in counts.items())) if counts else ""


def flag_notes(g: Group) -> list[str]:
    """One footnote per flagged variant and flag code: which seeds, and the first run's message."""
    notes = []
    for name, per_seed in [*((v.label, v.flags()) for v in g.variants.values()), ("teacher", g.teacher_flags())]:
        by_code: dict[tuple, list] = {}
        for seed, flags in per_seed.items():
            for f in flags:
                by_code.setdefault((f["code"], f.get("who", "")), []).append((seed, f))
        for (code, who), hits in by_code.items():
            seeds = "" if name == "teacher" else f" (seed {', '.join(str(s) for s, _ in hits)})"
            notes.append(f"{FLAG} {name}{seeds}: {code} ({who}): {hits[0][1].get('message', '')}")
    return sorted(dict.fromkeys(notes))


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if math.isfinite(x) and abs(x) >= 1e5 and x.is_integer():  # parameter counts
            return f"{x:,.0f}"
        if not math.isfinite(x) or abs(x) >= 1e5:
            return f"{x:.3e}" if math.isfinite(x) else str(x)
        # Keep trailing zeros (0.2310, not 0.231): a column of equal precision reads as equal precision.
        return f"{x:#.{digits}g}".removesuffix(".")
    return str(x)


def _fixed(x, decimals: int) -> str:
    """One column, one format: fixed decimals ("–" for missing, inf as text)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{decimals}f}" if math.isfinite(x) else str(x)


def _pvalue(p) -> str:
    """p-values as journals print them: three decimals, "< 0.001" below that."""
    if p is None or math.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _pm(mean: float, sd: float) -> str:
    """mean ± sd, the sd to the mean's decimal places (0.7752 ± 0.0100, not ± 0.01) unless that would print 0."""
    m, decimals = _fmt(mean), _decimals(mean)
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):  # n < 2: there is no spread to show
        return m
    if round(sd, decimals) != 0 or sd == 0:
        return f"{m} ± {sd:.{decimals}f}"
    return f"{m} ± {_fmt(sd, 2)}"


def _decimals(x: float) -> int:
    text = _fmt(x)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def metric_decimals(g: Group) -> int:
    """Decimals of the metric as the main table prints it (4 significant digits of the largest mean): differences
    are in the same unit, so 0.1250 sits beside 0.0126, never beside 0.01261."""
    means = [abs(v.stats()[0]) for v in g.variants.values()]
    means = [m for m in means if math.isfinite(m) and m > 0]
    return _decimals(max(means)) if means else 4


def main_rows(g: Group) -> list[dict]:
    t_mean, t_sd, t_n = g.teacher()
    rows = []
    for method, v in g.selected().items():
        mean, sd, n = v.stats()
        n_variants = len(g.candidates(method))
        rows.append({"method": method, "config": v.label, "params": json.dumps(v.params), "n_seeds": n,
                     "mean": mean, "sd": sd, "validation_mean": v.stats("validation_value")[0],
                     "retention_pct": 100 * mean / t_mean if t_mean else math.nan,
                     "selection": f"best of {n_variants} by validation" if n_variants > 1 else "",
                     "flags": flag_summary(v.flags())})
    rows.append({"method": "teacher", "config": "", "n_seeds": t_n, "mean": t_mean, "sd": t_sd,
                 "validation_mean": math.nan, "retention_pct": 100.0 if t_n else math.nan, "selection": "",
                 "flags": flag_summary(g.teacher_flags())})
    return rows


def ablation_rows(g: Group, method: str) -> list[dict]:
    """One row per cell of ``method``'s grid over its two label knobs (columns named by the knobs)."""
    (a, _), (b, _) = GRIDS[method]
    rows = []
    for v in g.cells(method):
        cfg = next(iter(v.runs.values())).flat
        rest = " ".join(f"{k}={p}" for k, p in v.params.items() if k not in (f"method.{a}", f"method.{b}"))
        mean, sd, n = v.stats()
        rows.append({a: cfg.get(f"method.{a}"), b: cfg.get(f"method.{b}"), "other": rest,
                     "n_seeds": n, "mean": mean, "sd": sd, "validation_mean": v.stats("validation_value")[0],
                     "flags": flag_summary(v.flags())})
    return sorted(rows, key=lambda r: (r["other"], r[a], r[b]))


def _paired_values(a: Variant, b: Variant, include_flagged: bool) -> tuple[dict, dict, str]:
    """Both sides' {seed: value}, without seeds where either run is flagged degenerate (unless included)."""
    flagged = sorted(set(a.degenerate_seeds()) | set(b.degenerate_seeds()))
    if not flagged:
        return a.values(), b.values(), ""
    seeds = ", ".join(map(str, flagged))
    if include_flagged:
        return a.values(), b.values(), f"includes flagged seed(s) {seeds}"
    keep = lambda values: {s: x for s, x in values.items() if s not in flagged}  # noqa: E731
    return keep(a.values()), keep(b.values()), f"left out flagged seed(s) {seeds} (--include-flagged keeps them)"


def _compare_rows(family: str, pairs: list[tuple[Variant, Variant]], include_flagged: bool) -> list[dict]:
    rows = []
    for a, b0 in pairs:
        va, vb, flag_note = _paired_values(a, b0, include_flagged)
        c = compare(va, vb, paired=True)
        notes = [flag_note, *(n for n in c.note.split("; ") if n and ": no test (" not in n)]
        t, df, p, d = c.t, c.df, c.p, c.cohens_d
        if c.n < MIN_PAIRS:
            notes.append(f"n too small for a test (n={c.n}, a test needs ≥ {MIN_PAIRS} pairs)")
            t = df = p = math.nan
        rows.append({"family": family, "comparison": a.label, "baseline": b0.label, "n": c.n, "mean_diff": c.mean_diff,
                     "ci_low": c.ci_low, "ci_high": c.ci_high, "t": t, "df": df, "p": p, "p_holm": math.nan,
                     "cohens_dz": d, "note": "; ".join(n for n in notes if n)})
    for row, p in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p
    return rows


def significance_rows(g: Group) -> list[dict]:
    """Holm families per setting: the selected method rows vs the baseline, each grid's cells vs the baseline, and
    the other KD methods' selected rows vs the KD reference (KD1) when the setting has it."""
    selected = g.selected()
    base = selected.get(BASELINE)
    if base is None:
        return []
    rows = _compare_rows(f"methods vs {BASELINE.upper()}", [(v, base) for m, v in selected.items() if m != BASELINE],
                         g.include_flagged)
    for method in GRIDS:
        cells = [(v, base) for v in g.cells(method)] if len(g.cells(method)) > 1 else []
        rows += _compare_rows(f"{method.upper()} grid vs {BASELINE.upper()}", cells, g.include_flagged)
    ref = selected.get(KD_REFERENCE)
    if ref is not None:
        others = [(v, ref) for m, v in selected.items() if m not in (BASELINE, KD_REFERENCE)]
        rows += _compare_rows(f"methods vs {KD_REFERENCE.upper()}", others, g.include_flagged)
    return rows


def benchmark_rows(g: Group) -> list[dict]:
    selected = g.selected()
    rows = [{"model": f"student ({m})", **v.efficiency("student")} for m, v in selected.items()]
    teacher = g.teacher_efficiency()
    if not math.isnan(teacher["total_params"]):
        rows.append({"model": "teacher", **teacher})
        ref = rows[0]
        rows.append({"model": f"teacher / {ref['model']}", **{k: teacher[k] / ref[k] if ref[k] else math.nan
                                                               for k in EFFICIENCY}, "load_avg_1m": math.nan,
                     "timing": ""})
    return rows


ROWS = {"main_results": main_rows, "significance": significance_rows,
        **{f"{m}_ablation": (lambda g, m=m: ablation_rows(g, m)) for m in GRIDS}, "benchmarks": benchmark_rows}


def markdown(name: str, g: Group, rows: list[dict]) -> list[str]:
    """A table's Markdown lines for one setting (the HTML and LaTeX tables show the same cells)."""
    if name.removesuffix("_ablation") in GRIDS:
        return _grid_markdown(rows, GRIDS[name.removesuffix("_ablation")]) + _footnotes(g, rows)
    if name == "main_results":
        rows = [{"method": r["method"], "config": r["config"], "n": r["n_seeds"],
                 f"{g.metric} (eval)": _pm(r["mean"], r["sd"]), "validation": _fmt(r["validation_mean"]),
                 "retention % of teacher": _fmt(r["retention_pct"], 3), "selection": r["selection"],
                 FLAG: r["flags"]} for r in rows]
        return _md_table(_drop_empty(rows, FLAG)) + _footnotes(g, rows)
    if name == "significance":
        return _significance_markdown(g, rows)
    rows = [{("model" if k == "model" else EFFICIENCY.get(k, k)): _fmt(v) for k, v in r.items()
             if k not in ("load_avg_1m", "timing")} | {"load avg 1 min (max)": _fmt(r["load_avg_1m"], 3),
                                                      "timing": r["timing"]} for r in rows]
    noisy = any(r["timing"] for r in rows)
    # Columns a run may not have recorded (CPU: no activation memory; older results: no load, no model memory).
    for optional in ("timing", "load avg 1 min (max)", *(EFFICIENCY[k] for k in ("model_memory_mb",
                                                                                 "activation_memory_mb"))):
        rows = _drop_empty([{k: ("" if k == optional and v == "–" else v) for k, v in r.items()} for r in rows],
                           optional)
    return _md_table(rows) + ([
        "*Timing noisy: the 1-minute load average exceeded the cores available to the run during the timed eval "
        "(others competed for the CPU); latency and throughput of those runs are not comparable.*", ""]
        if noisy else [])


def _significance_markdown(g: Group, rows: list[dict]) -> list[str]:
    d = metric_decimals(g)
    rows = [{"family": r["family"], "method": r["comparison"], "reference": r["baseline"], "n": r["n"],
             "mean diff": _fixed(r["mean_diff"], d),
             "95% CI": f"[{_fixed(r['ci_low'], d)}, {_fixed(r['ci_high'], d)}]",
             "t": _fixed(r["t"], 2), "p": _pvalue(r["p"]), "p (Holm)": _pvalue(r["p_holm"]),
             "d_z": _fixed(r["cohens_dz"], 2), "note": r["note"]} for r in rows]
    return _md_table(rows)


def _drop_empty(rows: list[dict], column: str) -> list[dict]:
    """Leave out an optional column (⚠ flags, timing) that is empty in every row of this section."""
    return rows if any(r.get(column) for r in rows) else [{k: v for k, v in r.items() if k != column} for r in rows]


def _footnotes(g: Group, rows: list[dict]) -> list[str]:
    if not any(r.get("flags") or r.get(FLAG) for r in rows):
        return []
    return [*(f"*{note}*" for note in flag_notes(g)), ""]


def _grid_markdown(rows: list[dict], knobs: tuple) -> list[str]:
    (a, short_a), (b, short_b) = knobs
    lines = []
    for other in sorted({r["other"] for r in rows}):
        sub = [r for r in rows if r["other"] == other]
        columns = sorted({r[b] for r in sub})
        grid = []
        for t in sorted({r[a] for r in sub}):
            cells = {r[b]: f"{_pm(r['mean'], r['sd'])} (n={r['n_seeds']})" + (f" {FLAG}" if r["flags"] else "")
                     for r in sub if r[a] == t}
            grid.append({f"{short_a} \\ {short_b}": t, **{f"{short_b}={c}": cells.get(c, "–") for c in columns}})
        lines += ([f"*{other}*", ""] if other else []) + _md_table(grid)
    return lines


def _md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return [f"*(no rows: this table needs {BASELINE.upper()} and another method, or a method's grid, in this "
                "setting)*", ""]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return lines + [""]
