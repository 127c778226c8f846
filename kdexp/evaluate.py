"""Evaluation: task metrics, answer perplexity, and the efficiency figures of one model on one split."""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from kdexp.metrics import accuracy, squad_scores
from kdexp.models import answer_logits, collate, count_parameters, encode
from kdexp.tasks import Example


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


def classify(model, tokenizer, examples, task_cfg, batch_size) -> list[int]:
    """Predict the label word with the highest log-probability (summed over its tokens)."""
    scores = [answer_logprobs(model, tokenizer, examples, task_cfg, batch_size, targets=[w] * len(examples),
                              desc=f"score{w}")[0] for w in task_cfg.label_words]
    return torch.stack(scores, dim=-1).argmax(-1).tolist()


@torch.no_grad()
def decode_answers(model, tokenizer, examples: list[Example], task_cfg, batch_size: int,
                   generation_kwargs: dict) -> tuple[list[str], int]:
    """Decode one answer per prompt (left-padded batches; stops at EOS or a newline, since the prompt format puts
    one answer on one line); return the answers and the number of generated tokens up to and including the stop."""
    device = next(model.parameters()).device
    stop = [tokenizer.eos_token_id] + tokenizer("\n", add_special_tokens=False)["input_ids"][:1]
    prompts = encode(examples, tokenizer, task_cfg, targets=[""] * len(examples))
    answers, n_tokens = [], 0
    for chunk in _batches(prompts, batch_size, "generate"):
        length = max(len(f.prompt_ids) for f in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, f in enumerate(chunk):
            ids[row, length - len(f.prompt_ids):] = torch.tensor(f.prompt_ids)
            mask[row, length - len(f.prompt_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, **generation_kwargs)
        new = out[:, length:].cpu()
        stopped = torch.isin(new, torch.tensor(stop))
        n_tokens += int(torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1]).sum())
        answers.extend(t.split("\n")[0].strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers, n_tokens


def generate(model, tokenizer, examples: list[Example], task_cfg, batch_size: int) -> list[str]:
    """Greedy answers, as evaluation scores them."""
    greedy = {"do_sample": False, "max_new_tokens": task_cfg.max_new_tokens}
    return decode_answers(model, tokenizer, examples, task_cfg, batch_size, greedy)[0]


@contextmanager
def peak_memory(device: str):
    """Peak memory while the block runs: CUDA max allocated on GPU, sampled process RSS on CPU (MB)."""
    result = {}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_memory_kind"] = "cuda_max_allocated"
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
    with peak_memory(hw_cfg.device) as mem:
        start = time.perf_counter()
        if task_cfg.label_words:
            labels = classify(model, tokenizer, examples, task_cfg, bs)
            predictions = [task_cfg.label_words[i] for i in labels]
            metrics = {"accuracy": accuracy(labels, [ex.label for ex in examples])}
        else:
            predictions = generate(model, tokenizer, examples, task_cfg, bs)
            metrics = squad_scores({ex.id: p for ex, p in zip(examples, predictions, strict=True)},
                                   {ex.id: ex.answers for ex in examples})
        seconds = time.perf_counter() - start
    nll, count = answer_logprobs(model, tokenizer, examples, task_cfg, bs, desc=f"{role} ppl")
    metrics["perplexity"] = math.exp(-nll.sum().item() / max(count.sum().item(), 1))
    metrics["n_eval"] = len(examples)
    speed = {"latency_ms_per_example": 1000 * seconds / len(examples),
             "throughput_examples_per_s": len(examples) / seconds, "eval_batch_size": bs, **mem}
    return metrics, predictions, speed


def model_efficiency(model, saved_dir: Path | None) -> dict:
    total, trainable = count_parameters(model)
    disk = None
    if saved_dir is not None and Path(saved_dir).exists():
        disk = sum(f.stat().st_size for f in Path(saved_dir).iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin")) / 2**20
    return {"total_params": total, "trainable_params": trainable, "disk_mb": disk,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
