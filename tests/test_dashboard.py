"""The live dashboard: what runs write while they run (kdexp/core/live.py), how the dashboard reads run directories
(kdexp/dashboard/runs.py, details.py), and its pages driven through Streamlit's own test harness (AppTest).

Fixtures: one real tiny run (complete, with disagreements.jsonl from the real helper), and beside it hand-made run
directories in each other state: running (a fresh heartbeat of this live process and a torn last curve line), failed,
killed (the heartbeat of a process that has exited), one from before live logging, and a sweep with a T × α grid.
"""

import copy
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kdexp.core import live
from kdexp.core.models import build_model, encode, load_saved, load_tokenizer
from kdexp.core.tasks import load_task
from kdexp.core.training import train_model, training_args
from kdexp.dashboard import __main__ as cli
from kdexp.dashboard import details, runs
from kdexp.dashboard.sources import CACHE_ENV, DIRS_ENV, Sources
from kdexp.main import run
from tests.conftest import SMOKE, compose_cfg

AppTest = pytest.importorskip("streamlit.testing.v1", reason="needs the dashboard extra: pip install -e '.[dashboard]'"
                              ).AppTest
APP = str(Path(__file__).resolve().parent.parent / "kdexp" / "dashboard" / "app.py")
FAST = [*SMOKE, "hardware.torch_threads=1"]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _curve(n: int) -> str:
    return "".join(json.dumps({"step": i, "global_step": i, "loss": 5 - i / n, "loss_ce": 10 - i / n, "loss_kd": 0.1,
                               "learning_rate": 1e-3 * i / n, "stage": 0}) + "\n" for i in range(1, n + 1))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sweep(root: Path, real: dict) -> Path:
    """A finished sweep: the baseline and a 2 × 1 temperature × alpha grid, two seeds each (copies of the real run)."""
    sweep = root / "multirun" / "grid"
    _write(sweep / "multirun.yaml", "hydra: {}\n")
    jobs = [("b0", None, s) for s in (1, 2)] + [("kd1", t, s) for t in (1.0, 2.0) for s in (1, 2)]
    for i, (method, temperature, seed) in enumerate(jobs):
        data = copy.deepcopy(real)
        data.update(method=method, seed=seed, run_key=f"key{i}")
        data["config"].update(seed=seed, method={"name": "b0"} if method == "b0" else
                              {**real["config"]["method"], "temperature": temperature})
        score = 0.5 + 0.1 * (temperature or 0) + 0.01 * seed
        data["main_metric"].update(value=score, validation_value=score)
        _write(sweep / str(i) / "results.json", data)
        _write(sweep / str(i) / ".hydra" / "config.yaml", "seed: 1\n")
    return sweep


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    cfg = compose_cfg([*FAST, "num_samples=3"], root)
    cfg.output_dir = str(root / "outputs" / "sst2" / "kd1" / "done")
    run(cfg)
    done = Path(cfg.output_dir)
    # What runner.finish writes once the lead wires it in; here straight from the helper, on the saved models.
    results = json.loads((done / "results.json").read_text())
    student, teacher = load_saved(str(done / "student"), cfg.hardware), load_saved(results["teacher_info"]["path"],
                                                                                 cfg.hardware)
    rows = live.disagreement_samples(student, teacher, load_tokenizer(cfg.student), load_task(cfg.task).eval, cfg.task,
                                     cfg.num_samples)
    live.write_jsonl(done / live.DISAGREEMENTS, rows)

    hydra_cfg = (done / ".hydra").exists() and (done / ".hydra" / "config.yaml").read_text()
    config_yaml = hydra_cfg or "method: {name: kd1, temperature: 2.0, alpha: 0.5}\ntask: {name: sst2}\nseed: 7\n"
    now, host = time.time(), socket.gethostname()
    dirs = {"done": done}
    for name, beat, curve in [
        ("running", {"pid": os.getpid(), "host": host, "time": now, "started": now, "step": 40,
                     "status": "training"}, _curve(40) + '{"step": 41, "loss": 1.'),  # the writer is mid-line
        ("failed", {"pid": _dead_pid(), "host": host, "time": now - 5, "step": 3, "status": "failed"}, _curve(3)),
        ("killed", {"pid": _dead_pid(), "host": host, "time": now - 5, "step": 9, "status": "training"}, _curve(9)),
    ]:
        d = root / "outputs" / "sst2" / "kd1" / name
        _write(d / ".hydra" / "config.yaml", config_yaml)
        _write(d / live.HEARTBEAT, beat)
        _write(d / live.TRAIN_LOG, curve)
        dirs[name] = d
    old = _write(root / "outputs" / "sst2" / "kd1" / "old" / ".hydra" / "config.yaml", config_yaml).parent.parent
    os.utime(old, (now - 3600, now - 3600))
    dirs["old"] = old
    dirs["sweep"] = _sweep(root, results)
    # A run outside the searched dirs that only the run registry knows.
    elsewhere = root / "elsewhere" / "run"
    _write(elsewhere / "results.json", {**results, "run_key": "elsewhere"})
    _write(root / "cache" / "runs" / "elsewhere.json", {"results": str(elsewhere / "results.json")})
    dirs["elsewhere"] = elsewhere
    return root, dirs


