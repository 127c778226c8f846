"""The frame every method's ``run`` shares: :func:`setup` → train → :func:`finish`.

Load tokenizers and data, prepare the teacher, build the student; after the method has trained it, evaluate both
models on the eval and validation splits, save the student and assemble the results dict that main writes.

The teacher is loaded lazily (``Context.teacher``, on first use): every teacher output a run needs (teacher answers,
logit caches, the teacher's evaluation) is a content-addressed artefact that loads it only to be built, so a run
whose artefacts are warm never holds the teacher in memory. With ``teacher.fallback`` set it is loaded at setup, so
that an out-of-memory teacher is swapped before any key names it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdexp.core import features, live
from kdexp.core.baselines import trivial_baselines
from kdexp.core.degenerate import detect
from kdexp.core.diagnostics import eval_diagnostics
from kdexp.core.evaluate import evaluate_model, model_efficiency
from kdexp.core.lora import merged_student, wrap_student
from kdexp.core.models import build_model, load_tokenizer, same_vocabulary, tokenizer_source
from kdexp.core.resume import checkpoint_dir
from kdexp.core.stages import stage_results
from kdexp.core.tasks import TaskData, load_task
from kdexp.core.teacher import MARKER, teacher_key, teacher_with_fallback
from kdexp.core.teacher_eval import TeacherEval, teacher_evaluation
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
    teacher_info: dict = field(default_factory=dict)
    # Method-specific diagnostics (KD1: the teacher's top-k mass at its T), merged into results["diagnostics"].
    diagnostics: dict = field(default_factory=dict)
    # What each logged loss term weighs in the loss ({"ce": 0.5, "kd": 2.0}), set by the method: the degenerate-run
    # check compares terms by what they add, and core never knows a method's knobs.
    loss_weights: dict | None = None
    _teacher: Any = None
    _teacher_loader: Callable[[], None] | None = None

    @property
    def teacher(self):
        """The teacher model, loaded (prepared first if need be) on first use; None when the run has none."""
        if self._teacher is None and self._teacher_loader is not None:
            load, self._teacher_loader = self._teacher_loader, None
            load()
        return self._teacher

    @teacher.setter
    def teacher(self, model) -> None:
        self._teacher, self._teacher_loader = model, None

    @property
    def has_teacher(self) -> bool:
        """The run has a teacher (loaded or not yet)."""
        return self._teacher is not None or self._teacher_loader is not None

    @property
    def teacher_loaded(self) -> bool:
        return self._teacher is not None


def check_vocabularies(cfg, tokenizer, teacher_tokenizer, needs_shared_vocab: bool, hint: str = "") -> None:
    """``hint``: the method's own way across tokenizers, appended to the suggestions."""
    if needs_shared_vocab and not same_vocabulary(tokenizer, teacher_tokenizer):
        raise ValueError(
            f"method={cfg.method.name} needs teacher and student to share a vocabulary, but teacher={cfg.teacher.name}"
            f" ({len(teacher_tokenizer)} tokens) and student={cfg.student.name} ({len(tokenizer)} tokens) differ;"
            f" pick a tokenizer-compatible pair or a text-level method (b0, kd2){' ' + hint if hint else ''}")


def setup(cfg, out_dir: Path, run_key: str, *, need_teacher: bool, shared_vocab: bool = False,
          unlabeled_samples: int = 0, check_tokenizer=None, vocab_hint: str = "") -> Context:
    """Tokenizers (checked for a shared vocabulary when the method needs one, then by ``check_tokenizer`` — both
    before any data loads or any teacher is prepared), task data with ``unlabeled_samples`` transfer-set prompts, and
    the teacher when ``need_teacher``."""
    start = time.perf_counter()
    features.use_dir(Path(cfg.cache_dir).expanduser() / "features")
    tokenizer = load_tokenizer(cfg.student)
    same = tokenizer_source(cfg.teacher) == tokenizer_source(cfg.student)  # a preset may leave it to `path`
    teacher_tokenizer = tokenizer if same else load_tokenizer(cfg.teacher)
    check_vocabularies(cfg, tokenizer, teacher_tokenizer, shared_vocab, vocab_hint)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    loaded = time.perf_counter()
    data = load_task(cfg.task, unlabeled_samples=unlabeled_samples)
    ctx = Context(cfg=cfg, out_dir=out_dir, run_key=run_key, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                  data=data, timings={"tokenizer_s": loaded - start, "data_s": time.perf_counter() - loaded})
    log.info("data: %s train=%d validation=%d eval=%d student=%d unlabeled=%d", cfg.task.name, len(data.train),
             len(data.validation), len(data.eval), len(data.student), len(data.unlabeled))
    ctx.timings["setup_s"] = time.perf_counter() - start
    if need_teacher:
        ctx.teacher_info = unloaded_teacher_info(cfg)
        ctx._teacher_loader = lambda: _load_teacher(ctx, shared_vocab, vocab_hint)
        if cfg.teacher.fallback:
            ctx.teacher  # noqa: B018 -- load now: a fallback must replace cfg.teacher before any cache key names it
    return ctx


