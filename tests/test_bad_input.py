"""Every bad input is one line naming the key (or file), exit != 0, before any expensive work, nothing recorded."""

import gzip
from pathlib import Path

import pytest

from kdexp.core import tasks
from kdexp.core.artefacts import atomic_write_json, locked
from kdexp.main import run
from tests.conftest import SMOKE, run_cli


@pytest.mark.parametrize("overrides,message", [
    (["method.temperature=nan"], "kdexp: config error: method.temperature=nan must be a finite number"),
    (["method.temperature=inf"], "kdexp: config error: method.temperature=inf must be a finite number"),
    (["train.lr=nan"], "kdexp: config error: train.lr=nan must be a finite number"),
    (["hardware=cuda"], "kdexp: config error: hardware.device=cuda (hardware=cuda) needs a CUDA GPU"),
    (["method=eval", "student.path=/no/such/student"], "kdexp: config error: student.path='/no/such/student' does "
                                                       "not exist"),
    (["method.divergence=no_such_pkg_kdexp.fn"], "kdexp: config error: method.divergence='no_such_pkg_kdexp.fn': no "
                                                 "module 'no_such_pkg_kdexp'"),
    (["+method.alpah=0.3"], "kdexp: config error: method.alpah is not a key of method=kd1"),
    (["task.metric=bleu"], "kdexp: config error: task.metric='bleu' must be one of"),
])
def test_config_errors_before_anything_runs(overrides, message, make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, *overrides)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    text = str(exit_info.value.code)
    assert text.startswith(message) and "\n" not in text
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "cache" / "teachers").exists()


def test_unwritable_cache_dir_is_one_line(make_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = make_cfg(*SMOKE)
    cfg.cache_dir = str(blocker / "cache")  # make_cfg sets its own cache_dir last
    with pytest.raises(SystemExit, match=r"^kdexp: config error: cache_dir='.*a_file/cache' is not writable"):
        run(cfg)


def test_top_k_beyond_the_vocabulary_stops_before_the_teacher_is_prepared(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, "method.top_k=60000")
    with pytest.raises(SystemExit, match=r"^kdexp: error: method.top_k=60000 exceeds the teacher vocabulary size"):
        run(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


def test_hub_task_offline_is_one_line(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = make_cfg(*SMOKE, "task.source=hub", "task.hub_id=kdexp-no-such/dataset")
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    text = str(exit_info.value.code)
    assert text.startswith("kdexp: error: task.source=hub: cannot load 'kdexp-no-such/dataset'") and "\n" not in text


def test_corrupt_embedded_data_names_the_files(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv.gz").write_bytes(gzip.compress(b"sentence\tlabel\nok\t1\n")[:20])
    monkeypatch.setattr(tasks, "_asset", lambda *parts: tmp_path.joinpath(*parts))
    task = type("T", (), {"source": "embedded", "loader": "sst2", "name": "sst2"})
    with pytest.raises(ValueError, match=r"^task.loader=sst2: the embedded data under .*sst2 is unreadable \(EOF"):
        tasks.load_raw(task)


def test_a_truncated_registry_pointer_counts_as_absent(make_cfg, tmp_path, caplog):
    from kdexp.experiments.registry import lookup, run_key

    cfg = make_cfg(*SMOKE)
    pointer = Path(cfg.cache_dir) / "runs" / f"{run_key(cfg)}.json"
    pointer.parent.mkdir(parents=True)
    pointer.write_text('{"results": "/some/where')
    assert lookup(cfg, run_key(cfg)) is None and "is unreadable" in caplog.text


def test_written_files_follow_the_umask_and_a_lock_wait_can_time_out(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with locked(tmp_path / "x", "x"), pytest.raises(TimeoutError, match=r"waiting for x, held by .*:\d+ since"):
        with locked(tmp_path / "x", "x", timeout_s=0.2):
            pass


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("args,last_line", [
    (["method=foo"],
     "kdexp: config error: method=foo is not an option of method (choices: b0, eval, kd1, kd2, kd3, kd4)"),
    (["train.lrr=1"], "kdexp: config error: train.lrr is not a key of the config (did you mean train.lr?)"),
    (["seed=abc"], "kdexp: config error: seed: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_hydra_errors_end_with_one_kdexp_line(args, last_line, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == last_line
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.slow
def test_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("kdexp: config error: hydra.run.dir=")