@pytest.fixture
def sources(fixture_runs, monkeypatch):
    root, dirs = fixture_runs
    # The module-scoped runs were written minutes ago on a loaded machine: the live run's process (this one) keeps
    # its heartbeat fresh, as the real writer does every 10 s.
    beat = json.loads((dirs["running"] / live.HEARTBEAT).read_text())
    _write(dirs["running"] / live.HEARTBEAT, {**beat, "time": time.time()})
    monkeypatch.setenv(DIRS_ENV, json.dumps([str(root / "outputs"), str(root / "multirun")]))
    monkeypatch.setenv(CACHE_ENV, str(root / "cache"))
    return Sources((root / "outputs", root / "multirun"), root / "cache")


# ---- what a run writes ---------------------------------------------------------------------------------------

def test_live_log_appends_every_logged_step_across_stages_and_keeps_a_heartbeat(tmp_path):
    cfg = compose_cfg([*FAST, "train.max_steps=4", "train.logging_steps=2"], tmp_path)
    tok = load_tokenizer(cfg.student)
    torch.manual_seed(0)
    model = build_model(cfg.student, len(tok), seed=0, hw_cfg=cfg.hardware, for_training=True)
    args = replace(training_args(cfg, tmp_path / "trainer"), stages=[{"name": "a"}, {"name": "b"}])
    run_dir = tmp_path / "run"
    train_model(model, encode(load_task(cfg.task).student, tok, cfg.task), args, tok.pad_token_id,
                callbacks=live.callbacks(run_dir))
    lines = [json.loads(line) for line in (run_dir / live.TRAIN_LOG).read_text().splitlines()]
    steps = [(e["stage"], e["step"], e["global_step"]) for e in lines if "loss" in e]
    assert steps == [(0, 2, 2), (0, 4, 4), (1, 2, 6), (1, 4, 8)]  # global_step counts on across stages
    assert all("loss_ce" in e and "learning_rate" in e for e in lines if "loss" in e)
    beat = json.loads((run_dir / live.HEARTBEAT).read_text())
    assert beat["status"] == "evaluating" and beat["step"] == 8 and beat["pid"] == os.getpid()
    assert runs.run_status(run_dir).status == "running"
    # The next run in this process (a sweep's next job) ends this one: no results.json, so it failed.
    live.beat(tmp_path / "next", "setup")
    assert json.loads((run_dir / live.HEARTBEAT).read_text())["status"] == "failed"
    assert runs.run_status(run_dir).status == "failed"
    _write(tmp_path / "next" / "results.json", {"status": "complete"})
    live._close_all()  # what atexit does
    assert json.loads((tmp_path / "next" / live.HEARTBEAT).read_text())["status"] == "complete"


def test_token_disagreements_are_forward_kl_per_token_largest_first():
    tok = load_tokenizer(compose_cfg(FAST).student)
    torch.manual_seed(0)
    student, teacher = torch.randn(3, len(tok)), torch.randn(3, len(tok))
    teacher[1] = student[1]  # one token where the two agree exactly
    answer = torch.tensor([10, 20, 30])
    rows = live.token_disagreements(student, teacher, answer, tok, k=5)
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)
    by_pos = {r["position"]: r for r in rows}
    p_t, log_s = teacher.softmax(-1), student.log_softmax(-1)
    expected = (p_t * (teacher.log_softmax(-1) - log_s)).sum(-1)
    assert [by_pos[i]["kl"] for i in range(3)] == pytest.approx(expected.tolist(), abs=1e-5)
    assert by_pos[1]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["position"] == 1
    top = by_pos[0]["teacher_top"]
    assert len(top) == 5 and top[0]["prob"] == pytest.approx(float(p_t[0].max()), abs=1e-6)
    assert by_pos[2]["token"] == tok.decode([30]) and by_pos[2]["id"] == 30
    assert by_pos[0]["student_prob"] == pytest.approx(float(student[0].softmax(-1)[10]), abs=1e-6)
    json.dumps(rows)


