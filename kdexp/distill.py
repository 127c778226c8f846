"""KD1 logit distillation: ``DistillationTrainer`` and the teacher signal it reads (online or from the cache).

Loss per accumulated optimizer step (docs/losses.md):

    L = (1 − alpha) · Σ_ce CE / N_ce  +  alpha · T² · Σ_kd D(p_T^T ‖ p_S^T) / N_kd

N_ce counts gold answer tokens, N_kd counts every answer slot (unlabelled transfer-set examples have a KD signal but
no gold), both over the whole accumulated batch, so gradient accumulation matches one large batch. With alpha = 0
the KD term is never computed and the loss is bitwise the B0 loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from kdexp.cache import (
    collate_cache_rows,
    load_or_build_teacher_cache,
    open_teacher_cache,
    shared_tail_logit,
    tail_entropy_correction,
    teacher_logits_from_cache,
)
from kdexp.losses import forward_kl, masked_cross_entropy, resolve_divergence
from kdexp.models import Feature, answer_logits, collate, encode
from kdexp.teacher import task_identity, teacher_identity
from kdexp.training import AnswerTrainer, train_model, training_args
from kdexp.utils import atomic_write_json, content_hash, dir_lock

log = logging.getLogger(__name__)


def cache_rows(inputs: dict) -> dict:
    """The teacher-cache part of a :func:`cached_collator` batch, keys without their ``cache_`` prefix."""
    return {k.removeprefix("cache_"): v for k, v in inputs.items() if k.startswith("cache_")}


class DistillationTrainer(AnswerTrainer):
    """HF Trainer with the blended CE + KD loss; the teacher is online (no_grad, eval mode) or a cache."""

    def __init__(self, *args, alpha: float, temperature: float, divergence, teacher=None, vocab_size: int,
                 chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        self.teacher, self.vocab_size, self.chunk_size = teacher, vocab_size, chunk_size

    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        rows = cache_rows(inputs)
        if rows:
            return teacher_logits_from_cache(rows, self.vocab_size, self.temperature)
        with torch.no_grad():
            return answer_logits(self.teacher, inputs)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, outputs = answer_logits(model, inputs)
        n_ce, n_kd = self._counts()
        ce = masked_cross_entropy(logits, inputs["labels"], reduction="sum") / max(n_ce, 1)
        if self.alpha == 0:
            self._log_terms({"ce": ce})
            return (ce, outputs) if return_outputs else ce
        rows = cache_rows(inputs)
        if rows and self.divergence is forward_kl:
            kd = cached_forward_kl(logits, rows, temperature=self.temperature, mask=inputs["answer_mask"],
                                   vocab_size=self.vocab_size)
            # The uniform-tail reconstruction misstates the teacher's entropy, a student-independent constant:
            # correct it so logged (and reported) KD values match the full-vocabulary loss.
            kd = (kd + (tail_entropy_correction(rows, self.temperature) * inputs["answer_mask"]).sum()) / max(n_kd, 1)
        else:
            kd = self.divergence(logits, self.teacher_logits(inputs), temperature=self.temperature,
                                 mask=inputs["answer_mask"], reduction="sum", chunk_size=self.chunk_size)
            kd = kd / max(n_kd, 1)
        loss = (1 - self.alpha) * ce + self.alpha * self.temperature**2 * kd
        self._log_terms({"ce": ce, "kd": kd})
        return (loss, outputs) if return_outputs else loss


def cached_forward_kl(student_logits, rows: dict, *, temperature: float, mask, vocab_size: int) -> torch.Tensor:
    """Σ over masked tokens of KL(p̂_T‖p_S) for a cached teacher, without building the (B, A, V) teacher tensor.

    p̂_T is the uniform-tail reconstruction (top-k exact, every tail id at the shared tail logit c), so
    KL = Σ_top p̂ (log p̂ − log q) + m_tail · log p̂_c − p̂_c · (Σ_all log q − Σ_top log q); only the student's own
    log-softmax is vocabulary-sized. Equal to ``forward_kl(student, teacher_logits_from_cache(...))``.
    """
    keep = mask.bool()
    vals, ids = rows["topk_logits"][keep].float() / temperature, rows["topk_ids"][keep].long()
    tail = shared_tail_logit({k: v[keep] for k, v in rows.items()}, vocab_size, temperature) / temperature
    n_tail = vocab_size - vals.shape[-1]
    lse = torch.logsumexp(torch.cat([vals, (tail + math.log(n_tail)).unsqueeze(-1)], -1), -1, keepdim=True)
    logp_top, logp_tail = vals - lse, tail.unsqueeze(-1) - lse
    logq = torch.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    logq_top = logq.gather(-1, ids)
    tail_logq = logq.sum(-1, keepdim=True) - logq_top.sum(-1, keepdim=True)
    kl = (logp_top.exp() * (logp_top - logq_top)).sum(-1, keepdim=True)
    kl = kl + n_tail * logp_tail.exp() * logp_tail - logp_tail.exp() * tail_logq
    return kl.sum()


def cached_collator(cache, pad_id: int):
    """Collate features and their cache rows (random access by ``Feature.index``) into one batch."""

    def _collate(features):
        batch = collate(features, pad_id)
        rows = collate_cache_rows([cache[f.index] for f in features], batch["labels"].shape[1])
        rows.pop("cache_mask", None)
        batch.update({f"cache_{k}": v for k, v in rows.items()})
        return batch

    return _collate


@torch.no_grad()
def teacher_rows(teacher, features, pad_id: int, batch_size: int):
    """Yield (feature index, teacher logits (n_answer_tokens, V)) for the cache builder."""
    device = next(teacher.parameters()).device
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = answer_logits(teacher, batch)[0].float().cpu()
        for row, f in enumerate(chunk):
            yield f.index, logits[row, logits.shape[1] - len(f.answer_ids):]


# ---- the KD1 runner ------------------------------------------------------------------------------------------------

def pseudo_targets(ctx, examples) -> list[str]:
    """The teacher's own answers for the unlabelled transfer set (label word / greedy answer), cached on disk."""
    from kdexp.evaluate import classify, generate

    cfg = ctx.cfg
    key = content_hash({"teacher": teacher_identity(cfg), "task": task_identity(cfg.task),
                        "ids": [ex.id for ex in examples], "max_new_tokens": cfg.task.max_new_tokens})
    path = Path(cfg.cache_dir) / "pseudo" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log.info("teacher: labelling %d unlabelled transfer examples", len(examples))
    bs = cfg.hardware.eval_batch_size
    if cfg.task.label_words:
        targets = [cfg.task.label_words[i] for i in classify(ctx.teacher, ctx.teacher_tokenizer, examples,
                                                              cfg.task, bs)]
    else:
        targets = generate(ctx.teacher, ctx.teacher_tokenizer, examples, cfg.task, bs)
    atomic_write_json(path, targets)
    return targets


