"""The teacher-answers service: the teacher's answers to a list of prompts, decoded once and cached as JSONL.

KD1's transfer-set labels and KD2's sequence-level targets are the same thing (what the teacher says to a training
prompt, under some decoding), so they share one key scheme, one lock and one cache folder:
``<cache_dir>/answers/<key>.jsonl`` with one readable ``{"id", "teacher", "gold"}`` object per line and the hashed
key material beside it in ``<key>.meta.json``, with the SHA-256 of the JSONL's bytes, checked before every reuse.
Classification tasks answer with the teacher's best label word.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdexp.core.artefacts import atomic_write_json, build_once, content_hash
from kdexp.core.evaluate import classify, decode_answers
from kdexp.core.metrics import task_metric
from kdexp.core.teacher import task_identity, teacher_identity

log = logging.getLogger(__name__)
FORMAT = 2  # 2: one cache for KD1 labels and KD2 generations (format 1 had two folders, pseudo/ and generations/)


def decoding_spec(task_cfg, decoding=None, batch_size: int | None = None) -> dict:
    """What determines the answers (part of the key). ``decoding`` None is greedy; knobs a strategy ignores are
    left out, so that e.g. changing top_p under greedy decoding reuses the cache."""
    if task_cfg.label_words:
        return {"strategy": "label_word"}
    if decoding is None:
        return {"strategy": "greedy", "max_new_tokens": task_cfg.max_new_tokens}
    spec = {"strategy": decoding.strategy, "max_new_tokens": decoding.max_new_tokens or task_cfg.max_new_tokens}
    if decoding.strategy == "beam":
        spec["num_beams"] = decoding.num_beams
    if decoding.strategy == "sample":
        # The batch size decides how the seeded random stream is split over prompts, so it is part of the result.
        spec.update(temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed, batch_size=batch_size)
    return spec


def generation_kwargs(spec: dict) -> dict:
    kwargs = {"max_new_tokens": spec["max_new_tokens"], "num_beams": spec.get("num_beams", 1),
              "do_sample": spec["strategy"] == "sample"}
    if spec["strategy"] == "sample":
        # top_k=0: plain nucleus sampling, not HF's default top-50 filter on top of it.
        kwargs.update(temperature=spec["temperature"], top_p=spec["top_p"], top_k=0)
    return kwargs


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def answer_prompts(teacher, tokenizer, examples, task_cfg, spec: dict, batch_size: int) -> tuple[list[str], int]:
    """The teacher's answers under a progress bar; (answers, generated tokens)."""
    answers, n_tokens = [], 0
    with _seeded(spec.get("seed"), next(teacher.parameters()).device), \
            tqdm(total=len(examples), desc="teacher answers", unit="prompt") as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            if task_cfg.label_words:
                answers += [task_cfg.label_words[i] for i in classify(teacher, tokenizer, chunk, task_cfg, batch_size)]
            else:
                texts, n = decode_answers(teacher, tokenizer, chunk, task_cfg, batch_size, generation_kwargs(spec))
                answers, n_tokens = answers + texts, n_tokens + n
            bar.update(len(chunk))
    return answers, n_tokens


def answers_meta(cfg, examples, spec: dict) -> dict:
    # The configured tokenizer name, not its resolved path: the embedded one must hash the same on every machine.
    return {"teacher": teacher_identity(cfg), "teacher_tokenizer": cfg.teacher.tokenizer or cfg.teacher.path,
            "task": task_identity(cfg.task), "ids": content_hash([ex.id for ex in examples]),
            "n_examples": len(examples), "decoding": spec, "format": FORMAT}


def read_answers(path: Path, examples) -> list[str]:
    """The cached answers in ``examples`` order; ValueError naming the file when it is not what was written."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        answers = [r["teacher"] for r in rows]
        ids = [r["id"] for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"teacher answers {path} are malformed ({type(err).__name__}: {err})") from None
    if ids != [ex.id for ex in examples] or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"teacher answers {path} do not match the prompts they were keyed on")
    return answers


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".meta.json")


def check_digest(path: Path) -> None:
    """ValueError naming the file unless its bytes have the SHA-256 recorded in its ``.meta.json`` at build time."""
    meta = _meta_path(path)
    try:
        recorded = json.loads(meta.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"teacher answers {path}: {meta.name} is missing or malformed "
                         f"({type(err).__name__})") from None
    if recorded is None:
        raise ValueError(f"teacher answers {path} have no checksum in {meta.name} (built by an older kdexp version)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        raise ValueError(f"teacher answers {path} do not match the checksum in {meta.name} (changed since built)")


def _readable(path: Path, examples) -> bool:
    if not path.exists():
        return False
    try:
        read_answers(path, examples)
        check_digest(path)
        return True
    except ValueError as err:
        log.warning("%s; rebuilding it", err)
        return False


def teacher_answers(ctx, examples, spec: dict) -> tuple[list[str], dict]:
    """The teacher's answers to ``examples`` under ``spec`` (:func:`decoding_spec`): built once, reused by every
    run and sweep job; returns (answers, info for results.json)."""
    cfg = ctx.cfg
    meta = answers_meta(cfg, examples, spec)
    path = Path(cfg.cache_dir) / "answers" / f"{content_hash(meta)}.jsonl"
    start, counted = time.perf_counter(), {}

    def build(tmp: Path) -> None:
        log.info("teacher: answering %d training prompts (%s)", len(examples), spec)
        answers, counted["tokens"] = answer_prompts(ctx.teacher, ctx.teacher_tokenizer, examples, cfg.task, spec,
                                                    cfg.hardware.eval_batch_size)
        with open(tmp, "w") as f:
            for ex, answer in zip(examples, answers, strict=True):
                f.write(json.dumps({"id": ex.id, "teacher": answer, "gold": ex.answers}) + "\n")
        # What the key hashes (for inspection) and the digest of the bytes about to be renamed into place. Written
        # before that rename: a crash in between leaves a digest that matches no published file, so a rebuild.
        atomic_write_json(_meta_path(path), {**meta, "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest()})

    built = build_once(path, build, ready=lambda p: _readable(p, examples), what=f"teacher answers {path}")
    if not built:
        log.info("teacher: reusing answers %s", path)
    info = {"path": str(path), "bytes": path.stat().st_size, "prompts": len(examples), "reused": not built,
            "generated_tokens": counted.get("tokens"), "seconds": round(time.perf_counter() - start, 2)}
    return read_answers(path, examples), info


def answer_quality(task_cfg, examples, answers: list[str]) -> dict | None:
    """How good the teacher's answers are against gold, by the task's own metric."""
    if not examples:
        return None
    return {**task_metric(task_cfg.metric)(answers, examples), "n": len(examples)}