def test_disagreement_samples_need_a_shared_vocabulary(tmp_path):
    cfg = compose_cfg(FAST, tmp_path)
    tok = load_tokenizer(cfg.student)
    model = build_model(cfg.student, len(tok), seed=0, hw_cfg=cfg.hardware)

    class OtherVocab:
        def __len__(self):
            return 5

    rows = live.disagreement_samples(model, model, tok, load_task(cfg.task).eval, cfg.task, 2,
                                     teacher_tokenizer=OtherVocab())
    assert len(rows) == 2 and all(r["tokens"] == [] and "vocabularies differ" in r["note"] for r in rows)


# ---- reading run directories ---------------------------------------------------------------------------------

def test_status_rule(fixture_runs):
    _, d = fixture_runs
    assert {name: runs.run_status(d[name]).status for name in ("done", "running", "failed", "killed", "old")} == {
        "done": "complete", "running": "running", "failed": "failed", "killed": "killed", "old": "unknown"}
    assert runs.run_status(d["running"]).phase == "training"
    # The same heartbeat, no longer refreshed: stale after the window even though its pid (this process) lives.
    assert runs.run_status(d["running"], now=time.time() + runs.STALE_S + 1).status == "killed"


def test_runs_table_finds_every_run_groups_sweeps_and_follows_the_registry(sources, fixture_runs):
    _, d = fixture_runs
    rows = {r["run"]: r for r in runs.runs_table(sources)}
    assert {"outputs/sst2/kd1/done", "outputs/sst2/kd1/running", "multirun/grid/0"} <= set(rows)
    assert rows["elsewhere/run"]["path"] == str(d["elsewhere"])  # outside the searched dirs: from the registry
    assert len(rows) == 5 + 6 + 1
    done = rows["outputs/sst2/kd1/done"]
    assert (done["method"], done["task"], done["T"], done["α"], done["metric"]) == ("kd1", "sst2", 2.0, 0.5,
                                                                                     "accuracy")
    assert done["eval"] is not None and done["wall_time_s"] > 0
    groups = runs.by_sweep(list(rows.values()))
    assert set(groups) == {"", str(d["sweep"])} and len(groups[str(d["sweep"])]) == 6
    kd = runs.filter_rows(list(rows.values()), text="grid", methods=["kd1"], sort_by="T", descending=True)
    assert [r["T"] for r in kd] == [2.0, 2.0, 1.0, 1.0]
    killed = runs.filter_rows(list(rows.values()), statuses=["killed"])
    assert [r["run"] for r in killed] == ["outputs/sst2/kd1/killed"]


def test_curves_skip_a_torn_line_and_fall_back_to_results(fixture_runs):
    _, d = fixture_runs
    assert details.curve_summary(d["running"]) == {"points": 40, "last_step": 40, "last_loss": 4.0}
    rows = details.curve_rows({"a": d["running"], "b": d["done"]})
    assert {r["metric"] for r in rows} == set(details.CURVE_KEYS)
    assert {r["run"] for r in rows} == {"a", "b"}  # b: results.json's train_log (no train_log.jsonl)


def test_samples_join_answers_with_disagreements(fixture_runs):
    _, d = fixture_runs
    samples = details.samples(d["done"])
    assert len(samples) == 3
    assert [s["kl_max"] for s in samples] == sorted((s["kl_max"] for s in samples), reverse=True)
    first = samples[0]
    assert {"prompt", "gold", "teacher", "student", "tokens"} <= set(first)
    table = details.token_rows(first)
    assert table[0]["KL(T‖S)"] == first["kl_max"] and table[0]["teacher top-5"].count('"') == 10


