"""Multi-stage training: one HF Trainer per ``stage.stages`` entry, on the same model, in order.

Every method trains through :func:`kdexp.training.train_model`, which hands over to :func:`train_stages`, so stages,
regex learning-rate multipliers (kdexp/param_groups.py) and checkpoint/resume (kdexp/resilience.py) apply to all of
them. A new Trainer per stage rebuilds the optimizer and the LR schedule at each boundary; a stage may override the
epochs, the learning rate, the param-group rules and the method's loss weights (trainer keyword arguments of the same
name: ``alpha``, ``gold_mix``, ``w_ce``/``w_kl``/``w_feat``). ``stage=single`` is one stage with the ``train`` values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from omegaconf import OmegaConf
from transformers import Trainer, TrainingArguments

from kdexp import param_groups, resilience

log = logging.getLogger(__name__)

# The method knobs a stage may set in ``loss``: they are passed to the method's trainer under the same name.
LOSS_WEIGHTS = {"b0": (), "kd1": ("alpha",), "kd2": ("gold_mix",), "kd3": ("w_ce", "w_kl", "w_feat")}


@dataclass
class RunArguments(TrainingArguments):
    """TrainingArguments plus kdexp's training controls, so they travel with the args into ``train_model``."""

    param_groups: list = field(default_factory=list)  # optim.param_groups rules (plain dicts)
    stages: list = field(default_factory=list)  # stage.stages entries (plain dicts); empty = one plain stage
    stage_index: int = 0  # added to every logged metric as "stage"


def with_controls(cfg, args: RunArguments) -> RunArguments:
    """The student's training args: param groups, stages and (``train.save_steps`` > 0) resumable checkpoints."""
    extra = {"param_groups": OmegaConf.to_container(cfg.optim.param_groups, resolve=True),
             "stages": OmegaConf.to_container(cfg.stage.stages, resolve=True)}
    if cfg.train.save_steps:
        # Hydra's run dir has a timestamp; the same command must find the same checkpoints, so key them by run.
        extra.update(output_dir=str(resilience.checkpoint_dir(cfg)), save_strategy="steps",
                     save_steps=cfg.train.save_steps, save_total_limit=2)
    return replace(args, **extra)


def stage_arguments(args: RunArguments, stage: dict, index: int) -> RunArguments:
    return replace(args, output_dir=f"{args.output_dir}/stage{index}", stage_index=index, stages=[],
                   num_train_epochs=stage.get("epochs") or args.num_train_epochs,
                   learning_rate=stage.get("lr") or args.learning_rate)


def build_optimizer(plan: param_groups.Plan, args: TrainingArguments, model):
    """The optimizer Trainer would build (``args.optim`` and its kwargs), over the planned groups."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls(plan.groups, **kwargs)


def train_stages(model, dataset, args: TrainingArguments, collator, trainer_cls, trainer_kwargs: dict) -> list[dict]:
    """Train ``model`` in place stage by stage; return the concatenated log history plus one summary per stage."""
    stages = getattr(args, "stages", None) or [{}]
    history: list[dict] = []
    for index, stage in enumerate(stages):
        stage_args = stage_arguments(args, stage, index) if isinstance(args, RunArguments) else args
        rules = stage.get("param_groups")
        plan = param_groups.plan_groups(model, getattr(args, "param_groups", []) if rules is None else rules,
                                        stage_args.learning_rate, stage_args.weight_decay,
                                        key="optim.param_groups" if rules is None else f"stage.stages[{index}]"
                                                                                        ".param_groups")
        log.info("stage %d/%d%s: param groups\n%s", index + 1, len(stages),
                 f" ({stage['name']})" if stage.get("name") else "", param_groups.format_table(plan.table))
        frozen = param_groups.freeze(plan)
        try:
            trainer = trainer_cls(model=model, args=stage_args, train_dataset=dataset, data_collator=collator,
                                  optimizers=(build_optimizer(plan, stage_args, model), None),
                                  **{**trainer_kwargs, **stage.get("loss", {})})
            checkpoint = resilience.prepare_resume(trainer)
            trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            for param in frozen:
                param.requires_grad_(True)
        resilience.fix_resumed_train_loss(trainer)
        history += trainer.state.log_history
        history.append({"stage": index, "stage_summary": {
            "index": index, "name": stage.get("name") or f"stage{index}", "epochs": stage_args.num_train_epochs,
            "lr": stage_args.learning_rate, "loss_weights": stage.get("loss", {}), "steps": trainer.state.global_step,
            "train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                               None),
            "param_groups": plan.table, "resumed_from": checkpoint, "world_size": stage_args.world_size}})
    return history


def stage_results(history: list[dict]) -> dict:
    """results.json entries: per-stage summaries, and the first stage's param-group table."""
    summaries = [h["stage_summary"] for h in history if "stage_summary" in h]
    return {"stages": summaries, "param_groups": summaries[0]["param_groups"]} if summaries else {}


def check_stages(cfg) -> None:
    """Compose-time checks of ``stage``; one-line ValueErrors naming the key."""
    stages, name, method = cfg.stage.stages, cfg.stage.name, cfg.method.name
    if name == "single" and stages:
        raise ValueError(f"stage.stages has {len(stages)} entries but stage=single trains one stage from `train`;"
                         " use a multi-stage preset (e.g. stage=two_stage)")
    if name != "single" and not stages:
        raise ValueError(f"stage.stages=[] is empty: stage={name} must list at least one stage")
    if stages and not cfg.method.train_student:
        raise ValueError(f"stage={name} needs a method that trains the student; method={method} does not")
    for i, stage in enumerate(stages):
        key = f"stage.stages[{i}]"
        for field_name in ("epochs", "lr"):
            if stage[field_name] is not None and stage[field_name] <= 0:
                raise ValueError(f"{key}.{field_name}={stage[field_name]!r} must be > 0 (or null for train.*)")
        if stage.param_groups is not None:
            param_groups.compile_rules(stage.param_groups, key=f"{key}.param_groups")
        for weight, value in stage.loss.items():
            _check_loss_weight(cfg, f"{key}.loss.{weight}", weight, value)


def _check_loss_weight(cfg, key: str, weight: str, value) -> None:
    allowed = LOSS_WEIGHTS.get(cfg.method.name, ())
    if weight not in allowed:
        raise ValueError(f"{key} is not a loss weight of method={cfg.method.name} (it has: "
                         f"{', '.join(allowed) or 'none'})")
    if weight in ("alpha", "gold_mix") and not 0 <= value <= 1:
        raise ValueError(f"{key}={value!r} must be in [0, 1]")
    if value < 0:
        raise ValueError(f"{key}={value!r} must be >= 0")
    m = cfg.method
    # What the runner builds depends on the method-level weight: e.g. no teacher cache at alpha=0, no gold rows at
    # gold_mix=0 (kd2). A stage can reweight terms that exist but cannot bring back one that was never built.
    if weight == "alpha" and m.teacher_signal == "cached" and m.alpha == 0 and value > 0:
        raise ValueError(f"{key}={value!r} needs method.alpha > 0 (at method.alpha=0 no teacher cache is built)")
    if weight == "gold_mix" and ((m.gold_mix == 0 and value > 0) or (m.gold_mix == 1 and value < 1)):
        raise ValueError(f"{key}={value!r} needs method.gold_mix strictly between 0 and 1 (method.gold_mix="
                         f"{m.gold_mix} builds only one kind of training row)")
