"""B0: plain fine-tuning of the student on gold answers, the baseline every KD method is compared against.

Loss per accumulated optimizer step: ``L = Σ CE / N_ce`` over the gold answer tokens of the labelled student subset.
B0 reads no method knob, so a sweep over another method's knobs trains each B0 seed once (the run key holds only
the fields of :class:`Config`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kdexp.core.models import encode
from kdexp.core.runner import build_student, finish, setup, student_args
from kdexp.core.training import train_model
from kdexp.methods import artefacts

NAME = "b0"
NEEDS_SHARED_VOCAB = False
TRAINS_STUDENT = True
BASELINE = True  # the report tests every other method against this one, paired by seed
LOSS_WEIGHTS: tuple[str, ...] = ()  # nothing for a stage to reweight
LABEL_KNOBS: dict[str, str] = {}  # knobs a report names in every variant label (and grids when there are two)


@dataclass
class Config:
    name: str = NAME


def check(cfg) -> None:
    """B0 has no knobs of its own to check."""


def run(cfg, out_dir: Path, run_key: str) -> dict:
    # The teacher is loaded only to report it beside the student (eval_teacher); B0 never trains on it.
    ctx = setup(cfg, out_dir, run_key, need_teacher=cfg.eval_teacher)
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, encode(ctx.data.student, ctx.tokenizer, cfg.task), student_args(ctx),
                          ctx.tokenizer.pad_token_id)
    ctx.timings["train_s"] = time.perf_counter() - start
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

teacher_artefacts = artefacts.for_teacher_eval