def _load_teacher(ctx: Context, shared_vocab: bool, vocab_hint: str = "") -> None:
    cfg, start = ctx.cfg, time.perf_counter()
    log.info("teacher: loading %s", cfg.teacher.name)
    # teacher.fallback: an out-of-memory teacher is replaced once by the fallback preset (kdexp/resilience.py).
    ctx._teacher, ctx.teacher_info, ctx.teacher_tokenizer = teacher_with_fallback(
        cfg, ctx.tokenizer, ctx.teacher_tokenizer, ctx.data,
        check_vocab=lambda tok, t_tok: check_vocabularies(cfg, tok, t_tok, shared_vocab, vocab_hint))
    ctx.teacher_info["loaded"] = True
    if ctx.teacher_info.get("fallback_used"):
        ctx.extra["teacher"] = cfg.teacher.name
    ctx.timings["teacher_prepare_s"] = time.perf_counter() - start


def unloaded_teacher_info(cfg) -> dict:
    """results.json ``teacher_info`` of a teacher that was never loaded (its caches were warm): what
    ``prepare_teacher`` would report, read from the prepared teacher's marker without hashing its weights."""
    if not cfg.teacher.prepare.enabled:
        return {"source": cfg.teacher.path or "random-init", "prepared": False, "loaded": False}
    key = teacher_key(cfg)
    target = Path(cfg.cache_dir) / "teachers" / key
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    return {"key": key, "path": str(target), "prepared": True, **marker, "reused": True, "loaded": False}


def build_student(ctx: Context, for_training: bool = True):
    cfg = ctx.cfg
    with timed(ctx, "build_student_s"):
        student = build_model(cfg.student, len(ctx.tokenizer), seed=cfg.seed, hw_cfg=cfg.hardware,
                              for_training=for_training)
        return wrap_student(student, cfg) if cfg.student.lora.enabled else student


@contextmanager
def timed(ctx: Context, name: str) -> Iterator[None]:
    """Add the block's wall seconds to ``ctx.timings[name]`` (results.json ``timings_s``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - start


def student_args(ctx: Context):
    """The student's TrainingArguments, its resumable checkpoints keyed by the run (train.save_steps)."""
    args = training_args(ctx.cfg, ctx.out_dir / "trainer", checkpoint_dir=checkpoint_dir(ctx.cfg, ctx.run_key))
    return replace(args, run_dir=str(ctx.out_dir))


