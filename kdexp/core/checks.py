"""Pre-flight checks of the shared config groups (everything but ``method``), before any data or model loads.

Each check raises a one-line ``ValueError`` naming the full key; a method's own knobs are checked by its module's
``check`` (kdexp/methods/). What a check needs to know about the method comes in as arguments, so this module never
names a method.
"""

from __future__ import annotations

import importlib.util

from kdexp.config.checks import choice, fail, finite, fraction, positive
from kdexp.core import lora, param_groups, resume, stages, teacher
from kdexp.core.evaluate import ANSWER_EXTRACTIONS
from kdexp.core.metrics import METRIC_KEYS, METRICS
from kdexp.core.tasks import LOADERS

CHOICES = {
    "task.source": ("embedded", "hub"),
    "task.metric": tuple(METRICS),
    "task.answer_extraction": tuple(ANSWER_EXTRACTIONS),
    "hardware.device": ("cpu", "cuda", "mps"),
    "hardware.dtype": ("float32", "bfloat16", "float16"),
    "train.lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
    "logger.name": ("none", "wandb"),
}


def check_shared(cfg, *, trains_student: bool, loss_weights: tuple[str, ...]) -> None:
    """Ranges and choices of teacher, student, task, train, optim, stage, hardware and logger."""
    for key, allowed in CHOICES.items():
        choice(cfg, key, allowed)
    _check_task(cfg)
    finite(cfg, ["train.lr", "train.epochs", "train.weight_decay", "train.warmup_ratio", "teacher.prepare.lr",
                 "teacher.prepare.epochs"])
    positive(cfg, ["train.lr", "train.epochs", "train.batch_size", "train.grad_accum", "train.logging_steps",
                   "hardware.eval_batch_size", "task.max_prompt_tokens", "task.max_answer_tokens",
                   "task.max_new_tokens", "task.max_train_samples", "task.max_eval_samples"])
    positive(cfg, ["train.weight_decay", "task.validation_samples", "hardware.dataloader_num_workers",
                   "num_samples"], strict=False)
    fraction(cfg, ["train.warmup_ratio", "teacher.prepare.warmup_ratio"])
    _check_models(cfg)
    if cfg.hardware.torch_threads is not None:
        positive(cfg, ["hardware.torch_threads"])
    if cfg.logger.mode not in (None, "online", "offline", "disabled"):
        fail("logger.mode", cfg.logger.mode, "must be one of online, offline, disabled, null")
    if cfg.logger.name == "wandb" and importlib.util.find_spec("wandb") is None:
        fail("logger.name", "wandb", "needs the wandb package: pip install -e '.[wandb]'")
    _check_controls(cfg, trains_student, loss_weights)


def _check_task(cfg) -> None:
    task = cfg.task
    choice(cfg, "task.main_metric", METRIC_KEYS[task.metric])
    if task.source == "embedded" and task.loader not in LOADERS:
        fail("task.loader", task.loader, f"must be one of {', '.join(LOADERS)} for task.source=embedded (or set "
                                         "task.source=hub)")


def _check_models(cfg) -> None:
    for role in ("teacher", "student"):
        positive(cfg, [f"{role}.arch.{k}" for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                    "max_position_embeddings")])
        arch = cfg[role].arch
        if cfg[role].path is None and arch.hidden_size % arch.num_heads:
            fail(f"{role}.arch.num_heads", arch.num_heads, f"must divide {role}.arch.hidden_size={arch.hidden_size}")
    if cfg.teacher.prepare.enabled:
        positive(cfg, ["teacher.prepare.epochs", "teacher.prepare.lr", "teacher.prepare.batch_size",
                       "teacher.prepare.max_train_samples"])
    if cfg.task.max_answer_tokens + cfg.task.max_prompt_tokens > min(
        cfg.student.arch.max_position_embeddings, cfg.teacher.arch.max_position_embeddings
    ) and cfg.student.path is None:
        fail("task.max_prompt_tokens", cfg.task.max_prompt_tokens,
             "plus task.max_answer_tokens must fit in the tiny models' arch.max_position_embeddings")


def _check_controls(cfg, trains_student: bool, loss_weights: tuple[str, ...]) -> None:
    """Param groups, stages, resume, LoRA, quantization and the teacher fallback (docs/training_controls.md)."""
    param_groups.compile_rules(cfg.optim.param_groups)
    stages.check_stages(cfg, loss_weights, trains_student)
    resume.check_resume(cfg)
    for role in ("teacher", "student"):
        lora.check_quantization(cfg, role, trains_student)
    lora.check_lora(cfg, trains_student)
    teacher.check_fallback(cfg)
    if cfg.teacher.fallback:
        lora.check_quantization(cfg, "teacher", trains_student, teacher.fallback_teacher_node(cfg.teacher.fallback))
