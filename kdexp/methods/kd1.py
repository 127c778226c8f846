"""KD1 logit distillation: its config, ``DistillationTrainer`` and the teacher signal it reads (online or cached).

Loss per accumulated optimizer step (docs/losses.md), assembled by :func:`kdexp.core.losses.blend`:

    L = (1 − alpha) · Σ_ce CE / N_ce  +  alpha · T² · Σ_kd D(p_T^T ‖ p_S^T) / N_kd

N_ce counts gold answer tokens, N_kd counts every answer slot (unlabelled transfer-set examples have a KD signal but
no gold), both over the whole accumulated batch, so gradient accumulation matches one large batch. With alpha = 0
the KD term is never computed and the loss is bitwise the B0 loss. The default divergence is forward KL, the
mass-covering direction KL(p_T ‖ p_S); ``divergence`` picks any from the loss library, or ``uld`` for a teacher and
student with different tokenizers (kdexp/methods/kd1_xtok.py, docs/cross_tokenizer.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import II

from kdexp.config.checks import choice, fail, finite, fraction, positive
from kdexp.core.alignment import ALIGNMENTS
from kdexp.core.answers import decoding_spec, teacher_answers
from kdexp.core.artefacts import content_hash
from kdexp.core.diagnostics import teacher_mass
from kdexp.core.losses import (
    blend,
    check_divergence,
    forward_kl,
    masked_cross_entropy,
    resolve_divergence,
)
from kdexp.core.models import Encoded, answer_logits, collate, encode
from kdexp.core.runner import Context, build_student, check_vocabularies, finish, setup, student_args
from kdexp.core.sparse_target import CACHE_MODES, cache_layout, cached_forward_kl_estimate
from kdexp.core.stages import stage_losses
from kdexp.core.teacher import teacher_identity
from kdexp.core.teacher_cache import (
    FORMAT_VERSION,
    Layout,
    collate_cache_rows,
    load_or_build_teacher_cache,
    open_teacher_cache,
    teacher_logits_from_cache,
)
from kdexp.core.training import AnswerTrainer, train_model
from kdexp.methods import artefacts, kd1_xtok
from kdexp.methods.artefacts import Artefact

NAME = "kd1"
NEEDS_SHARED_VOCAB = True
TRAINS_STUDENT = True
BASELINE = False
KD_REFERENCE = True  # the report also tests every other KD method against logit KD, paired by seed
LOSS_WEIGHTS = ("alpha",)
LABEL_KNOBS = {"temperature": "T", "alpha": "α"}
ULD = "uld"  # method.divergence=uld: logit KD across tokenizers (kd1_xtok)
ULD_HINT = "or method.divergence=uld for logit KD across tokenizers (docs/cross_tokenizer.md)"


@dataclass
class Config:
    name: str = NAME
    # Weight of the KD term (some guides weight CE by alpha instead).
    alpha: float = 0.5
    temperature: float = 2.0
    # forward_kl | reverse_kl | jsd | tvd | prob_mse | prob_cosine | package.module:function (docs/losses.md)
    divergence: str = "forward_kl"
    # Teacher and student with different tokenizers: divergence=uld (docs/cross_tokenizer.md) pairs their answer tokens
    # by `truncate` (position i with i, the ULD paper) or `offsets` (spans covering the same characters).
    alignment: str = "truncate"
    # cached: the teacher's top-k logits are stored once (content-addressed HDF5) and read at any temperature, so a
    # T x alpha x seed sweep pays for the teacher once; online: the teacher runs every step.
    teacher_signal: str = "cached"
    top_k: int = 64
    cache_compression: str = "lzf"  # lzf | gzip | none
    # What the cache keeps per answer token (docs/teacher_cache.md): head_uniform = exact top_k + a tail summary, tail
    # spread uniformly (biased when the student's tail resembles the teacher's); head_sampled = exact top_k +
    # cache_samples ids drawn from the rest (unbiased forward KL); sampled = cache_samples ids drawn from the whole
    # distribution (Random-Sampling KD; top_k unused). Sampled modes need divergence=forward_kl.
    cache_mode: str = "head_uniform"
    cache_samples: int = 64
    # Temperature of the distribution the ids are drawn from (the estimate is exactly normalised there) and the
    # seed of the draws; both are in the cache key, so a cache is reproducible.
    cache_sample_temperature: float = 2.0
    cache_seed: int = 0
    # A prebuilt cache file; null = content-addressed under cache_dir/teacher_cache.
    cache_path: str | None = None
    # Divergence over chunks of this many answer tokens (bounds memory at large vocab); null = all at once.
    chunk_size: int | None = None
    # Training prompts without gold labels, answered by the teacher: only the KD term applies to them.
    unlabeled_samples: int = II("task.unlabeled_samples")


def check(cfg) -> None:
    """KD1's knobs, before any model loads; one-line ValueErrors naming the key."""
    m = cfg.method
    finite(cfg, ["method.alpha", "method.temperature"])
    fraction(cfg, ["method.alpha"])
    positive(cfg, ["method.temperature", "method.top_k", "method.chunk_size"])
    positive(cfg, ["method.unlabeled_samples"], strict=False)
    choice(cfg, "method.teacher_signal", ("cached", "online"))
    choice(cfg, "method.cache_compression", ("lzf", "gzip", "none"))
    choice(cfg, "method.cache_mode", CACHE_MODES)
    finite(cfg, ["method.cache_sample_temperature"])
    positive(cfg, ["method.cache_samples", "method.cache_sample_temperature"])
    positive(cfg, ["method.cache_seed"], strict=False)
    if m.cache_mode != "head_uniform" and m.teacher_signal == "cached" and m.divergence != "forward_kl":
        fail("method.cache_mode", m.cache_mode, f"needs method.divergence=forward_kl, got {m.divergence} (a sampled "
             "target is unbiased for forward KL only; use cache_mode=head_uniform)")
    choice(cfg, "method.alignment", ALIGNMENTS)
    if m.divergence == ULD:  # cross-tokenizer KD: kdexp/methods/kd1_xtok.py
        if m.cache_path:
            fail("method.cache_path", m.cache_path, "is not supported with method.divergence=uld (its cache is keyed "
                 "by the teacher's own token ids; leave it null)")
    else:
        check_divergence(m.divergence)
    for key, value in stage_losses(cfg, "alpha"):
        if not 0 <= value <= 1:
            fail(key, value, "must be in [0, 1]")
        # No teacher cache is built at method.alpha=0: a stage can reweight the KD term, not bring it back.
        if m.teacher_signal == "cached" and m.alpha == 0 and value > 0:
            fail(key, value, "needs method.alpha > 0 (at method.alpha=0 no teacher cache is built)")


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
        kd = self.kd_term(logits, inputs) / max(n_kd, 1) if self.alpha else None
        loss = blend(ce, kd, ce_weight=1 - self.alpha, kd_weight=self.alpha, temperature=self.temperature)
        self._log_terms({"ce": ce} if kd is None else {"ce": ce, "kd": kd})
        return (loss, outputs) if return_outputs else loss

    def kd_term(self, logits, inputs) -> torch.Tensor:
        """Σ over answer slots of D(p_T ‖ p_S); a cached forward KL never builds the (B, A, V) teacher tensor."""
        rows = cache_rows(inputs)
        if rows and self.divergence is forward_kl:  # head + uniform tail, or the unbiased sampled estimate
            return cached_forward_kl_estimate(logits, rows, vocab_size=self.vocab_size, temperature=self.temperature,
                                              mask=inputs["answer_mask"])
        return self.divergence(logits, self.teacher_logits(inputs), temperature=self.temperature,
                               mask=inputs["answer_mask"], reduction="sum", chunk_size=self.chunk_size)


