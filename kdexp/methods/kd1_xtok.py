"""KD1 across tokenizers: ``method.divergence=uld`` (kdexp/core/uld.py, docs/cross_tokenizer.md).

The student keeps its own features; the teacher sees its own tokenization of the same prompt + answer text, and
``method.alignment`` (kdexp/core/alignment.py) pairs the two answers' tokens into spans. Per step:

    L = (1 − alpha) · Σ_ce CE / N_ce  +  alpha · T² · Σ_spans W1(sort p_T, sort p_S) / N_spans

assembled by :func:`kdexp.core.losses.blend`; N_spans counts aligned spans over the whole accumulated batch. The
teacher signal is online (a teacher forward on its own tokens each step) or cached: the existing top-k + tail cache,
built on the teacher's own token ids (so its key differs from a student-token cache whenever the ids differ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdexp.core.alignment import answer_spans, span_index
from kdexp.core.answers import decoding_spec, teacher_answers
from kdexp.core.artefacts import content_hash
from kdexp.core.losses import blend, masked_cross_entropy
from kdexp.core.models import Encoded, answer_logits, collate, encode
from kdexp.core.runner import Context, build_student, finish, setup, student_args
from kdexp.core.teacher import teacher_identity
from kdexp.core.teacher_cache import FORMAT_VERSION, Layout, collate_cache_rows, load_or_build_teacher_cache
from kdexp.core.training import AnswerTrainer, train_model
from kdexp.core.uld import span_probs, span_probs_from_cache, w1_sorted
from kdexp.methods import artefacts
from kdexp.methods.artefacts import Artefact

TEACHER = "t_"  # batch keys of the teacher's own tokenization
SPAN = "span_"
CACHE = "cache_"


@dataclass
class PairedEncoded(Encoded):
    """A student example with the teacher's tokenization of the same text and the alignment of the two answers."""

    teacher: Encoded | None = None
    spans: list = field(default_factory=list)


def paired_features(ctx: Context, alignment: str) -> list[PairedEncoded]:
    """Labelled subset then the teacher-answered transfer set, each tokenized by both sides and aligned."""
    data, task = ctx.data, ctx.cfg.task
    groups = [(data.student, None, True)]
    if data.unlabeled:
        answers, ctx.extra["transfer_answers"] = teacher_answers(ctx, data.unlabeled, decoding_spec(task))
        groups.append((data.unlabeled, answers, False))
    out = []
    for examples, targets, labelled in groups:
        texts = targets if targets is not None else [ex.target for ex in examples]
        texts = [t if t[:1].isspace() else " " + t for t in texts]  # as encode() tokenizes them
        s_feats = encode(examples, ctx.tokenizer, task, targets=targets, labelled=labelled)
        t_feats = encode(examples, ctx.teacher_tokenizer, task, targets=targets, labelled=labelled)
        for text, s, t in zip(texts, s_feats, t_feats, strict=True):
            spans = answer_spans(text, ctx.tokenizer, ctx.teacher_tokenizer, len(s.answer_ids), len(t.answer_ids),
                                 alignment, eos=bool(task.append_eos))
            out.append(PairedEncoded(s.prompt_ids, s.answer_ids, len(out), labelled, teacher=t, spans=spans))
    for f in out:
        f.teacher.index = f.index
    n_spans = sum(len(f.spans) for f in out)
    ctx.extra["alignment"] = {"mode": alignment, "spans": n_spans, "unaligned_examples":
                              sum(not f.spans for f in out), "student_tokens": sum(len(f.answer_ids) for f in out),
                              "teacher_tokens": sum(len(f.teacher.answer_ids) for f in out)}
    return out


def paired_collator(student_pad: int, teacher_pad: int, cache=None):
    def _collate(features: list[PairedEncoded]):
        batch = collate(features, student_pad)
        teacher = collate([f.teacher for f in features], teacher_pad)
        batch.update({TEACHER + k: v for k, v in teacher.items()})
        spans = span_index([f.spans for f in features], [len(f.answer_ids) for f in features],
                           [len(f.teacher.answer_ids) for f in features], batch["labels"].shape[1],
                           teacher["labels"].shape[1])
        batch.update({SPAN + k: v for k, v in spans.items()})
        if cache is not None:
            rows = collate_cache_rows([cache[f.index] for f in features], teacher["labels"].shape[1])
            rows.pop("cache_mask")
            batch.update({CACHE + k: v for k, v in rows.items()})
        return batch

    return _collate


def _part(inputs: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in inputs.items() if k.startswith(prefix)}


