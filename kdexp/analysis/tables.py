"""Tables of the report: aggregation over seeds, paired significance vs B0, CSV / Markdown / HTML output.

Every table is a list of row dicts carrying ``protocol`` and ``setting`` columns, so a CSV never mixes tasks without
saying so, and the Markdown / HTML versions get one section per setting with its protocol note on top.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdexp.analysis.stats import compare, describe, holm
from kdexp.methods import METHODS

# What the report shows for each method comes from its module: the baseline every other method is tested against,
# and the ablation grid over a method's two label knobs (KD1: temperature × alpha).
BASELINE = next(name for name, module in METHODS.items() if module.BASELINE)
GRIDS = {name: tuple(module.LABEL_KNOBS.items()) for name, module in METHODS.items() if len(module.LABEL_KNOBS) == 2}

EFFICIENCY = {"total_params": "params", "disk_mb": "disk MB", "latency_ms_per_example": "latency ms/ex",
              "throughput_examples_per_s": "throughput ex/s", "peak_memory_mb": "peak memory MB"}
TABLES = {
    "main_results": "Main results (eval split, mean ± sd over seeds)",
    "significance": f"Significance vs {BASELINE.upper()} (paired by seed, eval split)",
    **{f"{m}_ablation": f"{m.upper()} ablation: {a} × {b} (eval split, mean ± sd)"
       for m, ((a, _), (b, _)) in GRIDS.items()},
    "benchmarks": "Benchmarks (means over runs)",
}


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


@dataclass
class Group:
    protocol: str
    task: str
    label: str
    variants: dict  # label -> Variant
    note: str

    @property
    def metric(self) -> str:
        return next(iter(next(iter(self.variants.values())).runs.values())).data["main_metric"]["name"]

    def selected(self) -> dict[str, Variant]:
        """Per method, the variant with the best mean validation score (selection never looks at eval)."""
        best: dict[str, Variant] = {}
        for v in self.variants.values():
            if v.method not in best or v.stats("validation_value")[0] > best[v.method].stats("validation_value")[0]:
                best[v.method] = v
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
        return _mean_efficiency([r.data.get("efficiency", {}).get("teacher") for v in self.variants.values()
                                 for r in v.runs.values()])

    def cells(self, method: str) -> list[Variant]:
        return [v for v in self.variants.values() if v.method == method]


def _mean_efficiency(entries: list[dict | None]) -> dict:
    entries = [e for e in entries if e]
    return {k: describe([e.get(k) if e.get(k) is not None else math.nan for e in entries])[0] for k in EFFICIENCY}


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


def _ci(mean: float, low: float, high: float) -> str:
    """[low, high] to the mean difference's decimal places ([0.1100, 0.1996], not [0.11, 0.1996])."""
    d = _decimals(mean)
    if any(isinstance(x, float) and not math.isfinite(x) for x in (mean, low, high)) or not d:
        return f"[{_fmt(low)}, {_fmt(high)}]"
    return f"[{low:.{d}f}, {high:.{d}f}]"


def main_rows(g: Group) -> list[dict]:
    t_mean, t_sd, t_n = g.teacher()
    rows = []
    for method, v in g.selected().items():
        mean, sd, n = v.stats()
        n_variants = sum(x.method == method for x in g.variants.values())
        rows.append({"method": method, "config": v.label, "params": json.dumps(v.params), "n_seeds": n,
                     "mean": mean, "sd": sd, "validation_mean": v.stats("validation_value")[0],
                     "retention_pct": 100 * mean / t_mean if t_mean else math.nan,
                     "selection": f"best of {n_variants} by validation" if n_variants > 1 else ""})
    rows.append({"method": "teacher", "config": "", "n_seeds": t_n, "mean": t_mean, "sd": t_sd,
                 "validation_mean": math.nan, "retention_pct": 100.0 if t_n else math.nan, "selection": ""})
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
                     "n_seeds": n, "mean": mean, "sd": sd, "validation_mean": v.stats("validation_value")[0]})
    return sorted(rows, key=lambda r: (r["other"], r[a], r[b]))