def cached_collator(cache, pad_id: int):
    """Collate features and their cache rows (random access by ``Encoded.index``) into one batch."""

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

def kd_features(ctx: Context) -> list[Encoded]:
    """Labelled student subset, then the unlabelled transfer set answered by the teacher (CE-masked)."""
    answers = None
    if ctx.data.unlabeled:
        answers, ctx.extra["transfer_answers"] = teacher_answers(ctx, ctx.data.unlabeled, decoding_spec(ctx.cfg.task))
    return encode_features(ctx, answers)


def encode_features(ctx: Context, answers: list[str] | None) -> list[Encoded]:
    """The training list of :func:`kd_features` given the transfer set's answers (None: the labelled part only)."""
    cfg, data = ctx.cfg, ctx.data
    feats = encode(data.student, ctx.tokenizer, cfg.task)
    if answers is not None:
        feats += encode(data.unlabeled, ctx.tokenizer, cfg.task, targets=answers, labelled=False)
    for i, f in enumerate(feats):
        f.index = i  # cache rows are aligned with this training list
    return feats


def cache_spec(cfg, feats: list[Encoded], vocab: int) -> tuple[dict, Path, Layout]:
    """The cache's key material, path (content-addressed unless ``method.cache_path``) and layout, for a run and for
    ``python -m kdexp.cache`` alike."""
    m = cfg.method
    inputs = content_hash([f.prompt_ids + [-1] + f.answer_ids for f in feats])
    top_k, samples = cache_layout(m.cache_mode, m.top_k, m.cache_samples)
    meta = {"teacher": teacher_identity(cfg), "inputs": inputs, "n_examples": len(feats),
            "vocab_size": vocab, "top_k": top_k, "task": cfg.task.name, "format": FORMAT_VERSION}
    if samples:  # sampling knobs only key sampled caches: head_uniform ones ignore them
        meta |= {"samples": samples, "sample_temperature": m.cache_sample_temperature, "sample_seed": m.cache_seed}
    path = Path(m.cache_path) if m.cache_path else Path(cfg.cache_dir) / "teacher_cache" / f"{content_hash(meta)}.h5"
    return meta, path, Layout(vocab, top_k, samples, float(m.cache_sample_temperature), m.cache_seed)


