"""B0 and eval end to end on tiny models and the real embedded data, in seconds."""

import json

import pytest
import torch

from kdexp.main import run
from tests.conftest import SMOKE, results, run_cli


@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_b0_end_to_end(task, make_cfg):
    cfg = make_cfg(*SMOKE, f"task={task}", "method=b0")
    value = run(cfg)
    res = results(cfg)
    assert res["status"] == "complete" and res["method"] == "b0" and res["task"] == task
    main = "accuracy" if task == "sst2" else "f1"
    assert res["main_metric"]["name"] == main and res["main_metric"]["validation_value"] == value
    assert res["validation_metrics"]["n_eval"] == cfg.task.validation_samples
    assert 0 <= value <= (1 if task == "sst2" else 100)
    assert res["metrics"]["perplexity"] > 1 and res["teacher_metrics"]["perplexity"] > 1
    for role in ("student", "teacher"):
        eff = res["efficiency"][role]
        assert eff["total_params"] > 0 and eff["latency_ms_per_example"] > 0 and eff["peak_memory_mb"] > 0
        assert eff["disk_mb"] > 0
    assert res["efficiency"]["student"]["total_params"] < res["efficiency"]["teacher"]["total_params"] or \
        cfg.student.arch.hidden_size == cfg.teacher.arch.hidden_size
    samples = [json.loads(line) for line in open(f"{cfg.output_dir}/samples.jsonl")]
    assert len(samples) == cfg.num_samples and {"prompt", "gold", "teacher", "student"} <= samples[0].keys()
    assert res["train_log"] and "loss_ce" in res["train_log"][0]


def test_registry_skips_completed_run_and_force_reruns(make_cfg, caplog):
    first = make_cfg(*SMOKE, out="a")
    run(first)
    again = make_cfg(*SMOKE, out="b")  # same config, another output dir: same run key
    with caplog.at_level("INFO"):
        run(again)
    assert "skip: a complete run" in caplog.text
    assert not (again.output_dir and __import__("os").path.exists(f"{again.output_dir}/results.json"))
    forced = make_cfg(*SMOKE, "force=true", out="c")
    run(forced)
    assert results(forced)["run_key"] == results(first)["run_key"]


def test_teacher_prepared_once_and_reused(make_cfg):
    run(make_cfg(*SMOKE, "seed=1", out="a"))
    second = make_cfg(*SMOKE, "seed=2", out="b")
    run(second)
    info = results(second)["teacher_info"]
    assert info["prepared"] and info["reused"]
    # Every artefact the second run needs (logit cache, teacher eval) exists: it never loads the teacher at all.
    assert info["loaded"] is False and "teacher_prepare_s" not in results(second)["timings_s"]
    # The key does not cover thread count or device, yet the weights depend on them (docs/design.md): recorded.
    assert info["prepared_with"] == {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                     "device": "cpu"}


def test_same_seed_same_metrics(make_cfg):
    a = make_cfg(*SMOKE, "seed=7", out="a")
    b = make_cfg(*SMOKE, "seed=7", "force=true", out="b")
    run(a)
    run(b)
    ra, rb = results(a), results(b)
    assert ra["metrics"] == rb["metrics"]
    assert [h["loss"] for h in ra["train_log"] if "loss" in h] == [h["loss"] for h in rb["train_log"] if "loss" in h]
    c = make_cfg(*SMOKE, "seed=8", out="c")
    run(c)
    assert results(c)["train_log"] != ra["train_log"]


def test_eval_method_evaluates_saved_student(make_cfg):
    trained = make_cfg(*SMOKE, out="train")
    run(trained)
    ev = make_cfg(*SMOKE, "method=eval", f"student.path={trained.output_dir}/student",
                  f"student.tokenizer={trained.output_dir}/student", out="eval")
    run(ev)
    assert results(ev)["metrics"]["accuracy"] == results(trained)["metrics"]["accuracy"]


@pytest.mark.slow
def test_cli_multirun_seeds(tmp_path):
    proc = run_cli("--multirun", "experiment=smoke", "seed=1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = sorted(tmp_path.glob("sweep/*/results.json"))
    assert len(found) == 2 and {json.loads(p.read_text())["seed"] for p in found} == {1, 2}
