"""Sweep presets, the pre-launch sweep check, Optuna resume, and the joblib / SLURM launcher configs."""

import json
import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from omegaconf import open_dict

from kdexp.config import CONF_DIR
from kdexp.experiments.compose import compose
from kdexp.experiments.sweeps import check_sweep, share_method_knobs
from tests.conftest import compose_cfg, run_cli


def _hydra_cfg(*overrides: str):
    return compose(list(overrides), hydra_config=True)


@pytest.mark.parametrize("preset,params", [
    ("thesis_fast", {"task": "sst2,squad", "method": "b0,kd1", "method.temperature": "2,4",
                     "method.alpha": "0.3,0.5", "seed": "42"}),
    ("thesis_full", {"task": "sst2,squad", "method": "b0,kd1", "method.temperature": "1,2,4,8",
                     "method.alpha": "0.1,0.3,0.5,0.7", "seed": "42,123,456"}),
    ("kd_demo", {"method": "b0,kd1", "method.temperature": "1,2", "method.alpha": "0.5,0.9",
                 "seed": "42,123,456,789,2024"}),
])
def test_presets_carry_their_grids(preset, params, tmp_path):
    cfg = _hydra_cfg(f"experiment={preset}")
    assert dict(cfg.hydra.sweeper.params) == params
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{preset}/") and cfg.experiment == preset
    n_methods = len(params["method"].split(","))  # a knob's values are checked under every swept method
    share_method_knobs(cfg)  # as SweepGuard does first: B0 jobs get (and drop) KD1's knobs
    assert set(cfg.hydra.sweeper.params) == {k if k in ("task", "method", "seed") else "++" + k for k in params}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert check_sweep(cfg) == sum(len(v.split(",")) * (1 if k == "method" else n_methods)
                                       for k, v in params.items() if "," in v)


def test_preset_budgets(tmp_path):
    fast = {t: compose_cfg(["experiment=thesis_fast", f"task={t}"], tmp_path) for t in ("sst2", "squad")}
    assert fast["sst2"].task.max_train_samples == 500 and fast["squad"].task.max_train_samples == 200
    assert fast["sst2"].train.epochs == 1
    full = compose_cfg(["experiment=thesis_full", "task=squad"], tmp_path)
    assert full.task.max_train_samples is None and full.train.epochs == 3
    demo, default = compose_cfg(["experiment=kd_demo"], tmp_path), compose_cfg([], tmp_path)
    assert demo.method.unlabeled_samples == 4000 and demo.train.epochs == 3
    # kd_demo reuses the default tiny teacher (same content address), so `python -m kdexp` prepares it for both.
    assert demo.teacher == default.teacher and demo.student == default.student


@pytest.mark.parametrize("override,message", [
    ("method.alpha=0.5,1.5", "method.alpha=1.5 must be in [0, 1]"),
    ("method.temperature=2,0", "method.temperature=0.0 must be > 0"),
    ("train.lr=interval(0.01,0.001)", "train.lr: interval(0.01, 0.001) is empty"),
    ("train.lr=tag(log,interval(0,0.1))", "needs a lower bound > 0"),
])
def test_bad_sweep_values_are_rejected_before_launch(override, message):
    cfg = _hydra_cfg("experiment=smoke")
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = ["experiment=smoke", override]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_sweep(cfg)


def test_optuna_preset_composes(tmp_path):
    cfg = _hydra_cfg("hydra/sweeper=kdexp_optuna", "task=squad", "hydra.sweep.dir=/x/sw")
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == 42 and "TPE" in sweeper.sampler._target_
    assert sweeper.storage == "sqlite:////x/sw/optuna.db" and sweeper.study_name == "kdexp"
    assert dict(sweeper.params) == {"method.temperature": "tag(log, interval(1, 8))", "method.alpha": "interval(0, 1)",
                                    "train.lr": "tag(log, interval(1e-4, 1e-2))"}
    from omegaconf import OmegaConf

    assert OmegaConf.create({"d": "${kdexp.direction:perplexity}"}).d == "minimize"


def test_optuna_budget_must_be_positive():
    from kdexp.experiments.sweeps import resume_optuna

    cfg = _hydra_cfg("hydra/sweeper=kdexp_optuna", "hydra.sweeper.n_trials=0")
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.n_trials=0 must be >= 1$"):
        resume_optuna(cfg)


