"""Multi-stage training: per-stage loss weights, freezing and schedules, stage tags on every log entry, bad input."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg, results


def test_two_stages_rebuild_optimizer_and_apply_their_own_settings(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd1", "stage=two_stage", "train.epochs=2", "stage.stages.1.loss={alpha: 0.0}",
                   "stage.stages.1.lr=5e-4")
    run(cfg)
    res = results(cfg)
    first, second = res["stages"]
    assert (first["name"], second["name"]) == ("distill_upper", "all_layers")
    assert first["loss_weights"] == {"alpha": 0.9} and second["lr"] == 5e-4 and first["lr"] == cfg.train.lr
    assert first["steps"] == second["steps"] == 8  # 64 prompts (32 labelled + 32 transfer) / 16, 2 epochs
    assert any(r["frozen"] and r["tensors"] >= 1 for r in first["param_groups"])  # embeddings + layer 0 frozen
    assert not any(r["frozen"] for r in second["param_groups"])
    log = res["train_log"]
    assert all(h["stage"] in (0, 1) for h in log) and {h["stage"] for h in log} == {0, 1}
    steps = {s: [h for h in log if h["stage"] == s and "loss" in h] for s in (0, 1)}
    assert all("loss_kd" in h for h in steps[0]) and not any("loss_kd" in h for h in steps[1])  # alpha 0 in stage 2
    # A fresh warmup + linear schedule per stage: stage 2 warms up again, to its own peak lr.
    assert steps[0][-1]["learning_rate"] > 0 and steps[1][0]["learning_rate"] == 0
    assert max(h["learning_rate"] for h in steps[1]) == pytest.approx(5e-4)
    assert [s["train_loss"] for s in res["stages"]] == [h["train_loss"] for h in log if "train_loss" in h]


def test_one_plain_stage_is_exactly_stage_single(make_cfg):
    single = make_cfg(*SMOKE, "method=b0", out="single")
    staged = make_cfg(*SMOKE, "method=b0", "stage=two_stage", "stage.stages=[{name: only}]", out="staged")
    run(single)
    run(staged)
    a = load_file(str(Path(single.output_dir) / "student" / "model.safetensors"))
    b = load_file(str(Path(staged.output_dir) / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results(single)["metrics"] == results(staged)["metrics"]
    assert len(results(single)["stages"]) == 1 and results(single)["train_log"][0]["stage"] == 0


@pytest.mark.parametrize("overrides,message", [
    (["stage=two_stage", "stage.stages=[]"], "stage.stages=[] is empty"),
    (["stage=single", "stage.stages=[{name: x}]"], "stage.stages has 1 entries but stage=single"),
    (["stage=two_stage", "method=kd2"], "stage.stages[0].loss.alpha is not a loss weight of method=kd2"),
    (["stage=two_stage", "stage.stages.0.loss={alpha: 1.5}"], "stage.stages[0].loss.alpha=1.5 must be in [0, 1]"),
    (["stage=two_stage", "method.alpha=0"], "stage.stages[0].loss.alpha=0.9 needs method.alpha > 0"),
    (["stage=two_stage", "stage.stages.0.epochs=0"], "stage.stages[0].epochs=0.0 must be > 0"),
    (["stage=two_stage", "stage.stages.0.param_groups=[{pattern: '['}]"],
     "stage.stages[0].param_groups[0].pattern='[' is not a valid regex"),
])
def test_bad_stage_lists_are_one_line_errors(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_empty_stage_list_exits_nonzero_before_any_work(make_cfg):
    cfg = make_cfg(*SMOKE, "stage=two_stage", "stage.stages=[]")
    with pytest.raises(SystemExit) as err:
        run(cfg)
    assert str(err.value.code).startswith("kdexp: config error: stage.stages=[] is empty")
    assert not (Path(cfg.output_dir) / "results.json").exists()
