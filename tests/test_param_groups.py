"""Regex learning-rate multipliers: first match wins, zero freezes, no decay on biases/norms, the results table."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdexp.core.models import build_model
from kdexp.core.param_groups import format_table, plan_groups
from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)  # weight + bias
        self.q_proj = nn.Linear(4, 4, bias=False)
        self.norm = nn.LayerNorm(4)  # weight + bias, no decay


def _group_of(plan, param) -> dict:
    for group in plan.groups:
        if any(p is param for p in group["params"]):
            return group
    raise AssertionError("parameter not in any optimizer group")


def test_first_matching_rule_wins_and_unmatched_get_base_lr():
    model = Block()
    rules = [{"pattern": r"q_proj", "lr_multiplier": 2.0}, {"pattern": r"proj", "lr_multiplier": 0.5}]
    plan = plan_groups(model, rules, base_lr=1e-3, base_wd=0.1)
    assert _group_of(plan, model.q_proj.weight)["lr"] == pytest.approx(2e-3)  # matches both; the first wins
    assert _group_of(plan, model.proj.weight)["lr"] == pytest.approx(5e-4)
    assert _group_of(plan, model.norm.weight)["lr"] == pytest.approx(1e-3)  # no rule: base lr
    assert sum(len(g["params"]) for g in plan.groups) == len(list(model.parameters())) and not plan.frozen


def test_biases_and_norm_weights_get_no_decay_unless_a_rule_says_so():
    model = Block()
    plan = plan_groups(model, [], base_lr=1e-3, base_wd=0.1)
    assert _group_of(plan, model.proj.weight)["weight_decay"] == 0.1
    assert _group_of(plan, model.q_proj.weight)["weight_decay"] == 0.1
    for p in (model.proj.bias, model.norm.weight, model.norm.bias):
        assert _group_of(plan, p)["weight_decay"] == 0.0
    ruled = plan_groups(model, [{"pattern": r"^norm\.", "lr_multiplier": 1.0, "weight_decay": 0.05}], 1e-3, 0.1)
    assert _group_of(ruled, model.norm.weight)["weight_decay"] == 0.05
    assert _group_of(ruled, model.proj.bias)["weight_decay"] == 0.0


def test_zero_multiplier_leaves_parameters_out_and_table_counts_them():
    model = Block()
    plan = plan_groups(model, [{"pattern": r"^proj\.", "lr_multiplier": 0.0}], base_lr=1e-3, base_wd=0.1)
    assert {id(p) for p in plan.frozen} == {id(model.proj.weight), id(model.proj.bias)}
    assert all(p is not model.proj.weight for g in plan.groups for p in g["params"])
    frozen_rows = [r for r in plan.table if r["frozen"]]
    assert len(frozen_rows) == 1 and frozen_rows[0]["tensors"] == 2 and frozen_rows[0]["params"] == 20
    assert sum(r["params"] for r in plan.table) == sum(p.numel() for p in model.parameters())
    text = format_table(plan.table)
    assert text.splitlines()[0].split() == ["group", "tensors", "params", "lr", "weight_decay"] and "frozen" in text


def test_pattern_matching_nothing_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kdexp.core.param_groups"):
        plan_groups(Block(), [{"pattern": "proj", "lr_multiplier": 1.0}, {"pattern": "q_proj", "lr_multiplier": 3.0},
                              {"pattern": "nope", "lr_multiplier": 1.0}], 1e-3, 0.0)
    assert "optim.param_groups[1].pattern='q_proj' matches no trainable parameter" in caplog.text
    assert "optim.param_groups[2].pattern='nope'" in caplog.text


@pytest.mark.parametrize("rule,key", [
    ("{pattern: '(unclosed', lr_multiplier: 1.0}", "optim.param_groups[0].pattern"),
    ("{pattern: 'x', lr_multiplier: -1.0}", "optim.param_groups[0].lr_multiplier"),
    ("{pattern: 'x', weight_decay: -0.1}", "optim.param_groups[0].weight_decay"),
])
def test_bad_rules_are_one_line_errors_naming_the_key(rule, key, tmp_path):
    cfg = compose_cfg([f"optim.param_groups=[{rule}]"], tmp_path)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_frozen_layers_are_unchanged_after_training(make_cfg):
    cfg = make_cfg(*SMOKE, "method=b0", "train.epochs=2",
                   "optim.param_groups=[{pattern: 'layers\\.0\\.self_attn', lr_multiplier: 0.0},"
                   "{pattern: 'layers\\.0\\.mlp', lr_multiplier: 0.5, weight_decay: 0.0}]")
    run(cfg)
    out = Path(cfg.output_dir)
    trained = load_file(str(out / "student" / "model.safetensors"))
    model = build_model(cfg.student, trained["model.embed_tokens.weight"].shape[0], seed=cfg.seed,
                        hw_cfg=cfg.hardware, for_training=True)
    initial = model.state_dict()
    attn = [k for k in trained if "self_attn" in k]
    assert attn and all(torch.equal(trained[k], initial[k]) for k in attn)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(trained["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    table = json.loads((out / "results.json").read_text())["param_groups"]
    rows = {r["group"].split()[0]: r for r in table}
    assert rows["optim.param_groups[0]"]["frozen"] and rows["optim.param_groups[0]"]["tensors"] == 4
    assert rows["optim.param_groups[1]"]["lr"] == pytest.approx(cfg.train.lr * 0.5)
    assert rows["optim.param_groups[1]"]["weight_decay"] == 0.0
    assert sum(r["params"] for r in table) == sum(p.numel() for p in model.parameters())  # tied head counted once
