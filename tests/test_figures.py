"""Report output on constructed results: figure files and captions, flagged runs, significance formats, timing."""

import json
import struct
from pathlib import Path

import pytest

from kdexp.analysis import pages
from kdexp.analysis.figures import EMPTY, FIGURES, setting_title
from kdexp.analysis.report import build, group, scan
from kdexp.analysis.stats import compare

B0 = {1: 0.70, 2: 0.72, 3: 0.71}
KD1_T1 = {1: 0.74, 2: 0.77, 3: 0.73}  # +0.04, +0.05, +0.02: a clear gain
KD1_T2 = {1: 0.7123, 2: 0.7341}  # two seeds only


def _efficiency(params: int, latency: float, load: float) -> dict:
    return {"total_params": params, "disk_mb": params * 4 / 2**20, "latency_ms_per_example": latency,
            "throughput_examples_per_s": 1000 / latency, "peak_memory_mb": 900.0,
            "model_memory_mb": params * 4 / 2**20, "load_avg_1m": load, "cores_available": 2, "eval_batch_size": 32}


def _result(method: str, seed: int, value: float, params: dict | None = None, flags=None, load=0.5,
            memory=True) -> dict:
    eff = {"student": _efficiency(3_300_000, 2.0, load), "teacher": _efficiency(14_000_000, 5.0, load)}
    if not memory:
        for e in eff.values():
            del e["model_memory_mb"]
    return {"status": "complete", "run_key": f"{method}-{json.dumps(params)}-{seed}", "method": method,
            "task": "sst2", "teacher": "tiny", "student": "tiny", "seed": seed,
            "config": {"method": {"name": method, **(params or {})}, "task": {"name": "sst2"},
                       "teacher": {"name": "tiny"}, "student": {"name": "tiny"}, "train": {"lr": 0.001}},
            "main_metric": {"name": "accuracy", "value": value, "validation_value": value, "teacher_value": 0.82},
            "teacher_info": {"key": "teacher-1"}, "efficiency": eff, "flags": flags or [],
            "diagnostics": {"top1_agreement": 0.6, "top_k_overlap": 0.5, "student_ece": 0.05, **(
                {"teacher_top_k_mass": 0.9, "temperature": params["temperature"]} if params and "temperature" in params
                else {})}}


def _write(root: Path, results: list[dict]) -> Path:
    for i, r in enumerate(results):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps(r))
    return root


def _sweep(root: Path, b0=True, flags: dict | None = None, **kw) -> Path:
    flags = flags or {}
    runs = [_result("b0", s, v, **kw) for s, v in B0.items()] if b0 else []
    runs += [_result("kd1", s, v, {"temperature": 1.0, "alpha": 0.5}, flags.get(s), **kw) for s, v in KD1_T1.items()]
    runs += [_result("kd1", s, v, {"temperature": 2.0, "alpha": 0.5}, **kw) for s, v in KD1_T2.items()]
    return _write(root, runs)


def _groups(root: Path, include_flagged: bool = False):
    groups = group(scan([root]).runs, {})
    for g in groups:
        g.include_flagged = include_flagged
    return groups


def _tables(root: Path, out: Path, include_flagged: bool = False) -> Path:
    """The report's tables without its figures (drawing is the slow part: ~1 s per file on a busy 2-core box)."""
    pages.write_all(_groups(root, include_flagged), out, "summary")
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full")
    return build([_sweep(root / "sweep")], root / "rep")


