"""The frame every method's ``run`` shares: :func:`setup` → train → :func:`finish`.

Load tokenizers and data, prepare the teacher, build the student; after the method has trained it, evaluate both
models on the eval and validation splits, save the student and assemble the results dict that main writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdexp.core import live
from kdexp.core.evaluate import evaluate_model, model_efficiency
from kdexp.core.lora import merged_student, wrap_student
from kdexp.core.models import build_model, load_tokenizer, same_vocabulary, tokenizer_source
from kdexp.core.resume import checkpoint_dir
from kdexp.core.stages import stage_results
from kdexp.core.tasks import TaskData, load_task
from kdexp.core.teacher import teacher_with_fallback
from kdexp.core.training import training_args

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: Any
    out_dir: Path
    run_key: str
    tokenizer: Any
    teacher_tokenizer: Any
    data: TaskData
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    teacher: Any = None
    teacher_info: dict = field(default_factory=dict)


def check_vocabularies(cfg, tokenizer, teacher_tokenizer, needs_shared_vocab: bool) -> None:
    if needs_shared_vocab and not same_vocabulary(tokenizer, teacher_tokenizer):
        raise ValueError(
            f"method={cfg.method.name} needs teacher and student to share a vocabulary, but teacher={cfg.teacher.name}"
            f" ({len(teacher_tokenizer)} tokens) and student={cfg.student.name} ({len(tokenizer)} tokens) differ;"
            " pick a tokenizer-compatible pair or a text-level method (b0, kd2)")


def setup(cfg, out_dir: Path, run_key: str, *, need_teacher: bool, shared_vocab: bool = False,
          unlabeled_samples: int = 0, check_tokenizer=None) -> Context:
    """Tokenizers (checked for a shared vocabulary when the method needs one, then by ``check_tokenizer`` — both
    before any data loads or any teacher is prepared), task data with ``unlabeled_samples`` transfer-set prompts, and
    the teacher when ``need_teacher``."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.student)
    same = tokenizer_source(cfg.teacher) == tokenizer_source(cfg.student)  # a preset may leave it to `path`
    teacher_tokenizer = tokenizer if same else load_tokenizer(cfg.teacher)
    check_vocabularies(cfg, tokenizer, teacher_tokenizer, shared_vocab)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    data = load_task(cfg.task, unlabeled_samples=unlabeled_samples)
    ctx = Context(cfg=cfg, out_dir=out_dir, run_key=run_key, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                  data=data)
    log.info("data: %s train=%d validation=%d eval=%d student=%d unlabeled=%d", cfg.task.name, len(data.train),
             len(data.validation), len(data.eval), len(data.student), len(data.unlabeled))
    ctx.timings["setup_s"] = time.perf_counter() - start
    if need_teacher:
        start = time.perf_counter()
        # teacher.fallback: an out-of-memory teacher is replaced once by the fallback preset (kdexp/resilience.py).
        ctx.teacher, ctx.teacher_info, ctx.teacher_tokenizer = teacher_with_fallback(
            cfg, tokenizer, teacher_tokenizer, data,
            check_vocab=lambda tok, t_tok: check_vocabularies(cfg, tok, t_tok, shared_vocab))
        if ctx.teacher_info.get("fallback_used"):
            ctx.extra["teacher"] = cfg.teacher.name
        ctx.timings["teacher_prepare_s"] = time.perf_counter() - start
    return ctx


def build_student(ctx: Context, for_training: bool = True):
    cfg = ctx.cfg
    student = build_model(cfg.student, len(ctx.tokenizer), seed=cfg.seed, hw_cfg=cfg.hardware,
                          for_training=for_training)
    return wrap_student(student, cfg) if cfg.student.lora.enabled else student


def student_args(ctx: Context):
    """The student's TrainingArguments, its resumable checkpoints keyed by the run (train.save_steps)."""
    args = training_args(ctx.cfg, ctx.out_dir / "trainer", checkpoint_dir=checkpoint_dir(ctx.cfg, ctx.run_key))
    return replace(args, run_dir=str(ctx.out_dir))


def finish(ctx: Context, student, history: list[dict], trained: bool = True) -> dict:
    """Evaluate student (and teacher), save the student, write samples.jsonl; return the results dict."""
    cfg, out = ctx.cfg, ctx.out_dir
    student = merged_student(ctx, student)  # LoRA: evaluate, measure and save the merged standalone model
    start = time.perf_counter()
    s_metrics, s_preds, s_speed = evaluate_model(student, ctx.tokenizer, ctx.data.eval, cfg.task, cfg.hardware,
                                                 "student")
    saved = None
    if cfg.save_student and trained:
        saved = out / "student"
        student.save_pretrained(saved)
        ctx.tokenizer.save_pretrained(saved)
    efficiency = {"student": {**model_efficiency(student, saved or _local_dir(cfg.student.path)), **s_speed}}
    teacher_metrics, t_preds = None, None
    if ctx.teacher is not None and cfg.eval_teacher:
        teacher_metrics, t_preds, t_speed = evaluate_model(ctx.teacher, ctx.teacher_tokenizer, ctx.data.eval,
                                                           cfg.task, cfg.hardware, "teacher")
        t_dir = ctx.teacher_info.get("path") or _local_dir(cfg.teacher.path)
        efficiency["teacher"] = {**model_efficiency(ctx.teacher, t_dir), **t_speed}
    # Selection (sweeps, Optuna, early stopping) must never see eval: score the validation split too.
    v_metrics, _, _ = evaluate_model(student, ctx.tokenizer, ctx.data.validation, cfg.task, cfg.hardware,
                                     "student-validation")
    ctx.timings["evaluate_s"] = time.perf_counter() - start
    _write_samples(out / "samples.jsonl", ctx.data.eval[: cfg.num_samples], s_preds, t_preds)
    if ctx.teacher is not None and cfg.num_samples:  # for the dashboard's run page, which never loads a model
        rows = live.disagreement_samples(student, ctx.teacher, ctx.tokenizer, ctx.data.eval, cfg.task,
                                         cfg.num_samples, teacher_tokenizer=ctx.teacher_tokenizer)
        live.write_jsonl(out / live.DISAGREEMENTS, rows)
    main = cfg.task.main_metric
    return {
        "metrics": s_metrics, "teacher_metrics": teacher_metrics, "validation_metrics": v_metrics,
        "main_metric": {"name": main, "value": s_metrics[main], "validation_value": v_metrics[main],
                        "teacher_value": teacher_metrics[main] if teacher_metrics else None},
        "efficiency": efficiency, "teacher_info": ctx.teacher_info,
        "train_log": [h for h in history if "loss" in h or "train_loss" in h],
        "data": {"train": len(ctx.data.train), "validation": len(ctx.data.validation), "eval": len(ctx.data.eval),
                 "student_labelled": len(ctx.data.student), "unlabeled": len(ctx.data.unlabeled)},
        "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()}, **stage_results(history), **ctx.extra,
    }


def _local_dir(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).is_dir() else None


def _write_samples(path: Path, examples, student_preds, teacher_preds) -> None:
    with open(path, "w") as f:
        for i, ex in enumerate(examples):
            row = {"id": ex.id, "prompt": ex.prompt, "gold": ex.answers, "student": student_preds[i],
                   "teacher": teacher_preds[i] if teacher_preds else None}
            f.write(json.dumps(row) + "\n")
