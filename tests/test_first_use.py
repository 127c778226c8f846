"""What a new user meets first: typo'd keys, where the cache lives, tidy output folders, the last log line."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdexp import methods
from kdexp.config import default_cache_dir
from kdexp.core.teacher import PreparationEta
from kdexp.experiments.sweeps import JOB_DIR_MAX, job_dir
from kdexp.main import summary_line
from tests.conftest import compose_cfg, run_cli


@pytest.mark.parametrize("override, message", [
    ("+task.max_train_sample=10", "task.max_train_sample is not a config key (task has: "),
    ("+train.epochz=1", "did you mean train.epochs?"),
    ("+teacher.arch.hiden_size=8", "did you mean teacher.arch.hidden_size?"),
    ("+method.alpah=0.3", "did you mean method.alpha?"),
    ("+sede=3", "did you mean seed?"),
])
def test_keys_added_with_plus_are_checked_against_the_schema(override, message, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ValueError) as err:
        methods.validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_free_form_nodes_accept_new_keys(tmp_path):
    methods.validate(compose_cfg(["+task.baseline_fields.first_word=sentence"], tmp_path))


def test_default_cache_dir_is_per_user(monkeypatch, tmp_path):
    for name in ("KDEXP_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "kdexp"
    assert Path(compose_cfg([]).cache_dir) == default_cache_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kdexp" == Path(compose_cfg([]).cache_dir)
    monkeypatch.setenv("KDEXP_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" == Path(compose_cfg([]).cache_dir)
    assert compose_cfg(["cache_dir=proj_cache"]).cache_dir == "proj_cache"


def test_multirun_job_dirs_are_named_by_overrides():
    assert job_dir(3, "method=kd1,seed=2") == "3_method=kd1,seed=2"
    assert job_dir(0, "") == "0"
    assert job_dir(1, "student.path=/runs/a b/student") == "1_student.path=_runs_a_b_student"
    long_a, long_b = job_dir(7, "x" * 200), job_dir(7, "x" * 199 + "y")
    assert len(long_a) == JOB_DIR_MAX and long_a != long_b and long_a.startswith("7_xxx")


def test_summary_line_rounds_alike_and_shows_flags():
    res = {"wall_time_s": 12.345, "main_metric": {"name": "accuracy", "value": 0.50917, "validation_value": 0.5,
                                                   "teacher_value": 0.829128440366972}}
    line = summary_line("eval", res, Path("out/results.json"))
    assert "eval eval" not in line and "teacher 0.8291," not in line and "teacher 0.8291)" in line
    assert line.startswith("done in 12.3s: method=eval, accuracy 0.5092 on eval (validation 0.5000")
    res["flags"] = [{"code": "single_class", "who": "student", "message": "predicts ' positive' for 872/872"}]
    res["main_metric"]["teacher_value"] = None
    assert "FLAGGED student: predicts ' positive' for 872/872" in summary_line("b0", res, Path("r.json"))


def test_preparation_eta_says_time_left_once(caplog):
    eta, clock = PreparationEta(after_s=0.0), iter([100.0, 110.0, 120.0, 130.0])
    state = SimpleNamespace(global_step=1, max_steps=101)
    with caplog.at_level("INFO"), pytest.MonkeyPatch.context() as mp:
        mp.setattr("kdexp.core.teacher.time.perf_counter", lambda: next(clock))
        for step in (1, 2, 3):
            state.global_step = step
            eta.on_step_end(None, state, None)
    lines = [r.getMessage() for r in caplog.records if "preparation needs" in r.getMessage()]
    # 10 s per step measured from step 1, 99 steps left at step 2: 990 s -> 17 minutes; said once only.
    assert len(lines) == 1 and "about 17 more minutes" in lines[0] and "experiment=smoke" in lines[0]


def test_config_error_leaves_no_folder(tmp_path):
    proc = run_cli("+task.max_train_sample=10", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("kdexp: config error: task.max_train_sample")
    assert not (tmp_path / "outputs").exists(), sorted(p.name for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_run_folder_has_no_empty_folders_and_multirun_names(tmp_path):
    proc = run_cli("--multirun", "experiment=smoke", "seed=1,2", "train.max_steps=2", "hydra.sweep.dir=sw",
                   cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Only what varies names a job: experiment=smoke and train.max_steps=2 are every job's.
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == ["0_seed=1", "1_seed=2"]
    for job in (tmp_path / "sw").glob("?_seed=?"):
        assert json.loads((job / "results.json").read_text())["status"] == "complete"
        assert not [p for p in job.rglob("*") if p.is_dir() and not any(p.iterdir())]