def _png_dpi(path: Path) -> float:
    """The pixels per metre of a PNG's pHYs chunk, in dots per inch."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at = data.index(b"pHYs")
    return struct.unpack(">I", data[at + 4:at + 8])[0] * 0.0254


SINGLE = [{"code": "single_class", "who": "student", "severity": "degenerate",
           "message": "predicts ' positive' for 872/872 eval examples"}]


def test_every_figure_in_every_format_with_a_caption(full):
    out = full
    page = (out / "index.html").read_text()
    for name in FIGURES:
        assert _png_dpi(out / "figures" / f"{name}.png") == pytest.approx(110, abs=1)
        assert _png_dpi(out / "figures" / "300dpi" / f"{name}.png") == pytest.approx(300, abs=1)
        assert (out / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert f'src="figures/{name}.png"' in page and f'href="figures/{name}.pdf"' in page
    assert "<figcaption>perf_vs_size" not in page and page.count("<figcaption><b>") == len(FIGURES)
    assert "n = 3 seeds per method" in page  # B0 and kd1's selected cell (T=1; the T=2 cell has 2 seeds)
    assert "(3 variants, each the mean over its seeds)" in page
    assert "parameter and buffer bytes" in page and "not the process peak" in page
    report = (out / "report.md").read_text()
    assert "![Score against model size](figures/perf_vs_size.png)" in report


def test_setting_title_is_plain_words(tmp_path):
    (g,) = _groups(_sweep(tmp_path / "sweep"))
    assert setting_title(g) == "SST-2 sentiment: tiny teacher → tiny student\n(plain sweep, no tuning)"


def test_kd_gain_is_left_out_of_a_kd1_only_report_and_the_report_says_why(tmp_path):
    out = build([_sweep(tmp_path / "sweep", b0=False)], tmp_path / "rep")
    assert not (out / "figures" / "kd_gain.png").exists() and not (out / "figures" / "kd_gain.pdf").exists()
    assert (out / "figures" / "kd_methods.png").exists()
    why = "kd_gain left out: no B0 and other method in this setting"
    assert why in (out / "report.md").read_text() and why in (out / "index.html").read_text()


def test_memory_figure_left_out_for_results_without_model_memory(tmp_path):
    (old,) = _groups(_sweep(tmp_path / "old", memory=False))
    (new,) = _groups(_sweep(tmp_path / "new"))
    assert EMPTY["peak_memory"](old).startswith("no run recorded the model's own memory")
    assert EMPTY["peak_memory"](new) is None


def _sig_rows(out: Path) -> dict[str, dict]:
    lines = [ln for ln in (out / "significance.md").read_text().splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split(" | ")), strict=True)) for ln in lines[1:]]
    return {(r["family"], r["method"]): r for r in rows}


def test_significance_columns_have_one_format_and_say_when_n_is_too_small(tmp_path):
    out = _tables(_sweep(tmp_path / "sweep"), tmp_path / "rep")
    rows = _sig_rows(out)
    cell1 = rows[("KD1 grid vs B0", "kd1 T=1 α=0.5")]
    cell2 = rows[("KD1 grid vs B0", "kd1 T=2 α=0.5")]
    c1 = compare(KD1_T1, B0)
    assert cell1["mean diff"] == f"{c1.mean_diff:.4f}" and cell1["t"] == f"{c1.t:.2f}"
    assert cell1["95% CI"] == f"[{c1.ci_low:.4f}, {c1.ci_high:.4f}]" and cell1["p"] == f"{c1.p:.3f}"
    # The two-seed cell: its difference (4 decimals like every other) and CI, but no test.
    c2 = compare(KD1_T2, B0)
    assert c2.n == 2 and cell2["mean diff"] == f"{c2.mean_diff:.4f}" and cell2["p"] == "–" and cell2["t"] == "–"
    assert "n too small for a test (n=2" in cell2["note"] and cell1["note"] == ""
    for row in rows.values():
        assert all(len(x.split(".")[1]) == 4 for x in row["95% CI"].strip("[]").split(", "))


def test_flagged_runs_are_marked_and_left_out_of_tests_unless_asked(tmp_path):
    sweep = _sweep(tmp_path / "sweep", flags={3: SINGLE})
    out = _tables(sweep, tmp_path / "rep")
    main = (out / "main_results.md").read_text()
    assert "⚠ single_class 1/3" in main
    assert "⚠ kd1 T=1 α=0.5 (seed 3): single_class (student): predicts ' positive' for 872/872" in main
    assert "(n=3) ⚠" in (out / "kd1_ablation.md").read_text()
    row = _sig_rows(out)[("KD1 grid vs B0", "kd1 T=1 α=0.5")]
    assert row["n"] == "2" and "left out flagged seed(s) 3" in row["note"]
    assert row["mean diff"] == f"{compare({1: 0.74, 2: 0.77}, {1: 0.70, 2: 0.72}).mean_diff:.4f}"
    kept = _sig_rows(_tables(sweep, tmp_path / "rep2", include_flagged=True))[("KD1 grid vs B0", "kd1 T=1 α=0.5")]
    assert kept["n"] == "3" and "includes flagged seed(s) 3" in kept["note"]
    assert r"$\dagger$ single\_class 1/3" in (out / "main_results.tex").read_text()


def test_a_warning_flag_is_shown_but_keeps_the_run_in_the_tests(tmp_path):
    warn = [{"code": "dominant_loss_term", "who": "student", "severity": "warning", "message": "loss term feat"}]
    out = _tables(_sweep(tmp_path / "sweep", flags={3: warn}), tmp_path / "rep")
    assert "⚠ dominant_loss_term 1/3" in (out / "main_results.md").read_text()
    assert _sig_rows(out)[("KD1 grid vs B0", "kd1 T=1 α=0.5")]["n"] == "3"


def test_a_teacher_flag_marks_the_teacher_row_and_keeps_the_runs_in_the_tests(tmp_path):
    trivial = [{"code": "no_better_than_trivial", "who": "teacher", "severity": "degenerate",
                "message": "accuracy 0.5092 is not more than 0.01 above the trivial baseline"}]
    out = _tables(_sweep(tmp_path / "sweep", flags={1: trivial, 2: trivial, 3: trivial}), tmp_path / "rep")
    teacher_row = next(ln for ln in (out / "main_results.md").read_text().splitlines() if ln.startswith("| teacher"))
    assert "⚠ no_better_than_trivial 3/8" in teacher_row  # 3 of the setting's 8 runs evaluated it so
    assert _sig_rows(out)[("KD1 grid vs B0", "kd1 T=1 α=0.5")]["n"] == "3"


def test_clean_report_has_no_flag_column(tmp_path):
    out = _tables(_sweep(tmp_path / "sweep"), tmp_path / "rep")
    assert "⚠" not in (out / "main_results.md").read_text()


def test_timings_under_load_are_marked_noisy(tmp_path):
    out = _tables(_sweep(tmp_path / "sweep", load=3.5), tmp_path / "rep")  # 3.5 > 2 cores
    bench = (out / "benchmarks.md").read_text()
    assert "noisy: load > cores in 3/3 run(s)" in bench and "Timing noisy" in bench
    assert "| 3.50 |" in bench
    calm = (_tables(_sweep(tmp_path / "calm", load=1.5), tmp_path / "rep2") / "benchmarks.md").read_text()
    assert "noisy" not in calm and "| 1.50 |" in calm


def test_other_kd_methods_are_also_tested_against_kd1_paired_by_seed(tmp_path):
    kd2 = {1: 0.75, 2: 0.76, 3: 0.70}
    root = _sweep(tmp_path / "sweep")
    _write(tmp_path / "sweep" / "kd2", [_result("kd2", s, v, {"gold_mix": 0.0}) for s, v in kd2.items()])
    rows = _sig_rows(_tables(root, tmp_path / "rep"))
    # KD1's selected row is T=1 (best validation); KD2 is compared with it in a family of its own, and with B0.
    vs_kd1 = rows[("methods vs KD1", "kd2 gold_mix=0")]
    c = compare(kd2, KD1_T1)
    assert vs_kd1["reference"] == "kd1 T=1 α=0.5" and vs_kd1["n"] == "3"
    assert float(vs_kd1["mean diff"]) == pytest.approx(c.mean_diff, abs=5e-5)
    assert float(vs_kd1["t"]) == pytest.approx(c.t, abs=5e-3)
    assert vs_kd1["p (Holm)"] == vs_kd1["p"]  # a family of one
    assert rows[("methods vs B0", "kd2 gold_mix=0")]["reference"] == "b0"
    assert not any(family == "methods vs KD1" and method.startswith("kd1") for family, method in rows)
