"""Evaluation: task metrics, answer perplexity, and the efficiency figures of one model on one split.

How an answer is decoded and scored comes from the task YAML (docs/tasks.md): ``stop_strings``,
``answer_extraction`` (a name in :data:`ANSWER_EXTRACTIONS`) and ``metric`` (a name in ``metrics.METRICS``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from kdexp.core.metrics import task_metric
from kdexp.core.models import answer_logits, collate, count_parameters, encode
from kdexp.core.tasks import Example


def _batches(items: list, size: int, desc: str):
    for start in tqdm(range(0, len(items), size), desc=desc, leave=False, disable=len(items) <= size):
        yield items[start:start + size]


@torch.no_grad()
def answer_logprobs(model, tokenizer, examples: list[Example], task_cfg, batch_size: int,
                    targets: list[str] | None = None, desc: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed log-probability of the target tokens and their count (teacher-forced)."""
    feats = encode(examples, tokenizer, task_cfg, targets=targets)
    device = next(model.parameters()).device
    sums, counts = [], []
    for chunk in _batches(feats, batch_size, desc):
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        logits, _ = answer_logits(model, batch)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["answer_ids"].unsqueeze(-1)).squeeze(-1)
        sums.append((logp * batch["answer_mask"]).sum(-1).cpu())
        counts.append(batch["answer_mask"].sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


def label_word_ids(tokenizer, task_cfg) -> list[list[int]]:
    """Each label word's answer ids as :func:`encode` forms them (leading space, EOS, truncation)."""
    probe = Example(id="", prompt="", answers=[""])
    return [encode([probe], tokenizer, task_cfg, targets=[w])[0].answer_ids for w in task_cfg.label_words]


@torch.no_grad()
def _single_token_scores(model, tokenizer, examples, task_cfg, batch_size, word_ids: list[int]) -> torch.Tensor:
    """(N, W) log-probabilities of single-token label words from ONE teacher-forced pass: the logits that predict
    the answer slot come from the prompt alone (causal attention masks the answer token out exactly), so the pass
    that scores the first word holds every word's score, bit for bit what a pass per word computes."""
    feats = encode(examples, tokenizer, task_cfg, targets=[task_cfg.label_words[0]] * len(examples))
    device = next(model.parameters()).device
    index = torch.tensor(word_ids)
    scores = []
    for chunk in _batches(feats, batch_size, "score"):
        batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
        logits, _ = answer_logits(model, batch)
        scores.append(torch.log_softmax(logits[:, 0].float(), dim=-1)[:, index.to(device)].cpu())
    return torch.cat(scores)


def label_scores(model, tokenizer, examples, task_cfg, batch_size, word_ids: list[list[int]] | None = None):
    """(N, W): each label word's log-probability (summed over its tokens) for each example; ``word_ids``: the
    words' :func:`label_word_ids` when the caller has them already."""
    word_ids = word_ids or label_word_ids(tokenizer, task_cfg)
    if all(len(ids) == 1 for ids in word_ids):
        return _single_token_scores(model, tokenizer, examples, task_cfg, batch_size, [ids[0] for ids in word_ids])
    return torch.stack([answer_logprobs(model, tokenizer, examples, task_cfg, batch_size, targets=[w] * len(examples),
                                        desc=f"score{w}")[0] for w in task_cfg.label_words], dim=-1)


def classify(model, tokenizer, examples, task_cfg, batch_size) -> list[int]:
    """Predict the label word with the highest log-probability (summed over its tokens)."""
    return label_scores(model, tokenizer, examples, task_cfg, batch_size).argmax(-1).tolist()


def gold_from_scores(scores: torch.Tensor, examples: list[Example], task_cfg, word_ids: list[list[int]]):
    """The gold answers' (log-probability, token count) read off the label scores, or None when they are not there:
    a gold answer that is no label word, or label words of different lengths (then a gold pass pads its batches
    differently from the per-word passes, and the scores could differ in the last bits)."""
    words = list(task_cfg.label_words)
    if len({len(ids) for ids in word_ids}) != 1 or any(ex.label is None or ex.target != words[ex.label]
                                                        for ex in examples):
        return None
    gold = scores[torch.arange(len(examples)), torch.tensor([ex.label for ex in examples], dtype=torch.long)]
    return gold, torch.full((len(examples),), len(word_ids[0]), dtype=torch.long)


# task.answer_extraction -> decoded text (already cut at the first stop string) -> the answer that is scored.
ANSWER_EXTRACTIONS: dict[str, Callable[[str], str]] = {
    "first_line": lambda text: text.split("\n")[0].strip(),  # the prompt formats put one answer on one line
    "strip": str.strip,
}


def answer_extraction(name: str) -> Callable[[str], str]:
    if name not in ANSWER_EXTRACTIONS:
        raise ValueError(f"task.answer_extraction={name!r} is not one of {sorted(ANSWER_EXTRACTIONS)} "
                         "(kdexp/core/evaluate.py)")
    return ANSWER_EXTRACTIONS[name]


def stop_token_ids(tokenizer, stop_strings) -> list[int]:
    """EOS and the first token of each stop string. Generation stops on token ids, so a multi-token stop string
    stops at its first token even where the rest does not follow; single-token strings such as "\\n" are exact."""
    return [tokenizer.eos_token_id] + [tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in stop_strings]


def cut_at_stop(text: str, stop_strings) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text


def _left_padded(chunk, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(f.prompt_ids) for f in chunk)
    ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(chunk):
        ids[row, length - len(f.prompt_ids):] = torch.tensor(f.prompt_ids)
        mask[row, length - len(f.prompt_ids):] = 1
    return ids, mask


@torch.no_grad()
def decode_answers(model, tokenizer, examples: list[Example], task_cfg, batch_size: int,
                   generation_kwargs: dict) -> tuple[list[str], int]:
    """Decode one answer per prompt (left-padded batches; stops at EOS or ``task.stop_strings``, then
    ``task.answer_extraction``); return the answers and the number of generated tokens up to and including the
    stop."""
    device = next(model.parameters()).device
    stop_strings = list(task_cfg.stop_strings)
    stop = stop_token_ids(tokenizer, stop_strings)
    extract = answer_extraction(task_cfg.answer_extraction)
    prompts = encode(examples, tokenizer, task_cfg, targets=[""] * len(examples))
    answers, n_tokens = [], 0
    for chunk in _batches(prompts, batch_size, "generate"):
        ids, mask = _left_padded(chunk, tokenizer.pad_token_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, **generation_kwargs)
        new = out[:, ids.shape[1]:].cpu()
        stopped = torch.isin(new, torch.tensor(stop))
        n_tokens += int(torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1]).sum())
        answers.extend(extract(cut_at_stop(t, stop_strings))
                       for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers, n_tokens


def generate(model, tokenizer, examples: list[Example], task_cfg, batch_size: int) -> list[str]:
    """Greedy answers, as evaluation scores them."""
    greedy = {"do_sample": False, "max_new_tokens": task_cfg.max_new_tokens}
    return decode_answers(model, tokenizer, examples, task_cfg, batch_size, greedy)[0]


@contextmanager
def peak_memory(device: str):
    """Peak memory while the block runs: CUDA max allocated on GPU, sampled process RSS on CPU (MB). On GPU also
    ``activation_memory_mb``: the peak allocated above what was allocated on entry (the weights already there), i.e.
    activations and temporaries of the block. The CPU has no allocator statistics to measure that cleanly."""
    result = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_memory_kind"] = "cuda_max_allocated"
        result["activation_memory_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return
    proc, stop, peak = psutil.Process(), threading.Event(), [psutil.Process().memory_info().rss]

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_memory_mb"] = max(peak[0], proc.memory_info().rss) / 2**20
        result["peak_memory_kind"] = "process_rss"


def evaluate_model(model, tokenizer, examples: list[Example], task_cfg, hw_cfg, role: str):
    """Return (metrics, predictions as text, timing/memory for the efficiency table)."""
    model.eval()
    bs = hw_cfg.eval_batch_size
    metric = task_metric(task_cfg.metric)  # before the slow part: a typo'd name fails at once
    load_before = os.getloadavg()[0]
    with peak_memory(hw_cfg.device) as mem:
        start = time.perf_counter()
        gold = None
        if task_cfg.label_words:
            word_ids = label_word_ids(tokenizer, task_cfg)
            scores = label_scores(model, tokenizer, examples, task_cfg, bs, word_ids)
            predictions = [task_cfg.label_words[i] for i in scores.argmax(-1).tolist()]
            gold = gold_from_scores(scores, examples, task_cfg, word_ids)
        else:
            predictions = generate(model, tokenizer, examples, task_cfg, bs)
        metrics = metric(predictions, examples)
        seconds = time.perf_counter() - start
    # Classification: the gold answer is a label word, already scored; a second teacher-forced pass would recompute
    # the same numbers.
    nll, count = gold or answer_logprobs(model, tokenizer, examples, task_cfg, bs, desc=f"{role} ppl")
    metrics["perplexity"] = math.exp(-nll.sum().item() / max(count.sum().item(), 1))
    metrics["n_eval"] = len(examples)
    if task_cfg.main_metric not in metrics:
        raise ValueError(f"task.main_metric={task_cfg.main_metric!r} is none of {sorted(metrics)} "
                         f"(task.metric={task_cfg.metric!r})")
    speed = {"latency_ms_per_example": 1000 * seconds / len(examples),
             "throughput_examples_per_s": len(examples) / seconds, "eval_batch_size": bs, **mem,
             **machine_load(load_before)}
    return metrics, predictions, speed


def machine_load(load_before: float) -> dict:
    """The machine's load beside a timing: latency and throughput depend on what else runs. ``load_avg_1m`` is the
    larger 1-minute load average of the start and the end of the timed block (this process's own threads count)."""
    load_1m, load_5m, _ = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load_avg_1m": round(max(load_before, load_1m), 2), "load_avg_5m": round(load_5m, 2),
            "cores_available": cores}


def timing_noisy(entry: dict) -> bool:
    """A timing is noisy when the 1-minute load average exceeded the cores the process could use: then threads
    waited for a core and latency measures the queue as much as the model. Entries without a load say nothing."""
    load, cores = entry.get("load_avg_1m"), entry.get("cores_available") or entry.get("cpu_count")
    return load is not None and cores is not None and load > cores


def model_memory_mb(model) -> float:
    """The model's own weights in memory: parameter and buffer bytes (shared tensors once), in MB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def model_efficiency(model, saved_dir: Path | None) -> dict:
    total, trainable = count_parameters(model)
    disk = None
    if saved_dir is not None and Path(saved_dir).exists():
        disk = sum(f.stat().st_size for f in Path(saved_dir).iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin")) / 2**20
    return {"total_params": total, "trainable_params": trainable, "disk_mb": disk,
            "model_memory_mb": model_memory_mb(model), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