def test_launcher_presets_compose():
    joblib = _hydra_cfg("hydra/launcher=kdexp_joblib").hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2
    assert _hydra_cfg("hydra/launcher=joblib").hydra.launcher._target_.endswith("JoblibLauncher")


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = _hydra_cfg("hydra/launcher=kdexp_slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "gpu"
    assert slurm.gpus_per_task == 1 and slurm.timeout_min == 240
    assert _hydra_cfg("hydra/launcher=submitit_slurm").hydra.launcher._target_.endswith("SlurmLauncher")


@pytest.mark.slow
def test_cli_bad_grid_is_one_line_and_launches_nothing(tmp_path):
    proc = run_cli("--multirun", "experiment=smoke", "method.alpha=0.5,1.5", "hydra.sweep.dir=sw", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("kdexp: sweep config error: method.alpha=1.5 must be")
    assert not (tmp_path / "sw").exists()


def _trials(db: Path) -> list:
    import optuna

    return optuna.load_study(study_name="kdexp", storage=f"sqlite:///{db}").trials


@pytest.mark.slow
def test_optuna_study_in_sqlite_resumes(tmp_path):
    args = ["--multirun", "experiment=smoke", "hydra/sweeper=kdexp_optuna", "hydra.sweep.dir=opt"]
    first = run_cli(*args, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    db = tmp_path / "opt" / "optuna.db"
    trials = _trials(db)
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    # The objective is the validation main metric that main returns, never eval.
    jobs = sorted((tmp_path / "opt").glob("*/results.json"))
    # Job folders carry the trial's sampled values (0_method.alpha=…,…), never the overrides every trial shares.
    assert [p.parent.name.split("_")[0] for p in jobs] == ["0", "1"] and "experiment" not in jobs[0].parent.name
    for path in jobs:
        res = json.loads(path.read_text())
        assert res["main_metric"]["validation_value"] in [t.value for t in trials]
    again = run_cli(*args, "hydra.sweeper.n_trials=4", cwd=tmp_path)  # n_trials is the study's total budget
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _trials(db)
    assert len(trials) == 4 and "2 finished trial(s); running 2 more" in again.stdout + again.stderr
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params  # no replay of trial 0/1
    assert len(list((tmp_path / "opt").rglob("results.json"))) == 4


@pytest.mark.slow
def test_joblib_parallel_jobs_then_rerun_does_only_incomplete_runs(tmp_path):
    par = run_cli("--multirun", "experiment=smoke", "hydra/launcher=kdexp_joblib", "seed=1,2", "hydra.sweep.dir=sw",
                  cwd=tmp_path)
    assert par.returncode == 0, par.stderr[-3000:]
    assert len(list((tmp_path / "sw").glob("*/results.json"))) == 2
    # Both jobs started together, yet the teacher was prepared once: the other job waited for it (or, finding every
    # artefact it needs built by then, never loaded the teacher at all).
    logs = "".join(p.read_text() for p in (tmp_path / "sw").glob("*/kdexp.log"))
    assert logs.count("teacher: preparing") == 1 and logs.count("teacher: reusing prepared teacher") <= 1
    (tmp_path / "sw" / "1_seed=2" / "results.json").unlink()  # as if job 1 had been killed
    rerun = run_cli("--multirun", "experiment=smoke", "seed=1,2", "hydra.sweep.dir=sw", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logged = rerun.stdout + rerun.stderr  # Hydra's console log goes to stdout
    assert logged.count("skip: a complete run") == 1 and logged.count("done in") == 1
    assert json.loads((tmp_path / "sw" / "1_seed=2" / "results.json").read_text())["seed"] == 2


@pytest.mark.slow
def test_fair_compare_tunes_every_method_then_reruns_the_best(tmp_path):
    import csv
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "fc"
    env = {**__import__("os").environ, "KDEXP_CACHE_DIR": str(tmp_path / "cache")}
    # Seed 42 is also the tuning seed, so one final run per method is the best trial, reused via the registry.
    proc = subprocess.run([sys.executable, "-m", "kdexp.fair_compare", "--config-dir", str(ROOT / "tests" / "conf"),
                           "--experiment", "tiny_fair", "--trials", "2", "--seeds", "42,7", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "fair_compare.json").read_text())
    assert manifest["trials"] == 2 and set(manifest["best"]) == {"b0", "kd1"}
    # Same budget, each over its own knobs: B0 is not tuned over the KD-only temperature and alpha.
    assert set(manifest["search_space"]["b0"]) == {"train.lr", "train.max_steps"}
    assert set(manifest["search_space"]["kd1"]) == {"train.lr", "train.max_steps", "method.temperature",
                                                     "method.alpha"}
    assert manifest["search_space"]["b0"]["train.max_steps"] == "tag(log, int(interval(2, 8)))"
    for method in ("b0", "kd1"):
        assert len(list((out / "tune" / method).glob("*/results.json"))) == 2
        assert isinstance(manifest["best"][method]["at_edge"], list)
    with open(out / "report" / "main_results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert {r["protocol"] for r in rows.values()} == {"fair_compare"} and rows["b0"]["n_seeds"] == "2"
    lr = manifest["best"]["b0"]["params"]["train.lr"]
    assert json.loads(rows["b0"]["params"])["train.lr"] == lr  # the reported B0 is the tuned one, exactly
    assert f"lr={lr:.4g}" in rows["b0"]["config"]
    report = (out / "report" / "report.md").read_text()
    assert "fair_compare: every method (B0 included) tuned with the same budget — 2 Optuna trial(s)" in report
    assert "4 fair_compare tuning trial(s)" in report


def test_fair_compare_flags_a_best_trial_at_the_edge_of_its_range():
    from kdexp.analysis.report import _protocol_note
    from kdexp.experiments.fair_compare import at_edge

    space = {"train.lr": "tag(log, interval(3e-4, 1e-2))", "train.max_steps": "tag(log, int(interval(30, 2000)))",
             "method.alpha": "interval(0, 1)", "train.epochs": "choice(1, 2, 3)"}
    inside = {"train.lr": 1e-3, "train.max_steps": 500, "method.alpha": 0.5, "train.epochs": 3}
    assert at_edge(inside, space) == []
    # 1,900 of [30, 2000] is 98.8 % of the way in log space; 9.5e-3 is 98.5 %; alpha=0.01 sits at alpha's own
    # limit (0), which no wider range could move, so it is not flagged.
    edges = at_edge({**inside, "train.max_steps": 1900, "train.lr": 9.5e-3, "method.alpha": 0.01}, space)
    assert edges == ["train.lr=0.0095 (range [0.0003, 0.01])", "train.max_steps=1900 (range [30, 2000])"]
    assert at_edge({**inside, "train.lr": 3.2e-4}, space) == ["train.lr=0.00032 (range [0.0003, 0.01])"]
    note = _protocol_note("fair_compare", {"d": {"trials": 8, "seeds": ["1", "2"],
                                                 "best": {"kd1": {"at_edge": edges[:1]}, "b0": {"at_edge": []}}}})
    assert note.endswith("(may be under-tuned): kd1: train.lr=0.0095 (range [0.0003, 0.01])")
