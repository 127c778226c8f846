"""The dashboard's four pages, drawn with Streamlit from what kdexp.dashboard.runs / .details read."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import altair as alt
import pandas as pd
import streamlit as st

from kdexp.analysis.tables import TABLES
from kdexp.dashboard import details
from kdexp.dashboard.runs import (
    STATUSES,
    by_sweep,
    counts,
    discover,
    filter_rows,
    run_row,
    run_status,
    runs_table,
    source_dir,
)
from kdexp.dashboard.sources import Sources
from kdexp.methods import METHODS

COLUMNS = ["run", "open", "curves", "status", "phase", "step", "method", "task", "teacher", "student", "seed", "T",
           "α", "knobs", "metric", "eval", "validation", "teacher_value", "wall_time_s", "started", "heartbeat_age_s"]
SORTABLE = ["started", "run", "status", "method", "task", "seed", "T", "α", "eval", "validation", "wall_time_s"]
EXTRA_CURVE_KEYS = ("grad_norm",)


def live(refresh: float, body, *args) -> None:
    """Run ``body`` as a fragment that Streamlit reruns every ``refresh`` seconds (0: once, with the page)."""
    if refresh > 0:
        st.fragment(body, run_every=refresh)(*args)
    else:
        body(*args)


def _when(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["open"] = [f"?page=run&run={quote(r, safe='/')}" for r in df["run"]]
    df["curves"] = [f"?page=curves&run={quote(r, safe='/')}" for r in df["run"]]
    df["started"] = [_when(t) for t in df["started"]]
    return df[[c for c in COLUMNS if c in df]]


# ---- runs ----------------------------------------------------------------------------------------------------

def runs_page(sources: Sources, refresh: float) -> None:
    st.header("Runs")
    c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 1.4])
    text = c1.text_input("Filter", key="filter", placeholder="any field: method, task, path, …")
    statuses = c2.multiselect("Status", STATUSES, key="status_filter")
    chosen = c3.multiselect("Method", list(METHODS), key="method_filter")
    sort_by = c4.selectbox("Sort by", SORTABLE, key="sort_by")
    descending = c5.toggle("Descending", value=True, key="descending")
    live(refresh, _runs_body, sources, text, statuses, chosen, sort_by, descending)


def _runs_body(sources, text, statuses, chosen, sort_by, descending) -> None:
    every = runs_table(sources)
    rows = filter_rows(every, text, statuses, chosen, sort_by, descending)
    tally = counts(every)
    st.markdown(" · ".join(f"**{n}** {s}" for s, n in tally.items()) or "No runs found.")
    st.caption(f"updated {time.strftime('%H:%M:%S')} · {len(rows)} of {len(every)} run(s) shown")
    for sweep, members in by_sweep(rows).items():
        summary = ", ".join(f"{n} {s}" for s, n in counts(members).items())
        st.subheader(f"Sweep {sweep}" if sweep else "Single runs")
        st.caption(f"{len(members)} run(s): {summary}")
        st.dataframe(_frame(members), hide_index=True, key=f"runs:{sweep}", column_config={
            "open": st.column_config.LinkColumn("open", display_text="open"),
            "curves": st.column_config.LinkColumn("curves", display_text="curves"),
            "eval": st.column_config.NumberColumn(format="%.4f"),
            "validation": st.column_config.NumberColumn(format="%.4f"),
            "teacher_value": st.column_config.NumberColumn("teacher", format="%.4f")})


# ---- curves --------------------------------------------------------------------------------------------------

def curves_page(sources: Sources, refresh: float, wanted: list[str]) -> None:
    st.header("Live curves")
    found = discover(sources)
    if "curve_runs" in st.session_state:  # a run deleted since the last rerun is no longer an option
        st.session_state["curve_runs"] = [r for r in st.session_state["curve_runs"] if r in found]
    else:
        running = [label for label, path in found.items() if run_status(path).status in ("running", "starting")]
        st.session_state["curve_runs"] = [r for r in wanted if r in found] or running or list(found)[:3]
    picked = st.multiselect("Runs (overlaid)", list(found), key="curve_runs")
    keys = st.multiselect("Curves", [*details.CURVE_KEYS, *EXTRA_CURVE_KEYS], default=list(details.CURVE_KEYS),
                          key="curve_keys")
    live(refresh, _curves_body, {label: source_dir(found[label]) for label in picked}, keys)


def _curves_body(runs: dict[str, Path], keys: list[str]) -> None:
    if not runs:
        st.info("Pick one or more runs.")
        return
    for label, path in runs.items():
        s, c = run_status(path), details.curve_summary(path)
        loss = f" · loss {c['last_loss']:.4f}" if c["last_loss"] is not None else ""
        st.caption(f"{label}: {s.status}{f' ({s.phase})' if s.phase else ''} · {c['points']} logged step(s) · "
                   f"last step {c['last_step']}{loss}")
    curves(runs, keys)


def curves(runs: dict[str, Path], keys) -> None:
    """One chart per curve (loss, CE term, KD term, learning rate), the runs overlaid."""
    df = pd.DataFrame(details.curve_rows(runs, keys))
    if df.empty:
        st.info("No logged training steps yet (train_log.jsonl appears with the first logged step).")
        return
    shown = [k for k in keys if k in set(df["metric"])]
    cols = st.columns(2)
    for i, key in enumerate(shown):
        with cols[i % 2]:
            st.markdown(f"**{key}**")
            st.altair_chart(line_chart(df[df["metric"] == key], key))


def line_chart(df: pd.DataFrame, key: str) -> alt.Chart:
    # Not from zero: a loss that moves from 5.4 to 5.2 must not look flat.
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step:Q", title="optimizer step"), y=alt.Y("value:Q", title=key, scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", scale=alt.Scale(scheme="tableau10"),
                        legend=alt.Legend(orient="bottom", labelLimit=400)),
        tooltip=["run", "step", "stage", "value"]).properties(height=230).interactive()


# ---- run -----------------------------------------------------------------------------------------------------

def run_page(sources: Sources, refresh: float, wanted: str | None) -> None:
    st.header("Run")
    found = discover(sources)
    if not found:
        st.info("No runs found.")
        return
    if "run_pick" not in st.session_state or st.session_state["run_pick"] not in found:
        st.session_state["run_pick"] = wanted if wanted in found else next(iter(found))
    label = st.selectbox("Run", list(found), key="run_pick")
    st.query_params["run"] = label
    status, path = run_status(found[label]), source_dir(found[label])
    results = details.read_json(path / details.RESULTS) or {}
    row = run_row(found[label], label)
    facts = [row["method"], row["task"], f"{row['teacher']} → {row['student']}", f"seed {row['seed']}", row["knobs"],
             f"{row['wall_time_s']} s" if row["wall_time_s"] else ""]
    st.markdown(f"**{status.status}**{f' ({status.phase})' if status.phase else ''} · "
                + " · ".join(str(f) for f in facts if f) + f" · `{found[label]}`")
    if path != found[label]:
        st.caption(f"The run registry skipped this job: it reused the complete run in `{path}`, shown below.")
    overview, samples_tab, config_tab = st.tabs(["Overview", "Samples", "Config"])
    with overview:
        _overview(path, results, refresh)
    with samples_tab:
        samples_view(path)
    with config_tab:
        st.code(details.composed_config(path) or "(no .hydra/config.yaml)", language="yaml")


def _overview(path: Path, results: dict, refresh: float) -> None:
    if results:
        st.subheader("Metrics vs teacher")
        st.dataframe(pd.DataFrame(details.metric_rows(results)), hide_index=True)
        st.subheader("Efficiency")
        st.dataframe(pd.DataFrame(details.efficiency_rows(results)), hide_index=True)
        st.caption(f"wall time {results.get('wall_time_s')} s · timings {json.dumps(results.get('timings_s'))}")
    else:
        st.info("No results.json yet: metrics and efficiency appear when the run completes.")
    st.subheader("Training curves")
    live(refresh, curves, {path.name: path}, list(details.CURVE_KEYS))


def samples_view(path: Path) -> None:
    rows = details.samples(path)
    if not rows:
        st.info("No samples.jsonl in this run yet (written at evaluation time).")
        return
    if not any(r.get("tokens") for r in rows):
        st.info("No per-token comparison: disagreements.jsonl is written at evaluation time by runs with a teacher.")
    st.caption("Sorted by the largest per-token KL(p_T‖p_S); tokens within a sample likewise.")
    for i, row in enumerate(rows):
        kl = f" · max KL {row['kl_max']:.4g}" if row.get("kl_max") is not None else ""
        agree = "" if row.get("teacher") is None else (" · student = teacher" if row.get("student") == row["teacher"]
                                                       else " · student ≠ teacher")
        with st.expander(f"#{i + 1} · id {row.get('id')}{kl}{agree}", expanded=i < 2):
            cols = st.columns([3, 1, 1, 1])
            cols[0].markdown("**prompt**")
            cols[0].text(row.get("prompt") or "")
            for col, key in zip(cols[1:], ("gold", "teacher", "student"), strict=True):
                col.markdown(f"**{key}**")
                col.code(json.dumps(row.get(key), ensure_ascii=False), language=None)
            if row.get("note"):
                st.caption(row["note"])
            if row.get("tokens"):
                st.dataframe(pd.DataFrame(details.token_rows(row)), hide_index=True)


# ---- sweep ---------------------------------------------------------------------------------------------------

def sweep_page(sources: Sources, wanted: str | None) -> None:
    st.header("Sweep")
    sweeps = sorted({r["sweep"] for r in runs_table(sources) if r["sweep"]})
    if wanted and wanted not in sweeps:
        sweeps.insert(0, wanted)
    if not sweeps:
        st.info("No multirun sweep found (a sweep directory holds Hydra's multirun.yaml).")
        return
    chosen = st.selectbox("Sweep directory", sweeps, key="sweep_pick")
    st.query_params["sweep"] = chosen
    with st.spinner("Building the report (kdexp.report) …"):
        rep = details.sweep_report(Path(chosen))
    if rep.error:
        st.warning(rep.error)
        return
    st.caption(f"{rep.summary} · report files: {rep.out}")
    heatmaps(rep.out)
    for name, md in rep.tables.items():
        with st.expander(TABLES[name], expanded=name == "main_results"):
            # The first line repeats the expander's title; a setting's heading shrinks to bold inside the expander.
            st.markdown(re.sub(r"^## (.*)$", r"**\1**", md.split("\n", 2)[-1], flags=re.M))
    st.subheader("Figures")
    cols = st.columns(2)
    for i, fig in enumerate(rep.figures):
        cols[i % 2].image(str(fig), caption=fig.stem)


def heatmaps(report_dir: Path) -> None:
    for method, cells in details.heatmap_rows(report_dir).items():
        row_short, col_short = details.grid_knobs(method)
        st.subheader(f"{method.upper()}: {row_short} × {col_short} (eval mean over seeds)")
        for (setting, other), group in pd.DataFrame(cells).groupby(["setting", "other"], dropna=False):
            st.caption(setting + (f" · {other}" if isinstance(other, str) and other else ""))
            st.altair_chart(heatmap(group, row_short, col_short))


def heatmap(cells: pd.DataFrame, row_short: str, col_short: str) -> alt.LayerChart:
    cells = cells.assign(label=[f"{m:.4f} (n={n})" for m, n in zip(cells["mean"], cells["n"], strict=True)])
    base = alt.Chart(cells).encode(x=alt.X("col:O", title=col_short, axis=alt.Axis(labelAngle=0)),
                                   y=alt.Y("row:O", title=row_short, axis=alt.Axis(titleAngle=0)))
    rect = base.mark_rect().encode(color=alt.Color("mean:Q", scale=alt.Scale(scheme="yellowgreenblue"), title="mean"),
                                   tooltip=["row", "col", "mean", "sd", "n"])
    middle = (cells["mean"].min() + cells["mean"].max()) / 2  # dark cells get white text
    text = base.mark_text(fontSize=13).encode(
        text="label:N", color=alt.condition(alt.datum.mean > middle, alt.value("white"), alt.value("black")))
    return (rect + text).properties(height=60 * cells["row"].nunique() + 40, width=140 * cells["col"].nunique() + 80)