def finish(ctx: Context, student, history: list[dict], trained: bool = True) -> dict:
    """Evaluate student (and teacher, from its evaluation cache), save the student, write samples.jsonl and the
    dashboard's disagreement rows; return the results dict."""
    cfg, out = ctx.cfg, ctx.out_dir
    student = merged_student(ctx, student)  # LoRA: evaluate, measure and save the merged standalone model
    start = time.perf_counter()
    with timed(ctx, "evaluate_student_s"):
        s_metrics, s_preds, s_speed = evaluate_model(student, ctx.tokenizer, ctx.data.eval, cfg.task, cfg.hardware,
                                                     "student")
    saved = None
    if cfg.save_student and trained:
        saved = out / "student"
        with timed(ctx, "save_s"):
            student.save_pretrained(saved)
            ctx.tokenizer.save_pretrained(saved)
    efficiency = {"student": {**model_efficiency(student, saved or _local_dir(cfg.student.path)), **s_speed}}
    with timed(ctx, "teacher_eval_s"):
        t_eval = teacher_evaluation(ctx, ctx.data.eval) if ctx.has_teacher and cfg.eval_teacher else None
    teacher_metrics = t_eval.metrics if t_eval else None
    if t_eval:
        efficiency["teacher"] = t_eval.efficiency
        ctx.teacher_info["evaluation"] = {"path": str(t_eval.path), "reused": t_eval.reused}
    # Selection (sweeps, Optuna, early stopping) must never see eval: score the validation split too.
    with timed(ctx, "validation_s"):
        v_metrics, _, _ = evaluate_model(student, ctx.tokenizer, ctx.data.validation, cfg.task, cfg.hardware,
                                         "student-validation")
    with timed(ctx, "diagnostics_s"):
        diagnostics = _diagnostics(ctx, student, t_eval)
    ctx.timings["evaluate_s"] = time.perf_counter() - start
    _write_samples(out / "samples.jsonl", ctx.data.eval[: cfg.num_samples], s_preds, t_eval and t_eval.predictions)
    main = cfg.task.main_metric
    result = {
        "metrics": s_metrics, "teacher_metrics": teacher_metrics, "validation_metrics": v_metrics,
        "main_metric": {"name": main, "value": s_metrics[main], "validation_value": v_metrics[main],
                        "teacher_value": teacher_metrics[main] if teacher_metrics else None},
        "efficiency": efficiency, "teacher_info": ctx.teacher_info, "diagnostics": diagnostics,
        "train_log": [h for h in history if "loss" in h or "train_loss" in h],
        "data": {"train": len(ctx.data.train), "validation": len(ctx.data.validation), "eval": len(ctx.data.eval),
                 "student_labelled": len(ctx.data.student), "unlabeled": len(ctx.data.unlabeled)},
        "timings_s": {k: round(v, 2) for k, v in ctx.timings.items()}, **stage_results(history), **ctx.extra,
    }
    # A result is recorded even when it is degenerate; the flags make the report keep it out of significance tests.
    result["trivial_baselines"] = trivial_baselines(ctx.data, cfg.task) if ctx.data.student else None
    result["flags"] = detect(result, task_cfg=cfg.task, student_predictions=s_preds,
                             teacher_predictions=t_eval.predictions if t_eval else None, eval_examples=ctx.data.eval,
                             trivial=result["trivial_baselines"], loss_weights=ctx.loss_weights)
    return result


def _diagnostics(ctx: Context, student, t_eval: TeacherEval | None) -> dict:
    """results["diagnostics"] (kdexp/core/diagnostics.py), and disagreements.jsonl for the dashboard's run page
    (which never loads a model): from the teacher's cached eval logits when it has them, else from the loaded
    teacher, else skipped with a log line."""
    cfg = ctx.cfg
    samples = t_eval.samples if t_eval and t_eval.topk is not None and cfg.num_samples else None
    found, rows = eval_diagnostics(student, ctx.tokenizer, ctx.data.eval, cfg.task, cfg.hardware.eval_batch_size,
                                   teacher_topk=t_eval.topk if t_eval else None, teacher_samples=samples)
    if cfg.num_samples and rows is None and ctx.teacher_loaded:
        rows = live.disagreement_samples(student, ctx.teacher, ctx.tokenizer, ctx.data.eval, cfg.task,
                                         cfg.num_samples, teacher_tokenizer=ctx.teacher_tokenizer)
    elif cfg.num_samples and rows is None and ctx.has_teacher:
        log.info("dashboard: no %s (the teacher was not loaded and has no cached eval logits: eval_teacher=false or "
                 "different vocabularies)", live.DISAGREEMENTS)
    if rows is not None:
        live.write_jsonl(ctx.out_dir / live.DISAGREEMENTS, rows)
    return {**ctx.diagnostics, **found}


def _local_dir(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).is_dir() else None


def _write_samples(path: Path, examples, student_preds, teacher_preds) -> None:
    with open(path, "w") as f:
        for i, ex in enumerate(examples):
            row = {"id": ex.id, "prompt": ex.prompt, "gold": ex.answers, "student": student_preds[i],
                   "teacher": teacher_preds[i] if teacher_preds else None}
            f.write(json.dumps(row) + "\n")