def kd_features(ctx) -> list[Feature]:
    """Labelled student subset, then the unlabelled transfer set answered by the teacher (CE-masked)."""
    cfg, data = ctx.cfg, ctx.data
    feats = encode(data.student, ctx.tokenizer, cfg.task)
    if data.unlabeled:
        extra = encode(data.unlabeled, ctx.tokenizer, cfg.task, targets=pseudo_targets(ctx, data.unlabeled),
                       labelled=False)
        feats += extra
    for i, f in enumerate(feats):
        f.index = i  # cache rows are aligned with this training list
    return feats


def ensure_cache(ctx, feats: list[Feature]):
    """Content-addressed teacher cache for exactly these training inputs; built once, reused by every sweep job."""
    cfg, m = ctx.cfg, ctx.cfg.method
    vocab = len(ctx.tokenizer)
    inputs = content_hash([f.prompt_ids + [-1] + f.answer_ids for f in feats])
    meta = {"teacher": teacher_identity(cfg), "inputs": inputs, "n_examples": len(feats),
            "vocab_size": vocab, "top_k": m.top_k, "task": cfg.task.name, "format": 1}
    path = Path(m.cache_path) if m.cache_path else Path(cfg.cache_dir) / "teacher_cache" / f"{content_hash(meta)}.h5"
    if m.cache_path:
        cache = open_teacher_cache(path)
        if cache.vocab_size != vocab:
            raise ValueError(f"method.cache_path={path} has vocab {cache.vocab_size}, the student has {vocab}")
        return cache
    start = time.perf_counter()
    with dir_lock(path):
        cache = load_or_build_teacher_cache(
            path, lambda: teacher_rows(ctx.teacher, feats, ctx.tokenizer.pad_token_id, cfg.hardware.eval_batch_size),
            n_examples=len(feats), vocab_size=vocab, top_k=m.top_k,
            compression=None if m.cache_compression == "none" else m.cache_compression, meta=meta)
    ctx.timings["teacher_cache_s"] = time.perf_counter() - start
    ctx.extra["teacher_cache"] = {"path": str(path), "bytes": path.stat().st_size,
                                  "tokens": int(sum(len(f.answer_ids) for f in feats))}
    return cache


def run_kd1(cfg, out_dir: Path) -> dict:
    from kdexp.runners import build_student, finish, setup

    ctx = setup(cfg, out_dir, need_teacher=True)
    m = cfg.method
    vocab = len(ctx.tokenizer)
    if m.top_k > vocab:
        raise ValueError(f"method.top_k={m.top_k} exceeds the teacher vocabulary size {vocab}")
    feats = kd_features(ctx)
    cached = m.teacher_signal == "cached" and m.alpha > 0
    collator = cached_collator(ensure_cache(ctx, feats), ctx.tokenizer.pad_token_id) if cached else None
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, feats, training_args(cfg, out_dir / "trainer"), ctx.tokenizer.pad_token_id,
                          trainer_cls=DistillationTrainer, collator=collator, alpha=m.alpha,
                          temperature=m.temperature, divergence=resolve_divergence(m.divergence),
                          teacher=None if cached else ctx.teacher, vocab_size=vocab, chunk_size=m.chunk_size)
    ctx.timings["train_s"] = time.perf_counter() - start
    return finish(ctx, student, history)
