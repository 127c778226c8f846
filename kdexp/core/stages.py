"""Multi-stage training: one HF Trainer per ``stage.stages`` entry, on the same model, in order.

Every method trains through :func:`kdexp.core.training.train_model`, which hands over to :func:`train_stages`, so
stages, regex learning-rate multipliers (param_groups.py) and checkpoint/resume (resume.py) apply to all of them. A
new Trainer per stage rebuilds the optimizer and the LR schedule at each boundary; a stage may override the epochs,
the learning rate, the param-group rules and the method's loss weights (trainer keyword arguments of the same name,
each method module's ``LOSS_WEIGHTS``). ``stage=single`` is one stage with the ``train`` values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf
from transformers import Trainer, TrainingArguments

from kdexp.core import live, param_groups, resume

log = logging.getLogger(__name__)


@dataclass
class RunArguments(TrainingArguments):
    """TrainingArguments plus kdexp's training controls, so they travel with the args into ``train_model``."""

    param_groups: list = field(default_factory=list)  # optim.param_groups rules (plain dicts)
    stages: list = field(default_factory=list)  # stage.stages entries (plain dicts); empty = one plain stage
    stage_index: int = 0  # added to every logged metric as "stage"
    run_dir: str | None = None  # the student's run dir: live train_log.jsonl + heartbeat.json (core/live.py)


def with_controls(cfg, args: RunArguments, checkpoint_dir: Path | None) -> RunArguments:
    """The student's training args: param groups, stages and (``train.save_steps`` > 0) resumable checkpoints."""
    extra = {"param_groups": OmegaConf.to_container(cfg.optim.param_groups, resolve=True),
             "stages": OmegaConf.to_container(cfg.stage.stages, resolve=True)}
    if cfg.train.save_steps:
        if checkpoint_dir is None:
            raise ValueError("train.save_steps > 0 needs the run's checkpoint directory (keyed by its run key)")
        # Hydra's run dir has a timestamp; the same command must find the same checkpoints, so key them by run.
        extra.update(output_dir=str(checkpoint_dir), save_strategy="steps",
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
    # One live log for every stage, so its step count runs on across them (the dashboard's curves).
    trainer_kwargs = {**trainer_kwargs, "callbacks": [*trainer_kwargs.get("callbacks", []),
                                                      *live.callbacks(getattr(args, "run_dir", None))]}
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
            checkpoint = resume.prepare_resume(trainer)
            trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            for param in frozen:
                param.requires_grad_(True)
        resume.fix_resumed_train_loss(trainer)
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


def check_stages(cfg, loss_weights: tuple[str, ...], trains_student: bool) -> None:
    """Compose-time checks of ``stage``; one-line ValueErrors naming the key. ``loss_weights``: the method's own
    weights a stage may set (its module's LOSS_WEIGHTS); the method checks their values (:func:`stage_losses`)."""
    stages, name, method = cfg.stage.stages, cfg.stage.name, cfg.method.name
    if name == "single" and stages:
        raise ValueError(f"stage.stages has {len(stages)} entries but stage=single trains one stage from `train`;"
                         " use a multi-stage preset (e.g. stage=two_stage)")
    if name != "single" and not stages:
        raise ValueError(f"stage.stages=[] is empty: stage={name} must list at least one stage")
    if stages and not trains_student:
        raise ValueError(f"stage={name} needs a method that trains the student; method={method} does not")
    for i, stage in enumerate(stages):
        key = f"stage.stages[{i}]"
        for field_name in ("epochs", "lr"):
            if stage[field_name] is not None and stage[field_name] <= 0:
                raise ValueError(f"{key}.{field_name}={stage[field_name]!r} must be > 0 (or null for train.*)")
        if stage.param_groups is not None:
            param_groups.compile_rules(stage.param_groups, key=f"{key}.param_groups")
        for weight, value in stage.loss.items():
            if weight not in loss_weights:
                raise ValueError(f"{key}.loss.{weight} is not a loss weight of method={method} (it has: "
                                 f"{', '.join(loss_weights) or 'none'})")
            if value < 0:
                raise ValueError(f"{key}.loss.{weight}={value!r} must be >= 0")


def stage_losses(cfg, weight: str) -> list[tuple[str, float]]:
    """(full key, value) of every ``stage.stages[i].loss.<weight>``, for a method's own range checks."""
    return [(f"stage.stages[{i}].loss.{weight}", stage.loss[weight]) for i, stage in enumerate(cfg.stage.stages)
            if weight in stage.loss]
