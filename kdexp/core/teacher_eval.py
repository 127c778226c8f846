"""The teacher's evaluation, content-addressed: scored once per teacher × eval split × metric code, reused by every
run that names the same teacher, so a run whose caches are warm never loads the teacher (docs/teacher_cache.md).

``<cache_dir>/teacher_eval/<key>/`` holds

- ``result.json``: the teacher's eval metrics, its predictions (samples.jsonl), and its efficiency figures (size,
  latency, throughput and peak memory as measured when it was scored — on the machine and thread count recorded
  there);
- ``outputs.safetensors``: ``topk_ids`` (N_tokens, ``OVERLAP_K``) int32, the teacher's top ids at every eval answer
  token (teacher-forced on gold, examples in order, ``counts`` (N_examples,) tokens each), for the agreement
  diagnostics; ``logits_<i>`` (n_i, V) float32 of the first ``num_samples`` examples, for the dashboard's
  disagreement rows. Both only when teacher and student share a vocabulary;
- ``meta.json``: the hashed key material and the SHA-256 of both files, written last and checked before every reuse:
  a folder that is not what was written is scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdexp.core.artefacts import atomic_write_json, build_once, content_hash
from kdexp.core.diagnostics import OVERLAP_K, answer_rows
from kdexp.core.evaluate import evaluate_model, model_efficiency
from kdexp.core.models import same_vocabulary
from kdexp.core.teacher import task_identity, teacher_identity

log = logging.getLogger(__name__)
# The metric code version: bump it when evaluation, a metric or what is stored changes, so old scores are not reused.
# 2: classification is scored in one pass (evaluate.label_scores); a format-1 teacher's latency timed two, so beside
# a student's it overstated the student's speed-up by ~2x.
FORMAT = 2
RESULT, OUTPUTS, META = "result.json", "outputs.safetensors", "meta.json"


@dataclass
class TeacherEval:
    metrics: dict
    predictions: list[str]
    efficiency: dict
    path: Path
    reused: bool
    topk: list[torch.Tensor] | None = None  # per example (n_i, OVERLAP_K) teacher ids; None: vocabularies differ
    samples: list[torch.Tensor] | None = field(default=None, repr=False)  # per example (n_i, V) teacher logits


def eval_meta(cfg, examples, shared_vocab: bool) -> dict:
    """What determines the teacher's scores and outputs on ``examples`` (the key material)."""
    task = cfg.task
    return {"teacher": teacher_identity(cfg), "teacher_tokenizer": cfg.teacher.tokenizer or cfg.teacher.path,
            "task": task_identity(task), "metric": task.metric, "main_metric": task.main_metric,
            "max_new_tokens": task.max_new_tokens, "n_examples": len(examples),
            "examples": content_hash([[ex.id, ex.prompt, list(ex.answers)] for ex in examples]),
            "eval_batch_size": cfg.hardware.eval_batch_size, "dtype": cfg.hardware.dtype,
            "device": cfg.hardware.device, "outputs": {"top_k": OVERLAP_K, "samples": cfg.num_samples}
            if shared_vocab else None, "format": FORMAT}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unverified_reason(folder: Path, meta: dict) -> str | None:
    """Why the teacher evaluation in ``folder`` must not be reused (None: it is what was written for ``meta``)."""
    try:
        recorded = json.loads((folder / META).read_text())
        digests = recorded.pop("sha256")
    except FileNotFoundError:
        return f"it has no {META} (its build did not finish)"
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        return f"its {META} is malformed ({type(err).__name__})"
    if recorded != json.loads(json.dumps(meta, default=str)):
        return f"its {META} records other key material"
    for name in (RESULT, OUTPUTS):
        if not (folder / name).exists() or digests.get(name) != _sha256(folder / name):
            return f"{name} does not match the checksum in {META}"
    return None


def _ready(folder: Path, meta: dict) -> bool:
    if not folder.exists():
        return False
    reason = unverified_reason(folder, meta)
    if reason is not None:
        log.warning("teacher evaluation %s is not usable: %s; scoring the teacher again", folder, reason)
    return reason is None


def _teacher_dir(ctx) -> Path | None:
    path = ctx.teacher_info.get("path") or ctx.cfg.teacher.path
    return Path(path) if path and Path(path).is_dir() else None


def _build(ctx, examples, meta: dict, tmp: Path) -> None:
    cfg = ctx.cfg
    teacher = ctx.teacher  # the one place a run with warm caches would load it: only when this is not cached
    log.info("teacher: scoring on %d %s eval examples (one time; reused by every run of this teacher)",
             len(examples), cfg.task.name)
    metrics, predictions, speed = evaluate_model(teacher, ctx.teacher_tokenizer, examples, cfg.task, cfg.hardware,
                                                 "teacher")
    tmp.mkdir(parents=True)
    atomic_write_json(tmp / RESULT, {"metrics": metrics, "predictions": predictions,
                                     "efficiency": {**model_efficiency(teacher, _teacher_dir(ctx)), **speed}})
    tensors = {"counts": torch.zeros(0, dtype=torch.int32)}
    if meta["outputs"] is not None:
        ids, counts = [], []
        for i, _, logits in answer_rows(teacher, ctx.teacher_tokenizer, examples, cfg.task,
                                        cfg.hardware.eval_batch_size):
            ids.append(logits.topk(OVERLAP_K, dim=-1).indices.int())
            counts.append(len(logits))
            if i < cfg.num_samples:
                tensors[f"logits_{i}"] = logits.contiguous()
        tensors.update(topk_ids=torch.cat(ids), counts=torch.tensor(counts, dtype=torch.int32))
    save_file(tensors, str(tmp / OUTPUTS))
    atomic_write_json(tmp / META, {**meta, "sha256": {n: _sha256(tmp / n) for n in (RESULT, OUTPUTS)}})


def teacher_evaluation(ctx, examples) -> TeacherEval:
    """The teacher's scores on ``examples`` (the eval split): read from the cache, or scored once (loading the
    teacher through ``ctx.teacher``) and written there."""
    cfg = ctx.cfg
    shared = same_vocabulary(ctx.tokenizer, ctx.teacher_tokenizer)
    meta = eval_meta(cfg, examples, shared)
    path = Path(cfg.cache_dir) / "teacher_eval" / content_hash(meta)
    built = build_once(path, lambda tmp: _build(ctx, examples, meta, tmp), ready=lambda p: _ready(p, meta),
                       what=f"teacher evaluation {path}")
    if not built:
        log.info("teacher: reusing its evaluation %s", path)
    return read_teacher_eval(path, reused=not built, samples=cfg.num_samples if shared else 0)


def read_teacher_eval(path: Path, reused: bool, samples: int) -> TeacherEval:
    result = json.loads((path / RESULT).read_text())
    tensors = load_file(str(path / OUTPUTS))
    topk, logits = None, None
    if "topk_ids" in tensors:
        topk = list(torch.split(tensors["topk_ids"], tensors["counts"].tolist()))
        logits = [tensors[f"logits_{i}"] for i in range(min(samples, len(topk)))]
    return TeacherEval(metrics=result["metrics"], predictions=result["predictions"], efficiency=result["efficiency"],
                       path=path, reused=reused, topk=topk, samples=logits)
