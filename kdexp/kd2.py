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

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdexp.evaluate import classify, decode_answers
from kdexp.losses import masked_cross_entropy
from kdexp.metrics import accuracy, squad_scores
from kdexp.models import answer_logits, collate, encode
from kdexp.teacher import task_identity, teacher_identity
from kdexp.training import AnswerTrainer, train_model, training_args
from kdexp.utils import atomic_write_json, content_hash, dir_lock

log = logging.getLogger(__name__)


# ---- teacher answers -----------------------------------------------------------------------------------------------

def decoding_spec(cfg) -> dict:
    """The settings that determine the teacher's answers (part of the cache key); knobs a strategy ignores are left
    out so that e.g. changing top_p under greedy decoding reuses the cache."""
    if cfg.task.label_words:
        return {"strategy": "label_word"}
    d = cfg.method.decoding
    spec = {"strategy": d.strategy, "max_new_tokens": d.max_new_tokens or cfg.task.max_new_tokens}
    if d.strategy == "beam":
        spec["num_beams"] = d.num_beams
    if d.strategy == "sample":
        # The batch size decides how the seeded random stream is split over prompts, so it is part of the result.
        spec.update(temperature=d.temperature, top_p=d.top_p, seed=d.seed, batch_size=cfg.hardware.eval_batch_size)
    return spec


def generation_kwargs(spec: dict) -> dict:
    kwargs = {"max_new_tokens": spec["max_new_tokens"], "num_beams": spec.get("num_beams", 1),
              "do_sample": spec["strategy"] == "sample"}
    if spec["strategy"] == "sample":
        # top_k=0: plain nucleus sampling, not HF's default top-50 filter on top of it.
        kwargs.update(temperature=spec["temperature"], top_p=spec["top_p"], top_k=0)
    return kwargs


def generate_answers(model, tokenizer, examples, task_cfg, spec: dict, batch_size: int) -> tuple[list[str], int]:
    """Decode one answer per prompt with the strategy of ``spec``; return the answers and the generated tokens."""
    return decode_answers(model, tokenizer, examples, task_cfg, batch_size, generation_kwargs(spec))


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def answer_prompts(ctx, examples, spec: dict) -> tuple[list[str], int]:
    """The teacher's answers (SST-2: its best label word) under a progress bar; (answers, generated tokens)."""
    task, bs = ctx.cfg.task, ctx.cfg.hardware.eval_batch_size
    answers, n_tokens = [], 0
    with _seeded(spec.get("seed"), next(ctx.teacher.parameters()).device), \
            tqdm(total=len(examples), desc="kd2 teacher answers", unit="prompt") as bar:
        for start in range(0, len(examples), bs):
            chunk = examples[start:start + bs]
            if task.label_words:
                answers += [task.label_words[i] for i in classify(ctx.teacher, ctx.teacher_tokenizer, chunk, task, bs)]
            else:
                texts, n = generate_answers(ctx.teacher, ctx.teacher_tokenizer, chunk, task, spec, bs)
                answers, n_tokens = answers + texts, n_tokens + n
            bar.update(len(chunk))
    return answers, n_tokens


# ---- the generation cache ------------------------------------------------------------------------------------------

def generations_meta(ctx, examples) -> dict:
    cfg = ctx.cfg
    # The configured tokenizer name, not its resolved path: the embedded one must hash the same on every machine.
    tokenizer = cfg.teacher.tokenizer or cfg.teacher.path
    return {"teacher": teacher_identity(cfg), "teacher_tokenizer": tokenizer,
            "task": task_identity(cfg.task), "split": "train", "ids": content_hash([ex.id for ex in examples]),
            "n_examples": len(examples), "decoding": decoding_spec(cfg), "format": 1}


def write_generations(path: Path, examples, answers: list[str]) -> None:
    """One readable JSON object per line (id, teacher answer, gold), written to a temp file and renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for ex, answer in zip(examples, answers, strict=True):
            f.write(json.dumps({"id": ex.id, "teacher": answer, "gold": ex.answers}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_generations(path: Path, examples) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if [r["id"] for r in rows] != [ex.id for ex in examples]:
        raise ValueError(f"generation cache {path} does not match the training prompts; delete it to rebuild")
    return [r["teacher"] for r in rows]


def teacher_answers(ctx, examples) -> tuple[list[str], dict]:
    """Content-addressed JSONL cache of the teacher's answers: built once, reused by every run and sweep job."""
    meta = generations_meta(ctx, examples)
    path = Path(ctx.cfg.cache_dir) / "generations" / f"{content_hash(meta)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    start, n_tokens = time.perf_counter(), None
    with dir_lock(path):
        reused = path.exists()
        if reused:
            log.info("kd2: reusing teacher answers %s", path)
            answers = read_generations(path, examples)
        else:
            log.info("kd2: teacher answering %d training prompts (%s)", len(examples), meta["decoding"])
            answers, n_tokens = answer_prompts(ctx, examples, meta["decoding"])
            atomic_write_json(path.with_suffix(".meta.json"), meta)  # what the key hashes, for inspection
            write_generations(path, examples, answers)  # last: its existence marks the cache complete
    info = {"path": str(path), "bytes": path.stat().st_size, "prompts": len(examples), "reused": reused,
            "generated_tokens": n_tokens, "seconds": round(time.perf_counter() - start, 2)}
    return answers, info


def pseudo_label_metrics(task_cfg, examples, answers: list[str]) -> dict | None:
    """How good the teacher's answers are against gold: accuracy (label words) or SQuAD EM/F1."""
    if not examples:
        return None
    if task_cfg.label_words:
        predicted = [task_cfg.label_words.index(a) for a in answers]
        return {"accuracy": accuracy(predicted, [ex.label for ex in examples]), "n": len(examples)}
    scores = squad_scores({ex.id: a for ex, a in zip(examples, answers, strict=True)},
                          {ex.id: ex.answers for ex in examples})
    return {**scores, "n": len(examples)}


# ---- training ------------------------------------------------------------------------------------------------------

def training_rows(ctx, answers: list[str], gold_mix: float) -> list[tuple]:
    """Per prompt its rows ``(Feature, is_gold)``: the teacher row unless gold_mix = 1, the gold row (labelled
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


def run_kd2(cfg, out_dir: Path) -> dict:
    from kdexp.runners import build_student, finish, setup

    ctx = setup(cfg, out_dir, need_teacher=True)
    data, m = ctx.data, cfg.method
    start = time.perf_counter()
    answers, generations = teacher_answers(ctx, data.student + data.unlabeled)
    ctx.timings["teacher_answers_s"] = time.perf_counter() - start
    n_labelled = len(data.student)
    quality = {"labelled": pseudo_label_metrics(cfg.task, data.student, answers[:n_labelled]),
               "unlabeled": pseudo_label_metrics(cfg.task, data.unlabeled, answers[n_labelled:])}
    log.info("kd2: teacher answers vs gold on the training prompts: %s", quality)
    items = training_rows(ctx, answers, m.gold_mix)
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, items, training_args(cfg, out_dir / "trainer"), ctx.tokenizer.pad_token_id,
                          trainer_cls=SequenceKDTrainer, collator=row_collator(ctx.tokenizer.pad_token_id),
                          gold_mix=m.gold_mix)
    ctx.timings["train_s"] = time.perf_counter() - start
    ctx.extra["kd2"] = {"gold_mix": m.gold_mix, "decoding": decoding_spec(cfg), "generations": generations,
                        "pseudo_label_metrics": quality, "train_prompts": len(items),
                        "train_rows": sum(len(item) for item in items)}
    return finish(ctx, student, history)
