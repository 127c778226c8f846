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

    def on_step_begin(self, args, state, control, **kwargs):
        # Safety net for stop_at_end: a step past the schedule would silently change the weights and the metrics.
        if state.global_step >= state.max_steps:
            raise RuntimeError(f"resume: Trainer is about to train step {state.global_step + 1} of a schedule of "
                               f"{state.max_steps} steps ({args.output_dir}); the resumed run would differ from an "
                               "uninterrupted one")

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
        stop_at_end(trainer)
    trainer.kdexp_resumed = checkpoint is not None
    return str(checkpoint) if checkpoint else None


def stop_at_end(trainer) -> None:
    """Make a resume from a finished schedule's last checkpoint train nothing (weights and state are still loaded).

    Trainer resumes at epoch ``global_step // steps_per_epoch`` after ``global_step % steps_per_epoch`` batches and
    checks ``global_step >= max_steps`` only after an optimizer step. When the schedule's end is not an epoch
    boundary (``train.max_steps`` not a multiple of the steps per epoch, or fractional ``train.epochs``), resuming
    from checkpoint-<max_steps> therefore trains one step more. Here the finished case starts after the last epoch.
    """
    original = trainer._init_training_state  # (max_steps, steps_per_epoch, num_train_epochs, checkpoint, trial)

    def init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = original(max_steps, num_update_steps_per_epoch, num_train_epochs, *args,
                                                 **kwargs)
        if trainer.state.global_step >= max_steps:
            log.info("resume: %s finished its %d steps; nothing left to train", trainer.args.output_dir, max_steps)
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    trainer._init_training_state = init_training_state


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
