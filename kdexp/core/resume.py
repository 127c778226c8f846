"""Surviving interruptions: resumable training checkpoints (the teacher's out-of-memory fallback is in teacher.py).

Resume. With ``train.save_steps`` > 0 the student's Trainer checkpoints (weights, optimizer, scheduler, RNG state)
every N steps into ``<cache_dir>/checkpoints/<run_key>/stage<i>/`` — keyed by the run, not by Hydra's timestamped run
dir, so the same command finds them again. A rerun resumes each stage from its last complete checkpoint (a finished
stage resumes at its end and trains no further), and the checkpoints are deleted once results.json is written.
Teacher preparation and teacher caches need no checkpoints: both are built under a temporary name and renamed when
complete, so a killed build is redone from scratch. Evaluation simply runs again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
LOSS_FILE = "kdexp_loss.json"


def checkpoint_dir(cfg, key: str) -> Path:
    return Path(cfg.cache_dir) / "checkpoints" / key


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
    if steps and steps % every:
        raise ValueError(f"train.save_steps={steps} must be a multiple of train.logging_steps={every}, so a resumed "
                         "run logs the same losses as an uninterrupted one")
