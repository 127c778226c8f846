"""The report's files: CSV / Markdown / LaTeX tables, ``report.md`` and the offline ``index.html``.

Every output shows the same cells (:func:`kdexp.analysis.tables.markdown`); figures come with their captions, and
a figure left out says why.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path

from kdexp.analysis.figures import Figures
from kdexp.analysis.tables import ROWS, TABLES, Group, markdown


def write_all(groups: list[Group], out: Path, summary: str) -> dict[str, list[tuple[Group, list[dict]]]]:
    """Write ``<table>.csv`` / ``<table>.md`` / ``<table>.tex`` and ``report.md``; return the rows per table and
    group."""
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: [(g, ROWS[name](g)) for g in groups] for name in TABLES}
    # A method's ablation grid exists only when its runs do (a KD1 sweep has no KD4 grid): no empty tables.
    tables = {name: per_group for name, per_group in tables.items()
              if not name.endswith("_ablation") or any(rows for _, rows in per_group)}
    report = ["# kdexp report", "", summary, ""]
    for name, title in ((n, TABLES[n]) for n in tables):
        md = [f"# {title}", ""]
        for g, rows in tables[name]:
            md += [f"## {g.label}", "", f"Protocol: {g.note}. Metric: {g.metric}.", "", *markdown(name, g, rows)]
        (out / f"{name}.md").write_text("\n".join(md))
        (out / f"{name}.tex").write_text("\n".join(
            _latex_table(f"{title}, {g.label}. Protocol: {g.note}. Metric: {g.metric}.", markdown(name, g, rows))
            for g, rows in tables[name]))
        report += ["#" + line if line.startswith("#") else line for line in md]
        _write_csv(out / f"{name}.csv", [{"protocol": g.protocol, "setting": g.label, "task": g.task,
                                          "metric": g.metric, **r} for g, rows in tables[name] for r in rows])
    (out / "report.md").write_text("\n".join(report))
    return tables


def append_figures(report_md: Path, figures: Figures) -> None:
    """The figures section of ``report.md``: each figure with its caption, then the figures left out and why."""
    lines = ["", "## Figures", ""]
    for f in figures.drawn:
        lines += [f"![{f.title}]({f.png.relative_to(report_md.parent)})", "",
                  f"*Figure: {f.title}.* {f.caption} Files: "
                  f"{', '.join(str(p.relative_to(report_md.parent)) for p in f.files)}.", ""]
    lines += [f"*Figure {name} left out: {reason}*" for name, reason in figures.omitted.items()]
    with open(report_md, "a") as out:
        out.write("\n".join(lines) + "\n")


LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "α": r"$\alpha$",
         "→": r"$\to$", "×": r"$\times$", "–": "--", "·": r"$\cdot$", "Δ": r"$\Delta$",
         "≤": r"$\le$", "≥": r"$\ge$", "⚠": r"$\dagger$",
         "<": r"$<$", ">": r"$>$"}


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


def write_html(path: Path, tables: dict, figures: Figures, summary: str) -> None:
    """One self-contained page (relative image links) that works offline: every table, then every figure with its
    caption; a figure left out says why."""
    body = [f"<h1>kdexp report</h1><p>{html.escape(summary)}</p>"]
    for name, title in ((n, TABLES[n]) for n in tables):
        body.append(f"<h2>{html.escape(title)}</h2>")
        for g, rows in tables[name]:
            body.append(f"<h3>{html.escape(g.label)}</h3><p class=note>Protocol: {html.escape(g.note)}. "
                        f"Metric: {html.escape(g.metric)}.</p>")
            body.append(_html_table(markdown(name, g, rows)))
    body.append("<h2>Figures</h2>")
    for f in figures.drawn:
        links = " ".join(f'<a href="{p.relative_to(path.parent)}">{p.suffix[1:].upper()}'
                         f'{" 300 dpi" if p.parent != f.png.parent else ""}</a>' for p in f.files)
        body.append(f'<figure><img src="{f.png.relative_to(path.parent)}" alt="{html.escape(f.title)}">'
                    f"<figcaption><b>{html.escape(f.title)}.</b> {html.escape(f.caption)} <span class=note>"
                    f"({links})</span></figcaption></figure>")
    body += [f"<p class=note>Figure {html.escape(name)} left out: {html.escape(reason)}</p>"
             for name, reason in figures.omitted.items()]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px}.note{color:#555}img{max-width:100%}"
             "figure{margin:24px 0}figcaption{max-width:900px}")
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