def ensure_cache(ctx, feats: list[Encoded]):
    """Content-addressed teacher cache for exactly these training inputs; built once, reused by every sweep job."""
    cfg, m = ctx.cfg, ctx.cfg.method
    vocab = len(ctx.tokenizer)
    meta, path, layout = cache_spec(cfg, feats, vocab)
    if m.cache_path:
        cache = open_teacher_cache(path)
        if cache.vocab_size != vocab:
            raise ValueError(f"method.cache_path={path} has vocab {cache.vocab_size}, the student has {vocab}")
        return cache
    start = time.perf_counter()
    cache = load_or_build_teacher_cache(
        path, lambda: teacher_rows(ctx.teacher, feats, ctx.tokenizer.pad_token_id, cfg.hardware.eval_batch_size),
        n_examples=len(feats), vocab_size=vocab, top_k=layout.top_k, samples=layout.samples,
        sample_temperature=m.cache_sample_temperature, sample_seed=m.cache_seed,
        compression=None if m.cache_compression == "none" else m.cache_compression, meta=meta)
    ctx.timings["teacher_cache_s"] = time.perf_counter() - start
    ctx.extra["teacher_cache"] = {"path": str(path), "bytes": path.stat().st_size,
                                  "tokens": int(sum(len(f.answer_ids) for f in feats))}
    return cache


def check_top_k(top_k: int, vocab: int) -> None:
    if top_k > vocab:
        raise ValueError(f"method.top_k={top_k} exceeds the teacher vocabulary size {vocab}")


def run(cfg, out_dir: Path, run_key: str) -> dict:
    m = cfg.method
    if m.divergence == ULD:
        return kd1_xtok.run(cfg, out_dir, run_key, teacher_rows=teacher_rows)
    divergence = resolve_divergence(m.divergence)  # a user's function is imported here, before any model loads
    ctx = setup(cfg, out_dir, run_key, need_teacher=True, shared_vocab=NEEDS_SHARED_VOCAB, vocab_hint=ULD_HINT,
                unlabeled_samples=m.unlabeled_samples, check_tokenizer=lambda tok: check_top_k(m.top_k, len(tok)))
    ctx.loss_weights = {"ce": 1 - m.alpha, "kd": m.alpha * m.temperature**2}
    vocab = len(ctx.tokenizer)
    feats = kd_features(ctx)
    cached = m.teacher_signal == "cached" and m.alpha > 0
    cache = ensure_cache(ctx, feats) if cached else None
    collator = cached_collator(cache, ctx.tokenizer.pad_token_id) if cached else None
    if cached:  # what the sparse target keeps of the teacher at this T (results.json diagnostics)
        ctx.diagnostics.update(teacher_mass(cache, m.temperature))
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, feats, student_args(ctx), ctx.tokenizer.pad_token_id,
                          trainer_cls=DistillationTrainer, collator=collator, alpha=m.alpha,
                          temperature=m.temperature, divergence=divergence,
                          teacher=None if cached else ctx.teacher, vocab_size=vocab, chunk_size=m.chunk_size)
    ctx.timings["train_s"] = time.perf_counter() - start
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

def teacher_artefacts(ctx: Context) -> list[Artefact]:
    """Prepared teacher, transfer-set answers, the logit cache (cached signal, alpha > 0, no cache_path), eval."""
    m = ctx.cfg.method
    if m.divergence == ULD:
        return kd1_xtok.teacher_artefacts(ctx, teacher_rows)
    check_vocabularies(ctx.cfg, ctx.tokenizer, ctx.teacher_tokenizer, NEEDS_SHARED_VOCAB, ULD_HINT)
    check_top_k(m.top_k, len(ctx.tokenizer))
    answers = artefacts.transfer_answers(ctx)
    if m.teacher_signal != "cached" or m.alpha == 0 or m.cache_path:
        return artefacts.with_teacher(ctx, answers)
    vocab = len(ctx.tokenizer)

    def key_material(transfer: list[str] | None):
        feats = encode_features(ctx, transfer)
        meta, path, layout = cache_spec(ctx.cfg, feats, vocab)
        return meta, path, lambda: artefacts.teacher_cache_ready(path, meta, len(feats), layout)

    cache = artefacts.teacher_cache(key_material, lambda transfer: ensure_cache(ctx, encode_features(ctx, transfer)),
                                    ctx, answers)
    return artefacts.with_teacher(ctx, answers, cache)
