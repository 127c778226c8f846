"""Resume: a run killed with SIGKILL mid-training and started again with the same command continues from its last
checkpoint and ends with exactly the results of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdexp.core.resume import last_checkpoint
from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg, run_cli

# 60 optimizer steps with a checkpoint every 4: long enough to kill mid-way on a busy machine.
ARGS = [*SMOKE, "method=kd1", "method.unlabeled_samples=0", "train.epochs=30", "train.save_steps=4",
        "train.logging_steps=2", "num_samples=0"]
TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _only_results(folder: Path) -> dict:
    found = list(folder.rglob("results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def _comparable(res: dict) -> dict:
    log = [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in res["train_log"]]
    stages = [{k: v for k, v in s.items() if k != "resumed_from"} for s in res["stages"]]
    return {"metrics": res["metrics"], "validation": res["validation_metrics"], "teacher": res["teacher_metrics"],
            "train_log": log, "stages": stages}


def _kill_after_a_checkpoint(cwd: Path, min_step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDEXP_CACHE_DIR": str(cwd / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "kdexp", *ARGS], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        stage_dirs = list((cwd / "cache" / "checkpoints").glob("*/stage0"))
        done = last_checkpoint(stage_dirs[0]) if stage_dirs else None
        if done is not None and int(done.name.split("-")[1]) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.slow
def test_sigkill_mid_training_then_same_command_resumes_to_identical_results(tmp_path, make_cfg):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    killed = _kill_after_a_checkpoint(interrupted, min_step=8)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not list((interrupted / "outputs").rglob("results.json"))
    again = run_cli(*ARGS, cwd=interrupted)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resume: continuing from" in again.stdout + again.stderr
    resumed = _only_results(interrupted / "outputs")
    assert resumed["stages"][0]["resumed_from"] is not None
    reference = make_cfg(*ARGS, out="reference")  # never interrupted (in-process: one interpreter start less)
    run(reference)
    assert _comparable(resumed) == _comparable(_only_results(Path(reference.output_dir)))
    assert not list((interrupted / "cache" / "checkpoints").glob("*"))  # removed once the run completed


def test_checkpoint_dir_is_keyed_by_run_not_by_output_dir(tmp_path):
    from kdexp.core.training import training_args

    a = compose_cfg([*SMOKE, "train.save_steps=2", "output_dir=/x/1"], tmp_path)
    b = compose_cfg([*SMOKE, "train.save_steps=2", "output_dir=/y/2"], tmp_path)
    c = compose_cfg([*SMOKE, "train.save_steps=2", "seed=7"], tmp_path)
    dirs = [training_args(cfg, Path(cfg.output_dir) / "trainer").output_dir for cfg in (a, b, c)]
    assert dirs[0] == dirs[1] != dirs[2] and dirs[0].startswith(str(tmp_path / "cache" / "checkpoints"))
    plain = compose_cfg(SMOKE, tmp_path)
    assert training_args(plain, Path("/tmp/o")).save_strategy == "no"


def test_last_checkpoint_skips_a_half_written_one(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        (path / "model.safetensors").write_text("x")
        if complete:
            (path / "trainer_state.json").write_text("{}")
            (path / "kdexp_loss.json").write_text('{"total_loss": 1.0}')
    (tmp_path / "checkpoint-8" / "kdexp_loss.json").write_text('{"total_lo')  # killed mid-write
    assert last_checkpoint(tmp_path).name == "checkpoint-4"


@pytest.mark.parametrize("override,message", [
    ("train.save_steps=3", "train.save_steps=3 must be a multiple of train.logging_steps=2"),
    ("train.save_steps=-1", "train.save_steps=-1 must be >= 0"),
    ("method=kd3 student.lora.enabled=true train.save_steps=2", "train.save_steps=2 cannot resume method=kd3 with"),
])
def test_bad_save_steps(override, message, tmp_path):
    with pytest.raises(ValueError) as err:
        validate(compose_cfg(["train.logging_steps=2", *override.split()], tmp_path))
    assert str(err.value).startswith(message)