def _compare_rows(family: str, pairs: list[tuple[Variant, Variant]]) -> list[dict]:
    rows = []
    for a, b0 in pairs:
        c = compare(a.values(), b0.values(), paired=True)
        rows.append({"family": family, "comparison": a.label, "baseline": b0.label, "n": c.n, "mean_diff": c.mean_diff,
                     "ci_low": c.ci_low, "ci_high": c.ci_high, "t": c.t, "df": c.df, "p": c.p, "p_holm": math.nan,
                     "cohens_dz": c.cohens_d, "note": c.note})
    for row, p in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p
    return rows


def significance_rows(g: Group) -> list[dict]:
    """Holm families per setting: the selected method rows vs the baseline, and each grid's cells vs the baseline."""
    selected = g.selected()
    base = selected.get(BASELINE)
    if base is None:
        return []
    rows = _compare_rows(f"methods vs {BASELINE.upper()}", [(v, base) for m, v in selected.items() if m != BASELINE])
    for method in GRIDS:
        cells = [(v, base) for v in g.cells(method)] if len(g.cells(method)) > 1 else []
        rows += _compare_rows(f"{method.upper()} grid vs {BASELINE.upper()}", cells)
    return rows


def benchmark_rows(g: Group) -> list[dict]:
    selected = g.selected()
    rows = [{"model": f"student ({m})", **{k: v.efficiency("student")[k] for k in EFFICIENCY}}
            for m, v in selected.items()]
    teacher = g.teacher_efficiency()
    if not math.isnan(teacher["total_params"]):
        rows.append({"model": "teacher", **teacher})
        ref = rows[0]
        rows.append({"model": f"teacher / {ref['model']}",
                     **{k: teacher[k] / ref[k] if ref[k] else math.nan for k in EFFICIENCY}})
    return rows


ROWS = {"main_results": main_rows, "significance": significance_rows,
        **{f"{m}_ablation": (lambda g, m=m: ablation_rows(g, m)) for m in GRIDS}, "benchmarks": benchmark_rows}


def _markdown(name: str, g: Group, rows: list[dict]) -> list[str]:
    if name.removesuffix("_ablation") in GRIDS:
        return _grid_markdown(rows, GRIDS[name.removesuffix("_ablation")])
    if name == "main_results":
        rows = [{"method": r["method"], "config": r["config"], "n": r["n_seeds"],
                 f"{g.metric} (eval)": _pm(r["mean"], r["sd"]), "validation": _fmt(r["validation_mean"]),
                 "retention % of teacher": _fmt(r["retention_pct"], 3), "selection": r["selection"]} for r in rows]
    elif name == "significance":
        rows = [{"family": r["family"], "vs B0": r["comparison"], "n": r["n"], "mean diff": _fmt(r["mean_diff"]),
                 "95% CI": _ci(r["mean_diff"], r["ci_low"], r["ci_high"]), "t": _fmt(r["t"], 3),
                 "p": _fmt(r["p"], 3), "p (Holm)": _fmt(r["p_holm"], 3), "d_z": _fmt(r["cohens_dz"], 3),
                 "note": r["note"]} for r in rows]
    else:
        rows = [{("model" if k == "model" else EFFICIENCY[k]): _fmt(v) for k, v in r.items()} for r in rows]
    return _md_table(rows)


def _grid_markdown(rows: list[dict], knobs: tuple) -> list[str]:
    (a, short_a), (b, short_b) = knobs
    lines = []
    for other in sorted({r["other"] for r in rows}):
        sub = [r for r in rows if r["other"] == other]
        columns = sorted({r[b] for r in sub})
        grid = []
        for t in sorted({r[a] for r in sub}):
            cells = {r[b]: f"{_pm(r['mean'], r['sd'])} (n={r['n_seeds']})" for r in sub if r[a] == t}
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


