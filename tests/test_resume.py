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
from tests.conftest import SMOKE, assert_same_student, compose_cfg, results, run_cli

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


class _KilledDuringEvaluation(Exception):
    """Stands in for a SIGKILL after training: nothing after it runs (no results.json, checkpoints kept)."""


# B0 on 32 examples in batches of 12: 3 optimizer steps per epoch, so neither schedule ends on an epoch boundary —
# the case where Trainer, resumed from the final checkpoint, used to train one step more. Checkpoint every 4 steps.
EXACT_ARGS = [*SMOKE, "method=b0", "train.batch_size=12", "train.save_steps=4", "train.logging_steps=1",
              "num_samples=0", "eval_teacher=false", "hardware.torch_threads=1"]


@pytest.mark.parametrize("schedule", [
    pytest.param(["train.max_steps=16", "train.lr_scheduler=constant"], id="max_steps"),  # ends mid-epoch 6
    pytest.param(["train.epochs=2.5", "train.max_steps=-1"], id="epochs"),  # 8 steps, the last epoch cut short
])
def test_kill_during_evaluation_then_rerun_does_exactly_the_remaining_work(schedule, tmp_path, monkeypatch):
    import kdexp.core.runner as runner

    def cfg(name):
        made = compose_cfg([*EXACT_ARGS, *schedule], tmp_path / name)  # own cache_dir: own checkpoints, registry
        made.output_dir = str(tmp_path / name / "out")
        return made

    reference, interrupted = cfg("reference"), cfg("interrupted")
    run(reference)

    def killed(*args, **kwargs):
        raise _KilledDuringEvaluation
    with monkeypatch.context() as patch:
        patch.setattr(runner, "evaluate_model", killed)
        with pytest.raises(_KilledDuringEvaluation):
            run(interrupted)
    steps = results(reference)["stages"][0]["steps"]
    stage_dir = next(Path(interrupted.cache_dir, "checkpoints").glob("*/stage0"))
    assert last_checkpoint(stage_dir).name == f"checkpoint-{steps}"  # training had finished and saved its end

    run(interrupted)
    resumed, expected = results(interrupted), results(reference)
    assert resumed["stages"][0]["resumed_from"].endswith(f"checkpoint-{steps}")
    assert resumed["stages"][0]["steps"] == steps  # not one step more
    assert_same_student(interrupted, reference)  # weights bit for bit, eval metrics
    assert _comparable(resumed) == _comparable(expected)  # every per-step loss, train_loss, validation metrics
    assert [h["step"] for h in resumed["train_log"] if "loss" in h] == list(range(1, steps + 1))


def test_a_step_past_the_schedule_fails_loudly(tmp_path, monkeypatch):
    """Without stop_at_end (or if Trainer's resume logic changes under it) the run stops, not trains on silently."""
    import kdexp.core.runner as runner
    from kdexp.core import resume

    cfg = compose_cfg([*EXACT_ARGS, "train.max_steps=4"], tmp_path)  # 3 steps per epoch: the end is mid-epoch

    def killed(*args, **kwargs):
        raise _KilledDuringEvaluation
    monkeypatch.setattr(runner, "evaluate_model", killed)
    with pytest.raises(_KilledDuringEvaluation):
        run(cfg)
    monkeypatch.setattr(resume, "stop_at_end", lambda trainer: None)
    with pytest.raises(RuntimeError, match="about to train step 5 of a schedule of 4 steps"):
        run(cfg)


def test_checkpoint_dir_is_keyed_by_run_not_by_output_dir(tmp_path):
    from kdexp.core.resume import checkpoint_dir
    from kdexp.core.training import training_args
    from kdexp.experiments.registry import run_key
    from kdexp.methods import validate

    a = compose_cfg([*SMOKE, "train.save_steps=2", "output_dir=/x/1"], tmp_path)
    b = compose_cfg([*SMOKE, "train.save_steps=2", "output_dir=/y/2"], tmp_path)
    c = compose_cfg([*SMOKE, "train.save_steps=2", "seed=7"], tmp_path)
    for cfg in (a, b, c):
        validate(cfg)
    dirs = [training_args(cfg, Path(cfg.output_dir) / "trainer", checkpoint_dir=checkpoint_dir(cfg, run_key(cfg)))
            .output_dir for cfg in (a, b, c)]
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