def test_sweep_report_reuses_kdexp_report_and_has_the_grid(fixture_runs, tmp_path):
    _, d = fixture_runs
    rep = details.sweep_report(d["sweep"], cache=tmp_path)
    assert not rep.error and "6 complete run(s)" in rep.summary
    assert {"main_results", "significance", "benchmarks"} <= set(rep.tables)
    assert {p.stem for p in rep.figures} >= {"kd_methods", "pareto"}
    cells = details.heatmap_rows(rep.out)["kd1"]
    assert sorted((c["row"], c["col"], c["n"]) for c in cells) == [(1.0, 0.5, 2), (2.0, 0.5, 2)]
    assert details.sweep_report(d["sweep"], cache=tmp_path).out == rep.out  # unchanged results: not rebuilt


# ---- the app, through AppTest --------------------------------------------------------------------------------

def _app(page: str | None = None, **params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if page:
        at.query_params["page"] = page
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def test_runs_page_lists_runs_by_status_and_sweep(sources):
    at = _app()
    assert not at.exception
    assert "**1** running" in at.markdown[0].value and "**1** killed" in at.markdown[0].value
    frames = {sub.value: df.value for sub, df in zip(at.subheader, at.dataframe, strict=True)}
    single = frames["Single runs"].set_index("run")
    assert single.loc["outputs/sst2/kd1/running", "status"] == "running"
    assert single.loc["outputs/sst2/kd1/failed", "status"] == "failed"
    assert single.loc["outputs/sst2/kd1/done", "open"] == "?page=run&run=outputs/sst2/kd1/done"
    assert len(next(df for name, df in frames.items() if name.startswith("Sweep"))) == 6
    at.multiselect(key="status_filter").set_value(["failed", "killed"]).run()
    assert sorted(at.dataframe[0].value["run"]) == ["outputs/sst2/kd1/failed", "outputs/sst2/kd1/killed"]


def test_curves_page_overlays_runs(sources):
    at = _app("curves", run="outputs/sst2/kd1/running,outputs/sst2/kd1/killed")
    assert not at.exception
    captions = " ".join(c.value for c in at.caption)
    assert "outputs/sst2/kd1/running: running (training) · 40 logged step(s) · last step 40" in captions
    assert "outputs/sst2/kd1/killed: killed (training) · 9 logged step(s)" in captions
    assert {m.value for m in at.markdown if m.value.startswith("**")} == {f"**{k}**" for k in details.CURVE_KEYS}


def test_run_page_shows_metrics_efficiency_samples_and_config(sources):
    at = _app("run", run="outputs/sst2/kd1/done")
    assert not at.exception
    metrics = at.dataframe[0].value.set_index("metric")
    assert {"student (eval)", "teacher (eval)", "student (validation)"} <= set(metrics.columns)
    assert "latency ms/ex" in set(at.dataframe[1].value["measure"])
    token_tables = [df.value for df in at.dataframe[2:]]
    assert len(token_tables) == 3 and all("teacher top-5" in t and "KL(T‖S)" in t for t in token_tables)
    assert "method:" in at.code[-1].value or '"method"' in at.code[-1].value
    at.selectbox(key="run_pick").set_value("outputs/sst2/kd1/running").run()
    assert not at.exception and "No results.json yet" in at.info[0].value


def test_sweep_page_shows_the_report_and_heat_map(sources, fixture_runs):
    _, d = fixture_runs
    at = _app("sweep")
    assert not at.exception and not at.warning
    assert at.selectbox(key="sweep_pick").value == str(d["sweep"])
    assert any("T × α" in s.value for s in at.subheader)
    assert any("| method |" in m.value for m in at.markdown)  # the report's own main_results table
    assert len(at.image) == len(details.sweep_report(d["sweep"]).figures) >= 5


def test_cli_serves_on_localhost_and_prints_the_url(tmp_path, monkeypatch, capsys):
    calls = []
    for name in (DIRS_ENV, CACHE_ENV):  # main sets them for Streamlit; restore them after the test
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append(argv))
    cli.main([str(tmp_path), "--port", "8123", "--no-registry"])
    assert "kdexp dashboard: http://127.0.0.1:8123" in capsys.readouterr().out
    argv = calls[0]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("app.py")
    assert "--server.address=127.0.0.1" in argv and "--browser.gatherUsageStats=false" in argv
    assert json.loads(os.environ[DIRS_ENV]) == [str(tmp_path.resolve())] and os.environ[CACHE_ENV] == ""
    assert 1024 < cli.free_port() < 65536