def write_all(groups: list[Group], out: Path, summary: str) -> dict[str, list[tuple[Group, list[dict]]]]:
    """Write ``<table>.csv`` / ``<table>.md`` and ``report.md``; return the rows per table and group."""
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: [(g, ROWS[name](g)) for g in groups] for name in TABLES}
    report = ["# kdexp report", "", summary, ""]
    for name, title in TABLES.items():
        md = [f"# {title}", ""]
        for g, rows in tables[name]:
            md += [f"## {g.label}", "", f"Protocol: {g.note}. Metric: {g.metric}.", "", *_markdown(name, g, rows)]
        (out / f"{name}.md").write_text("\n".join(md))
        (out / f"{name}.tex").write_text("\n".join(
            _latex_table(f"{title}, {g.label}. Protocol: {g.note}. Metric: {g.metric}.", _markdown(name, g, rows))
            for g, rows in tables[name]))
        report += ["#" + line if line.startswith("#") else line for line in md]
        _write_csv(out / f"{name}.csv", [{"protocol": g.protocol, "setting": g.label, "task": g.task,
                                          "metric": g.metric, **r} for g, rows in tables[name] for r in rows])
    (out / "report.md").write_text("\n".join(report))
    return tables


LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "α": r"$\alpha$",
         "→": r"$\to$", "×": r"$\times$", "–": "--", "·": r"$\cdot$", "Δ": r"$\Delta$",
         "≤": r"$\le$", "≥": r"$\ge$"}


def _tex(text: str) -> str:
    return "".join(LATEX.get(ch, ch) for ch in text)


def _md_blocks(md_lines: list[str]) -> list[list[list[str]] | str]:
    """The Markdown lines produced above as a list of tables (rows of raw cell text) and non-empty text lines, so
    the HTML page and the LaTeX tables show the same cells as the .md files."""
    blocks: list[list[list[str]] | str] = []
    for line in md_lines:
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            if not blocks or isinstance(blocks[-1], str):
                blocks.append([])
            blocks[-1].append([c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")])
        elif line:
            blocks.append(line)
        elif blocks and not isinstance(blocks[-1], str):
            blocks.append("")  # a blank line ends a table: the next one (e.g. another grid) starts anew
    return [b for b in blocks if b != ""]


def _latex_table(caption: str, md_lines: list[str]) -> str:
    """A booktabs table (\\usepackage{booktabs}) with the same cell text as the Markdown/HTML tables."""
    body = []
    for b in _md_blocks(md_lines):
        if isinstance(b, str):
            continue
        rows = [" & ".join(_tex(c) for c in row) + r" \\" for row in b]
        body += [r"\begin{tabular}{" + "l" * len(b[0]) + "}", r"\toprule", rows[0], r"\midrule", *rows[1:],
                 r"\bottomrule", r"\end{tabular}"]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}", *(body or ["(no rows)"]),
                      r"\end{table}", ""])


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["protocol", "setting", "task", "metric"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def write_html(path: Path, tables: dict, images: list[Path], summary: str) -> None:
    """One self-contained page (relative image links) that works offline: every table, then every figure."""
    body = [f"<h1>kdexp report</h1><p>{html.escape(summary)}</p>"]
    for name, title in TABLES.items():
        body.append(f"<h2>{html.escape(title)}</h2>")
        for g, rows in tables[name]:
            body.append(f"<h3>{html.escape(g.label)}</h3><p class=note>Protocol: {html.escape(g.note)}. "
                        f"Metric: {html.escape(g.metric)}.</p>")
            body.append(_html_table(_markdown(name, g, rows)))
    body.append("<h2>Figures</h2>")
    body += [f'<figure><img src="{p.relative_to(path.parent)}" alt="{p.stem}"><figcaption>{p.stem}'
             "</figcaption></figure>" for p in images]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px}.note{color:#555}img{max-width:100%}")
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>kdexp report</title><style>{style}"
                    f"</style></head><body>{''.join(body)}</body></html>")


def _html_table(md_lines: list[str]) -> str:
    out = []
    for b in _md_blocks(md_lines):
        if isinstance(b, str):
            out.append(f"<p>{html.escape(b.strip('*'))}</p>")
            continue
        rows = ["".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                for i, row in enumerate(b)]
        out.append("<table>" + "".join(f"<tr>{r}</tr>" for r in rows) + "</table>")
    return "".join(out)
