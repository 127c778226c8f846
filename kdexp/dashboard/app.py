"""The Streamlit script that ``python -m kdexp.dashboard`` serves (``streamlit run`` re-executes it on every
interaction). Where it looks comes from the environment the launcher sets (:func:`runs.sources_from_env`), so a
test harness can set it too. The URL names the page and the run (``?page=run&run=...``), so links can be shared.
"""

from __future__ import annotations

import streamlit as st

from kdexp.dashboard import pages
from kdexp.dashboard.sources import Sources, sources_from_env

PAGES = {"runs": "Runs", "curves": "Live curves", "run": "Run", "sweep": "Sweep"}


def sidebar(sources: Sources) -> tuple[str, float]:
    params = st.query_params
    if "page" not in st.session_state:  # first run of this session: the URL may name the page
        st.session_state["page"] = params.get("page") if params.get("page") in PAGES else "runs"
    st.sidebar.title("kdexp dashboard")
    page = st.sidebar.radio("Page", list(PAGES), format_func=PAGES.get, key="page")
    refresh = st.sidebar.number_input("Refresh every (s, 0 = off)", min_value=0.0, max_value=3600.0, value=3.0,
                                      step=1.0, key="refresh")
    st.sidebar.caption("Looking in: " + ", ".join(f"`{d}`" for d in sources.dirs)
                       + (f" and the run registry in `{sources.cache_dir}`" if sources.cache_dir else ""))
    params["page"] = page
    return page, refresh


def main() -> None:
    st.set_page_config(page_title="kdexp dashboard", layout="wide")
    sources = sources_from_env()
    page, refresh = sidebar(sources)
    wanted_run = st.query_params.get("run")
    if page == "runs":
        pages.runs_page(sources, refresh)
    elif page == "curves":
        pages.curves_page(sources, refresh, [r for r in (wanted_run or "").split(",") if r])
    elif page == "run":
        pages.run_page(sources, refresh, wanted_run)
    else:
        pages.sweep_page(sources, st.query_params.get("sweep"))


main()
