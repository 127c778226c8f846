"""Surviving interruptions: resumable training checkpoints, and the teacher's out-of-memory fallback.

Resume. With ``train.save_steps`` > 0 the student's Trainer checkpoints (weights, optimizer, scheduler, RNG state)
every N steps into ``<cache_dir>/checkpoints/<run_key>/stage<i>/`` — keyed by the run, not by Hydra's timestamped run
dir, so the same command finds them again. A rerun resumes each stage from its last complete checkpoint (a finished
stage resumes at its end and trains no further), and the checkpoints are deleted once results.json is written.
Teacher preparation and teacher caches need no checkpoints: both are built under a temporary name and renamed when
complete, so a killed build is redone from scratch. Evaluation simply runs again.

OOM fallback. ``teacher.fallback`` names a teacher preset; if loading, preparing or probing the configured teacher
runs out of memory, the run switches ``cfg.teacher`` to that preset (in place, so caches and keys follow it) and
retries once. Running out of memory later (cache build, online KD) is not retried.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from kdexp.distributed import outside_process_group

log = logging.getLogger(__name__)
LOSS_FILE = "kdexp_loss.json"


# ---- resume --------------------------------------------------------------------------------------------------------

def checkpoint_dir(cfg, key: str | None = None) -> Path:
    from kdexp.registry import run_key

    return Path(cfg.cache_dir) / "checkpoints" / (key or run_key(cfg))


def clear_checkpoints(cfg, key: str) -> None:
    shutil.rmtree(checkpoint_dir(cfg, key), ignore_errors=True)


def last_checkpoint(output_dir: str) -> Path | None:
    """The newest checkpoint written to the end: a kill mid-save leaves one without its final files, skipped here."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            json.loads((path / LOSS_FILE).read_text())
            found.append((int(path.name.split("-")[1]), path))
        except (OSError, ValueError, IndexError):
            continue
    return max(found)[1] if found else None


class LossTotal(TrainerCallback):
    """Carry Trainer's running loss sum across a resume, so the final ``train_loss`` matches an uninterrupted run.

    Trainer restarts that sum at 0 on resume and averages over the steps of the current call only. Checkpoints fall
    on logging steps (``train.save_steps`` is a multiple of ``train.logging_steps``), where the sum is complete.
    """

    def __init__(self, trainer, restored: float | None):
        self.trainer, self.restored = trainer, restored

    def on_train_begin(self, args, state, control, **kwargs):
        if self.restored is not None:
            self.trainer._total_loss_scalar = self.restored

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            total = self.trainer._total_loss_scalar + float(self.trainer._tr_loss.item())
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / LOSS_FILE
            path.write_text(json.dumps({"total_loss": total, "global_step": state.global_step}))


def prepare_resume(trainer) -> str | None:
    """Register the loss bookkeeping; return the checkpoint to resume from (None: start fresh or not saving)."""
    if trainer.args.save_strategy != "steps":
        return None
    checkpoint = last_checkpoint(trainer.args.output_dir)
    restored = json.loads((checkpoint / LOSS_FILE).read_text())["total_loss"] if checkpoint else None
    trainer.add_callback(LossTotal(trainer, restored))
    if checkpoint:
        log.info("resume: continuing from %s", checkpoint)
    trainer.kdexp_resumed = checkpoint is not None
    return str(checkpoint) if checkpoint else None


def fix_resumed_train_loss(trainer) -> None:
    if not getattr(trainer, "kdexp_resumed", False):
        return
    for entry in reversed(trainer.state.log_history):
        if "train_loss" in entry:
            # Same expression as Trainer's, over all steps rather than those after the resume.
            entry["train_loss"] = trainer._total_loss_scalar / max(trainer.state.global_step, 0.001)
            return


def check_resume(cfg) -> None:
    steps, every = cfg.train.save_steps, cfg.train.logging_steps
    if steps < 0:
        raise ValueError(f"train.save_steps={steps} must be >= 0 (0 = no checkpoints)")
    if steps and cfg.method.name == "kd3" and cfg.student.lora.enabled:
        raise ValueError(f"train.save_steps={steps} cannot resume method=kd3 with student.lora.enabled=true (peft "
                         "checkpoints hold the adapter, not the KD3 projections); use save_steps=0")
    if steps and steps % every:
        raise ValueError(f"train.save_steps={steps} must be a multiple of train.logging_steps={every}, so a resumed "
                         "run logs the same losses as an uninterrupted one")


# ---- teacher OOM fallback ------------------------------------------------------------------------------------------

def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def preset_path(name: str) -> Path:
    from kdexp.main import CONF_DIR

    return Path(CONF_DIR) / "teacher" / f"{name}.yaml"


def fallback_teacher_node(name: str):
    from kdexp.schema import TeacherConfig

    return OmegaConf.merge(OmegaConf.structured(TeacherConfig), OmegaConf.load(preset_path(name)))


def check_fallback(cfg) -> None:
    name = cfg.teacher.fallback
    if name is None:
        return
    if name == cfg.teacher.name:
        raise ValueError(f"teacher.fallback={name!r} is the teacher itself; name a smaller teacher preset")
    if not preset_path(name).is_file():
        raise ValueError(f"teacher.fallback={name!r} is not a teacher preset (no {preset_path(name)})")
    if fallback_teacher_node(name).fallback is not None:
        raise ValueError(f"teacher.fallback={name!r}: that preset sets its own fallback; the retry happens once")


@torch.no_grad()
def probe_teacher(teacher, cfg) -> None:
    """One forward at the largest evaluation batch shape, so an OOM while running the teacher shows up now."""
    length = cfg.task.max_prompt_tokens + cfg.task.max_answer_tokens
    device = next(teacher.parameters()).device
    ids = torch.zeros((cfg.hardware.eval_batch_size, length), dtype=torch.long, device=device)
    teacher(input_ids=ids, logits_to_keep=cfg.task.max_answer_tokens + 1, use_cache=False)


def teacher_with_fallback(cfg, tokenizer, teacher_tokenizer, data):
    """prepare_teacher, retried once with ``teacher.fallback`` on OOM; returns (teacher, info, teacher tokenizer)."""
    from kdexp.models import load_tokenizer
    from kdexp.runners import check_vocabularies
    from kdexp.teacher import prepare_teacher

    try:
        with outside_process_group():
            teacher, info = prepare_teacher(cfg, teacher_tokenizer, data)
        if cfg.teacher.fallback:
            probe_teacher(teacher, cfg)
        return teacher, info, teacher_tokenizer
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not (is_oom(err) and cfg.teacher.fallback):
            raise
        requested, message = cfg.teacher.name, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    teacher = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.warning("teacher %s ran out of memory (%s); retrying once with teacher.fallback=%s", requested, message,
                cfg.teacher.fallback)
    cfg.teacher = fallback_teacher_node(cfg.teacher.fallback)
    teacher_tokenizer = tokenizer if cfg.teacher.tokenizer == cfg.student.tokenizer else load_tokenizer(cfg.teacher)
    check_vocabularies(cfg, tokenizer, teacher_tokenizer)
    with outside_process_group():
        teacher, info = prepare_teacher(cfg, teacher_tokenizer, data)
    info.update(fallback_used=True, requested_teacher=requested, used_teacher=cfg.teacher.name, oom_error=message)
    return teacher, info, teacher_tokenizer
