"""Regex learning-rate multipliers: ``optim.param_groups`` rules → optimizer parameter groups and a summary table.

Each parameter takes the FIRST rule whose ``pattern`` is found (``re.search``) in its name; its learning rate is the
base rate times the rule's ``lr_multiplier`` (0 freezes it: ``requires_grad=False`` and no optimizer slot). Weight
decay is the rule's ``weight_decay`` when set, otherwise the base value, except that biases and normalisation weights
get none (the HF Trainer default, which a rule may override). Parameters no rule matches keep the base rate.
Parameters that are already frozen (LoRA base weights) are left out entirely.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)
KEY = "optim.param_groups"


@dataclass
class Plan:
    groups: list[dict] = field(default_factory=list)  # torch.optim param groups: params, lr, weight_decay
    table: list[dict] = field(default_factory=list)  # one row per group, frozen rows included
    frozen: list[nn.Parameter] = field(default_factory=list)


def compile_rules(rules, key: str = KEY) -> list[tuple[re.Pattern, float, float | None]]:
    """Check and compile the rules; a bad one raises a one-line ValueError naming ``key[i]``."""
    out = []
    for i, rule in enumerate(rules or []):
        try:
            regex = re.compile(rule["pattern"])
        except re.error as err:
            raise ValueError(f"{key}[{i}].pattern={rule['pattern']!r} is not a valid regex: {err}") from None
        mult, decay = rule.get("lr_multiplier", 1.0), rule.get("weight_decay")
        if mult is None or mult < 0:
            raise ValueError(f"{key}[{i}].lr_multiplier={mult!r} must be >= 0 (0 freezes)")
        if decay is not None and decay < 0:
            raise ValueError(f"{key}[{i}].weight_decay={decay!r} must be >= 0 or null")
        out.append((regex, float(mult), None if decay is None else float(decay)))
    return out


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of normalisation modules (LayerNorm, RMSNorm, ...), by module class and name."""
    names = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or p_name.endswith("bias"):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def plan_groups(model: nn.Module, rules, base_lr: float, base_wd: float, key: str = KEY) -> Plan:
    """Assign every trainable parameter to a group; nothing is modified (``freeze`` applies the zero multipliers)."""
    compiled = compile_rules(rules, key)
    no_decay = no_decay_names(model)
    buckets: dict[tuple, dict] = {}
    hits = [0] * len(compiled)
    plan = Plan()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i for i, (regex, _, _) in enumerate(compiled) if regex.search(name)), None)
        mult, decay = (1.0, None) if index is None else compiled[index][1:]
        if index is not None:
            hits[index] += 1
        if decay is None:
            decay = 0.0 if name in no_decay else base_wd
        label = "default" if index is None else f"{key}[{index}] {compiled[index][0].pattern!r}"
        if mult == 0:
            plan.frozen.append(param)
            decay = 0.0
        bucket = buckets.setdefault((index, decay, mult == 0), {
            "row": {"group": label, "tensors": 0, "params": 0, "lr": base_lr * mult, "weight_decay": decay,
                    "frozen": mult == 0},
            "params": []})
        bucket["row"]["tensors"] += 1
        bucket["row"]["params"] += param.numel()
        bucket["params"].append(param)
    for i, n in enumerate(hits):
        if n == 0:
            log.warning("%s[%d].pattern=%r matches no trainable parameter (earlier rules win)", key, i,
                        compiled[i][0].pattern)
    for bucket in buckets.values():
        plan.table.append(bucket["row"])
        if not bucket["row"]["frozen"]:
            plan.groups.append({"params": bucket["params"], "lr": bucket["row"]["lr"],
                                "weight_decay": bucket["row"]["weight_decay"]})
    return plan


def freeze(plan: Plan) -> list[nn.Parameter]:
    """Apply lr_multiplier 0; return the parameters to unfreeze after this training stage."""
    for param in plan.frozen:
        param.requires_grad_(False)
    return plan.frozen


def format_table(table: list[dict]) -> str:
    width = max([len(r["group"]) for r in table] + [5])
    lines = [f"{'group':<{width}}  {'tensors':>7}  {'params':>11}  {'lr':>9}  weight_decay"]
    for r in table:
        lr = "frozen" if r["frozen"] else f"{r['lr']:.2e}"
        lines.append(f"{r['group']:<{width}}  {r['tensors']:>7}  {r['params']:>11,}  {lr:>9}  {r['weight_decay']:g}")
    return "\n".join(lines)