class ULDTrainer(AnswerTrainer):
    """CE on gold + ULD over aligned spans, teacher online (its own tokens, no_grad) or from the cache."""

    def __init__(self, *args, alpha: float, temperature: float, teacher=None, teacher_vocab: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature, self.teacher, self.teacher_vocab = alpha, temperature, teacher, teacher_vocab

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._kd_count = sum(int(b[SPAN + "s_first"].numel()) for b in batches)
        return batches, n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits, outputs = answer_logits(model, inputs)
        n_ce, n_kd = self._counts()
        ce = masked_cross_entropy(logits, inputs["labels"], reduction="sum") / max(n_ce, 1)
        kd = self.kd_term(logits, inputs) / max(n_kd, 1) if self.alpha else None
        loss = blend(ce, kd, ce_weight=1 - self.alpha, kd_weight=self.alpha, temperature=self.temperature)
        self._log_terms({"ce": ce} if kd is None else {"ce": ce, "kd": kd})
        return (loss, outputs) if return_outputs else loss

    def kd_term(self, logits: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Σ over aligned spans of W1(sorted teacher span probs, sorted student span probs)."""
        sp, t_in, T = _part(inputs, SPAN), _part(inputs, TEACHER), self.temperature
        student = span_probs(logits.flatten(0, 1), inputs["answer_ids"].flatten(), sp["s_first"], sp["s_rest"],
                             sp["s_rest_span"], T)
        rows = _part(inputs, CACHE)
        t_ids = t_in["answer_ids"].flatten()
        if rows:
            flat = {k: v.flatten(0, 1) for k, v in rows.items()}
            teacher = span_probs_from_cache(flat, t_ids, sp["t_first"], sp["t_rest"], sp["t_rest_span"],
                                            self.teacher_vocab, T)
        else:
            with torch.no_grad():
                t_logits = answer_logits(self.teacher, t_in)[0]
                teacher = span_probs(t_logits.flatten(0, 1), t_ids, sp["t_first"], sp["t_rest"], sp["t_rest_span"],
                                     T)
        return w1_sorted(teacher, student).sum()


def teacher_cache_spec(cfg, t_feats: list[Encoded], vocab: int) -> tuple[dict, Path]:
    """Key material and path of the cache on the teacher's own tokens (a run and ``python -m kdexp.cache`` alike)."""
    inputs = content_hash([f.prompt_ids + [-1] + f.answer_ids for f in t_feats])
    meta = {"teacher": teacher_identity(cfg), "inputs": inputs, "n_examples": len(t_feats),
            "vocab_size": vocab, "top_k": cfg.method.top_k, "task": cfg.task.name,
            "format": FORMAT_VERSION}
    return meta, Path(cfg.cache_dir) / "teacher_cache" / f"{content_hash(meta)}.h5"


def ensure_teacher_cache(ctx: Context, feats: list[PairedEncoded], teacher_rows):
    """The teacher cache on the teacher's own token ids (same key scheme as KD1's; a shared pair reuses its file)."""
    cfg, m = ctx.cfg, ctx.cfg.method
    t_feats, vocab = [f.teacher for f in feats], len(ctx.teacher_tokenizer)
    meta, path = teacher_cache_spec(cfg, t_feats, vocab)
    start = time.perf_counter()
    cache = load_or_build_teacher_cache(
        path, lambda: teacher_rows(ctx.teacher, t_feats, ctx.teacher_tokenizer.pad_token_id,
                                   cfg.hardware.eval_batch_size),
        n_examples=len(t_feats), vocab_size=vocab, top_k=m.top_k,
        compression=None if m.cache_compression == "none" else m.cache_compression, meta=meta)
    ctx.timings["teacher_cache_s"] = time.perf_counter() - start
    ctx.extra["teacher_cache"] = {"path": str(path), "bytes": path.stat().st_size,
                                  "tokens": int(sum(len(f.answer_ids) for f in t_feats))}
    return cache


def run(cfg, out_dir: Path, run_key: str, *, teacher_rows) -> dict:
    """KD1 with ULD; ``teacher_rows`` is KD1's cache-row generator (kdexp.methods.kd1.teacher_rows)."""
    m = cfg.method
    ctx = setup(cfg, out_dir, run_key, need_teacher=True, shared_vocab=False, unlabeled_samples=m.unlabeled_samples)
    feats = paired_features(ctx, m.alignment)
    cached = m.teacher_signal == "cached" and m.alpha > 0
    cache = ensure_teacher_cache(ctx, feats, teacher_rows) if cached else None
    collator = paired_collator(ctx.tokenizer.pad_token_id, ctx.teacher_tokenizer.pad_token_id, cache)
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, feats, student_args(ctx), ctx.tokenizer.pad_token_id, trainer_cls=ULDTrainer,
                          collator=collator, alpha=m.alpha, temperature=m.temperature,
                          teacher=None if cached else ctx.teacher, teacher_vocab=len(ctx.teacher_tokenizer))
    ctx.timings["train_s"] = time.perf_counter() - start
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

def teacher_artefacts(ctx: Context, teacher_rows) -> list[Artefact]:
    """Prepared teacher, transfer-set answers, the cache on the teacher's tokens (cached signal, alpha > 0), eval."""
    m, data, task = ctx.cfg.method, ctx.data, ctx.cfg.task
    answers = artefacts.transfer_answers(ctx)
    if m.teacher_signal != "cached" or m.alpha == 0:
        return artefacts.with_teacher(ctx, answers)
    vocab = len(ctx.teacher_tokenizer)

    def key_material(transfer: list[str] | None):
        t_feats = encode(data.student, ctx.teacher_tokenizer, task)
        if transfer is not None:
            t_feats += encode(data.unlabeled, ctx.teacher_tokenizer, task, targets=transfer, labelled=False)
        meta, path = teacher_cache_spec(ctx.cfg, t_feats, vocab)
        return meta, path, lambda: artefacts.teacher_cache_ready(path, meta, len(t_feats), Layout(vocab, m.top_k))

    def build(_transfer) -> None:  # paired_features reads the answers again, as a run does
        ensure_teacher_cache(ctx, paired_features(ctx, m.alignment), teacher_rows)

    return artefacts.with_teacher(ctx, answers, artefacts.teacher_cache(key_material, build, ctx, answers))
