"""Training on answer tokens with HF ``Trainer``: the B0 trainer, and the shared ``train_model`` entry.

``AnswerTrainer`` overrides only the loss and the token counting: the loss is a SUM over answer tokens divided by
the number of counted tokens in the whole accumulated batch, so gradient accumulation gives the same update as one
big batch (``loss_is_scaled_for_ga = True`` tells Trainer not to divide again).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from kdexp.core.losses import masked_cross_entropy
from kdexp.core.models import Encoded, answer_logits, collate
from kdexp.core.stages import RunArguments, train_stages, with_controls

log = logging.getLogger(__name__)


class EncodedDataset(Dataset):
    def __init__(self, features: list[Encoded]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Encoded:
        return self.features[i]


class AnswerTrainer(Trainer):
    """B0: cross-entropy on the answer tokens only."""

    loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        # Our labels are already aligned with the logits (no causal shift), so count them ourselves.
        self._ce_count = sum(int(b["labels"].ne(-100).sum()) for b in batches)
        self._kd_count = sum(int(b["answer_mask"].sum()) for b in batches)
        return batches, torch.tensor(self._ce_count, device=device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, outputs = answer_logits(model, inputs)
        ce = masked_cross_entropy(logits, inputs["labels"], reduction="sum") / max(self._counts()[0], 1)
        self._log_terms({"ce": ce})
        return (ce, outputs) if return_outputs else ce

    def _counts(self) -> tuple[int, int]:
        # Outside the training loop (e.g. evaluate()) Trainer does not call get_batch_samples.
        return getattr(self, "_ce_count", None) or 1, getattr(self, "_kd_count", None) or 1

    def _log_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate per-term losses between logging steps; ``log`` adds their means to the HF log history."""
        if not self.model.training:
            return
        acc = self.__dict__.setdefault("_term_sums", {})
        for k, v in terms.items():
            value = float(v.detach())
            if not math.isfinite(value):  # stop now: a NaN step would poison every later weight and metric
                step = self.state.global_step + 1
                raise FloatingPointError(f"loss term loss_{k} is {value} at optimizer step {step} (check the learning "
                                         "rate, the temperature and the teacher)")
            acc[k] = acc.get(k, 0.0) + value / self.args.gradient_accumulation_steps
        self.__dict__["_term_steps"] = self.__dict__.get("_term_steps", 0) + 1 / self.args.gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        steps = self.__dict__.pop("_term_steps", 0)
        sums = self.__dict__.pop("_term_sums", {})
        if steps and "loss" in logs:
            logs.update({f"loss_{k}": round(v / steps, 6) for k, v in sums.items()})
        logs["stage"] = getattr(self.args, "stage_index", 0)  # multi-stage runs: every logged metric names its stage
        super().log(logs, *args, **kwargs)


def training_args(cfg, out_dir: Path, train_cfg=None, seed: int | None = None, logging_steps=None,
                  checkpoint_dir: Path | None = None):
    student = train_cfg is None
    train_cfg = train_cfg or cfg.train
    hw = cfg.hardware
    args = RunArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.get("grad_accum", 1),
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.get("max_steps", -1),
        learning_rate=train_cfg.lr,
        weight_decay=train_cfg.weight_decay,
        warmup_steps=train_cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type=train_cfg.get("lr_scheduler", "linear"),
        logging_steps=logging_steps or train_cfg.get("logging_steps", 10),
        save_strategy="no",
        # Only the student's training reports (teacher preparation passes its own train_cfg): with logger=wandb the
        # Trainer's WandbCallback logs the loss curves into the run kdexp.experiments.wandb_log.start opened.
        report_to=["wandb"] if student and OmegaConf.select(cfg, "logger.name") == "wandb" else [],
        seed=cfg.seed if seed is None else seed,
        data_seed=cfg.seed if seed is None else seed,
        use_cpu=hw.device == "cpu",
        bf16=hw.dtype == "bfloat16" and hw.device == "cuda",
        tf32=hw.tf32 if hw.device == "cuda" else None,
        dataloader_num_workers=hw.dataloader_num_workers,
        remove_unused_columns=False,
        disable_tqdm=False,
        logging_nan_inf_filter=False,  # a NaN loss must show (and stop the run), not be averaged away
        **({"activation_checkpointing": True} if hw.gradient_checkpointing else {}),
    )
    # Param groups, stages and checkpoints are the student's (teacher preparation passes its own train_cfg).
    return with_controls(cfg, args, checkpoint_dir) if student else args


def train_model(model, features: list[Encoded], args: TrainingArguments, pad_id: int,
                trainer_cls=AnswerTrainer, collator=None, **trainer_kwargs) -> list[dict]:
    """Train in place, stage by stage (kdexp/stages.py); return Trainer's log history (per-step losses, including the
    per-term ``loss_*``, each tagged with its ``stage``) and one ``stage_summary`` entry per stage."""
    return train_stages(model, EncodedDataset(features), args, collator or (lambda fs: collate(fs, pad_id)),
                        trainer_cls, trainer_kwargs)
