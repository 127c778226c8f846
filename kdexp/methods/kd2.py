"""KD2 sequence-level distillation (Kim & Rush 2016): the student trains with CE on the teacher's answers.

Loss per accumulated optimizer step (docs/methods.md):

    L = gold_mix · Σ_gold CE / N_gold  +  (1 − gold_mix) · Σ_teacher CE / N_teacher

Every training prompt (labelled student subset and unlabelled transfer set) has a *teacher row* whose target is the
teacher's answer; labelled prompts also have a *gold row*. N_gold / N_teacher count the answer tokens of each kind of
row in the whole accumulated batch. A term of weight 0 is not built at all, so gold_mix = 1 is B0 exactly and
gold_mix = 0 pure sequence-level KD; in between, a batch of ``train.batch_size`` prompts carries both rows of each
labelled prompt. Only text crosses from teacher to student: the teacher tokenizer encodes the prompts and decodes the
answers, the student tokenizer encodes them again, so the pair may have different vocabularies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import II

from kdexp.config.checks import choice, fail, finite, fraction, positive
from kdexp.core.answers import answer_quality, decoding_spec, teacher_answers
from kdexp.core.losses import masked_cross_entropy
from kdexp.core.models import answer_logits, collate, encode
from kdexp.core.runner import build_student, finish, setup, student_args
from kdexp.core.stages import stage_losses
from kdexp.core.training import AnswerTrainer, train_model
from kdexp.methods import artefacts
from kdexp.methods.artefacts import Artefact

log = logging.getLogger(__name__)
NAME = "kd2"
NEEDS_SHARED_VOCAB = False  # only text crosses from teacher to student
TRAINS_STUDENT = True
BASELINE = False
LOSS_WEIGHTS = ("gold_mix",)
LABEL_KNOBS = {"gold_mix": "gold_mix"}


@dataclass
class DecodingConfig:
    """How the teacher answers generative prompts (classification tasks always take the best label word)."""

    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 4  # beam only
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only (nucleus; top-k filtering is off)
    max_new_tokens: int | None = II("task.max_new_tokens")
    seed: int = 0  # sample only: sampled generations are reproducible, so they can be cached


@dataclass
class Config:
    name: str = NAME
    # Weight of CE on gold answers; 1 - gold_mix weights CE on the teacher's answers.
    gold_mix: float = 0.0
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # Training prompts without gold labels, answered by the teacher: only the teacher term applies to them.
    unlabeled_samples: int = II("task.unlabeled_samples")


def check(cfg) -> None:
    """KD2's knobs, before any model loads; one-line ValueErrors naming the key."""
    finite(cfg, ["method.gold_mix", "method.decoding.temperature", "method.decoding.top_p"])
    fraction(cfg, ["method.gold_mix", "method.decoding.top_p"])
    positive(cfg, ["method.unlabeled_samples"], strict=False)
    positive(cfg, ["method.decoding.num_beams", "method.decoding.temperature", "method.decoding.top_p",
                   "method.decoding.max_new_tokens"])
    choice(cfg, "method.decoding.strategy", ("greedy", "beam", "sample"))
    gold_mix = cfg.method.gold_mix
    for key, value in stage_losses(cfg, "gold_mix"):
        if not 0 <= value <= 1:
            fail(key, value, "must be in [0, 1]")
        # What the runner builds depends on method.gold_mix: at 0 or 1 only one kind of training row exists.
        if (gold_mix == 0 and value > 0) or (gold_mix == 1 and value < 1):
            fail(key, value, f"needs method.gold_mix strictly between 0 and 1 (method.gold_mix={gold_mix} builds "
                             "only one kind of training row)")


