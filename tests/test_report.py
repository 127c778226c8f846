"""The report on a real small sweep (tiny pair, smoke sizes): every table and figure, numbers that match stats."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdexp.analysis.report import build
from kdexp.analysis.stats import compare, describe, holm
from kdexp.main import run
from tests.conftest import ROOT, compose_cfg, run_cli

TABLES = ["main_results", "significance", "kd1_ablation", "benchmarks"]
FIGURES = ["perf_vs_size", "latency", "kd_methods", "pareto", "kd_gain", "peak_memory"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """3 seeds x (B0 + KD1 at T in {1, 4}) on SST-2 from a preset grid, plus one SQuAD B0 run in the same tree."""
    work = tmp_path_factory.mktemp("report")
    proc = run_cli("--multirun", "--config-dir", str(ROOT / "tests" / "conf"), "experiment=tiny_grid",
                   "hydra.sweep.dir=sweep", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = compose_cfg(["experiment=smoke", "task=squad", "method=b0", "seed=1"], work)
    cfg.output_dir = str(work / "sweep" / "squad_b0")
    run(cfg)
    return work / "sweep"


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in root.rglob("results.json")]


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _values(results: list[dict], method: str, temperature=None) -> dict:
    return {r["seed"]: r["main_metric"]["value"] for r in results if r["task"] == "sst2" and r["method"] == method
            and (temperature is None or r["config"]["method"]["temperature"] == temperature)}


@pytest.mark.slow
def test_report_has_every_table_and_figure(sweep, tmp_path):
    out = build([sweep], tmp_path / "rep")
    for name in TABLES:
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.md").stat().st_size > 0
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        web, printed = out / "figures" / f"{name}.png", out / "figures" / "300dpi" / f"{name}.png"
        assert printed.stat().st_size > web.stat().st_size
        assert (out / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    page = (out / "index.html").read_text()
    assert all(f'src="figures/{name}.png"' in page for name in FIGURES)
    assert page.count("<table>") >= 4 and "Significance vs B0 and KD1" in page and "plain sweep" in page
    report = (out / "report.md").read_text()
    # Grouped by task: each task is its own section, never one mixed table.
    assert "sst2 · tiny → tiny" in report and "squad · tiny → tiny" in report
    assert {r["task"] for r in _csv(out / "main_results.csv")} == {"sst2", "squad"}
    tex = (out / "main_results.tex").read_text()  # one booktabs table per setting, same cells as the CSV
    assert tex.count(r"\begin{table}") == tex.count(r"\end{tabular}") == 2
    b0 = next(r for r in _csv(out / "main_results.csv") if r["task"] == "sst2" and r["method"] == "b0")
    assert f"{float(b0['mean']):#.4g} $\\pm$" in tex


def test_latex_tables_escape_and_keep_every_cell():
    from kdexp.analysis.pages import _latex_table

    md = ["| vs B0 | 95% CI | d_z |", "|---|---|---|", "| kd1 T=1 α=0.9 | [0.1, 0.3] | 4.1 |", "",
          "*other*", "", "| a \\| b | c |", "|---|---|", "| 1 ± 0.1 | – |", ""]
    tex = _latex_table("Δ & 50% of x_y", md)
    assert r"\caption{$\Delta$ \& 50\% of x\_y}" in tex
    assert r"vs B0 & 95\% CI & d\_z \\" in tex and r"kd1 T=1 $\alpha$=0.9 & [0.1, 0.3] & 4.1 \\" in tex
    assert tex.count(r"\begin{tabular}{lll}") == 1 and tex.count(r"\begin{tabular}{ll}") == 1
    assert r"a | b & c \\" in tex and r"1 $\pm$ 0.1 & -- \\" in tex


@pytest.mark.slow
def test_significance_matches_compare_on_the_same_data(sweep, tmp_path):
    # Smoke-sized runs are flagged degenerate (one class); the comparison is about the arithmetic, so keep them.
    out = build([sweep], tmp_path / "rep", include_flagged=True)
    results = _results(sweep)
    b0 = _values(results, "b0")
    assert len(b0) == 3
    rows = [r for r in _csv(out / "significance.csv") if r["task"] == "sst2"]
    grid = [r for r in rows if r["family"] == "KD1 grid vs B0"]
    assert {r["comparison"] for r in grid} == {"kd1 T=1 α=0.5", "kd1 T=4 α=0.5"}
    expected = {t: compare(_values(results, "kd1", t), b0, paired=True) for t in (1.0, 4.0)}
    adjusted = holm([expected[1.0].p, expected[4.0].p])
    for row in grid:
        t = 1.0 if "T=1 " in row["comparison"] else 4.0
        c = expected[t]
        got = [float(row[k]) for k in ("n", "mean_diff", "ci_low", "ci_high", "t", "p", "cohens_dz", "p_holm")]
        want = [c.n, c.mean_diff, c.ci_low, c.ci_high, c.t, c.p, c.cohens_d, adjusted[0 if t == 1.0 else 1]]
        assert got == pytest.approx(want, nan_ok=True)
    # The KD1 method row is the grid cell with the best mean validation score, compared in its own family.
    (method_row,) = [r for r in rows if r["family"] == "methods vs B0"]
    val = {t: describe({r["seed"]: r["main_metric"]["validation_value"] for r in results if r["method"] == "kd1"
                        and r["config"]["method"]["temperature"] == t})[0] for t in (1.0, 4.0)}
    best = 1.0 if val[1.0] >= val[4.0] else 4.0
    assert method_row["comparison"] == f"kd1 T={best:g} α=0.5"
    assert float(method_row["p_holm"]) == pytest.approx(expected[best].p, nan_ok=True)  # a family of one


@pytest.mark.slow
def test_main_table_and_benchmarks_match_results(sweep, tmp_path):
    out = build([sweep], tmp_path / "rep")
    results = _results(sweep)
    rows = {r["method"]: r for r in _csv(out / "main_results.csv") if r["task"] == "sst2"}
    mean, sd, n = describe(_values(results, "b0"))
    assert (float(rows["b0"]["mean"]), float(rows["b0"]["sd"]), int(rows["b0"]["n_seeds"])) == \
        pytest.approx((mean, sd, n))
    teacher = [r["main_metric"]["teacher_value"] for r in results if r["task"] == "sst2"]
    assert float(rows["teacher"]["mean"]) == pytest.approx(sum(teacher) / len(teacher))
    # One prepared teacher, re-evaluated by every run: one model, not len(teacher) samples.
    assert len({r["teacher_info"]["key"] for r in results if r["task"] == "sst2"}) == 1
    assert int(rows["teacher"]["n_seeds"]) == 1 and rows["teacher"]["sd"] in ("", "nan")
    assert float(rows["b0"]["retention_pct"]) == pytest.approx(100 * mean / float(rows["teacher"]["mean"]))
    bench = {r["model"]: r for r in _csv(out / "benchmarks.csv") if r["task"] == "sst2"}
    ratio = bench["teacher / student (b0)"]
    assert float(ratio["latency_ms_per_example"]) == pytest.approx(
        float(bench["teacher"]["latency_ms_per_example"]) / float(bench["student (b0)"]["latency_ms_per_example"]))
    cells = _csv(out / "kd1_ablation.csv")
    assert sorted(float(c["temperature"]) for c in cells) == [1.0, 4.0] and all(c["n_seeds"] == "3" for c in cells)


@pytest.mark.slow
def test_incomplete_and_reused_runs_are_counted(sweep, tmp_path, caplog):
    # B0 ignores T: its T=4 jobs were skipped by the run registry and left pointers, not duplicates.
    assert len(list(sweep.rglob("reused_results.json"))) == 3
    broken = tmp_path / "broken" / "0"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text(json.dumps({"status": "running"}))
    with caplog.at_level("INFO", logger="kdexp.analysis.report"):
        build([sweep, tmp_path / "broken"], tmp_path / "rep")
    assert "10 complete run(s)" in caplog.text and "1 incomplete results.json" in caplog.text
    assert "3 registry skip(s) pointing at runs counted here" in caplog.text


def test_no_complete_results_is_a_one_line_error(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "results.json").write_text(json.dumps({"status": "running"}))
    proc = subprocess.run([sys.executable, "-m", "kdexp.report", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdexp.analysis.report: error: no complete results.json")
    missing = subprocess.run([sys.executable, "-m", "kdexp.report", str(tmp_path / "nope")], capture_output=True,
                             text=True, cwd=ROOT)
    assert missing.returncode != 0 and "is not a directory" in missing.stderr


def test_model_memory_counts_parameters_and_buffers_once():
    import torch

    from kdexp.core.evaluate import model_memory_mb

    emb = torch.nn.Embedding(100, 8)  # 800 float32
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight  # tied, as in many LMs: one tensor in memory
    model = torch.nn.Sequential(emb, head, torch.nn.BatchNorm1d(4))
    # float32 embedding (tied head counted once), BatchNorm weight + bias, running mean + var, one int64 counter
    expected = 800 * 4 + (4 + 4) * 4 + (4 + 4) * 4 + 8
    assert model_memory_mb(model) * 2**20 == expected


def test_timing_is_noisy_only_when_the_load_exceeded_the_cores():
    from kdexp.core.evaluate import machine_load, timing_noisy

    assert timing_noisy({"load_avg_1m": 2.5, "cores_available": 2})
    assert not timing_noisy({"load_avg_1m": 2.0, "cores_available": 2})
    assert not timing_noisy({"latency_ms_per_example": 3.0})  # results written before loads were recorded
    load = machine_load(load_before=1e6)
    assert load["load_avg_1m"] == 1e6 and load["cores_available"] >= 1 and load["load_avg_5m"] >= 0
