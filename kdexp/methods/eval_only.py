"""``method=eval``: no training; evaluate the configured teacher and student as they are (hub id, local path, or a
student saved by an earlier run: ``student.path=outputs/.../student``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdexp.core.runner import build_student, finish, setup
from kdexp.methods import artefacts

NAME = "eval"
NEEDS_SHARED_VOCAB = False
TRAINS_STUDENT = False
BASELINE = False
LOSS_WEIGHTS: tuple[str, ...] = ()
LABEL_KNOBS: dict[str, str] = {}


@dataclass
class Config:
    name: str = NAME


def check(cfg) -> None:
    """Nothing of its own to check; the shared checks refuse stages and LoRA for a method that does not train."""


def run(cfg, out_dir: Path, run_key: str) -> dict:
    ctx = setup(cfg, out_dir, run_key, need_teacher=cfg.eval_teacher)
    return finish(ctx, build_student(ctx, for_training=False), [], trained=False)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

teacher_artefacts = artefacts.for_teacher_eval