def training_rows(ctx, answers: list[str], gold_mix: float) -> list[tuple]:
    """Per prompt its rows ``(Encoded, is_gold)``: the teacher row unless gold_mix = 1, the gold row (labelled
    prompts) unless gold_mix = 0. Prompts left with no row are dropped. Targets are encoded by the student."""
    data, tok, task = ctx.data, ctx.tokenizer, ctx.cfg.task
    prompts = data.student + data.unlabeled
    teacher = encode(prompts, tok, task, targets=answers) if gold_mix < 1 else []
    gold = encode(data.student, tok, task) if gold_mix > 0 else []
    items = []
    for i in range(len(prompts)):
        rows = ([(teacher[i], False)] if teacher else []) + ([(gold[i], True)] if i < len(gold) else [])
        if rows:
            items.append(tuple(rows))
    return items


def row_collator(pad_id: int):
    def _collate(items):
        rows = [row for item in items for row in item]
        batch = collate([f for f, _ in rows], pad_id)
        batch["is_gold"] = torch.tensor([g for _, g in rows], dtype=torch.bool)
        return batch

    return _collate


def _labels(batch: dict, kind: str) -> torch.Tensor:
    rows = batch["is_gold"] if kind == "gold" else ~batch["is_gold"]
    return batch["labels"].masked_fill(~rows[:, None].to(batch["labels"].device), -100)


class SequenceKDTrainer(AnswerTrainer):
    """CE on teacher rows and gold rows, each normalised by its own token count, blended by gold_mix."""

    def __init__(self, *args, gold_mix: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.gold_mix = gold_mix

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._kind_counts = {kind: sum(int(_labels(b, kind).ne(-100).sum()) for b in batches)
                             for kind in ("teacher", "gold")}
        return batches, n_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, outputs = answer_logits(model, inputs)
        counts = getattr(self, "_kind_counts", {})
        terms, loss = {}, None
        for kind, weight in (("teacher", 1 - self.gold_mix), ("gold", self.gold_mix)):
            if weight == 0:
                continue
            ce = masked_cross_entropy(logits, _labels(inputs, kind), reduction="sum") / max(counts.get(kind, 1), 1)
            terms[f"ce_{kind}"] = ce
            loss = weight * ce if loss is None else loss + weight * ce
        self._log_terms(terms)
        return (loss, outputs) if return_outputs else loss


def run(cfg, out_dir: Path, run_key: str) -> dict:
    m = cfg.method
    ctx = setup(cfg, out_dir, run_key, need_teacher=True, unlabeled_samples=m.unlabeled_samples)
    data = ctx.data
    spec = decoding_spec(cfg.task, m.decoding, cfg.hardware.eval_batch_size)
    start = time.perf_counter()
    answers, generations = teacher_answers(ctx, data.student + data.unlabeled, spec)
    ctx.timings["teacher_answers_s"] = time.perf_counter() - start
    n_labelled = len(data.student)
    quality = {"labelled": answer_quality(cfg.task, data.student, answers[:n_labelled]),
               "unlabeled": answer_quality(cfg.task, data.unlabeled, answers[n_labelled:])}
    log.info("kd2: teacher answers vs gold on the training prompts: %s", quality)
    items = training_rows(ctx, answers, m.gold_mix)
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, items, student_args(ctx), ctx.tokenizer.pad_token_id,
                          trainer_cls=SequenceKDTrainer, collator=row_collator(ctx.tokenizer.pad_token_id),
                          gold_mix=m.gold_mix)
    ctx.timings["train_s"] = time.perf_counter() - start
    ctx.extra["kd2"] = {"gold_mix": m.gold_mix, "decoding": spec, "generations": generations,
                        "pseudo_label_metrics": quality, "train_prompts": len(items),
                        "train_rows": sum(len(item) for item in items)}
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

def teacher_artefacts(ctx) -> list[Artefact]:
    """Prepared teacher, its answers to every training prompt (the targets), eval; training never loads it."""
    cfg, data = ctx.cfg, ctx.data
    spec = decoding_spec(cfg.task, cfg.method.decoding, cfg.hardware.eval_batch_size)
    return artefacts.with_teacher(ctx, artefacts.answers(ctx, data.student + data.unlabeled, spec))
