"""The KD4 bench: what on-policy sampling costs per optimizer step, against a KD1 step with an online teacher.

Both methods train through ``kdexp.main.run`` in this process, interleaved over rounds (median step time after
warm-up, ``kdexp.bench.common.time_methods``), with torch threads pinned by ``hardware.torch_threads``. KD4 runs at
``method.lmbda=1``, so every timed step samples, and both use forward KL. The task is squad_qg by default, with an
untrained tiny student whose samples rarely stop early: the generation figures are near their worst case for
``max_new_tokens``.

Keys of the JSON object: ``task``, ``batch_size``, ``steps_timed`` (per method), ``max_new_tokens``;
``step_time_s`` (``kd1_online``, ``kd4``) and ``step_time_ratio`` (``kd4/kd1_online``); ``generate_tokens_per_s``
(sampled tokens over the seconds spent sampling, every KD4 run together); ``generate_share`` (those seconds over
KD4's training time, warm-up included); ``mean_sampled_len`` (tokens per sampled answer).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kdexp.bench.common import config, isolated, merged, time_methods, with_method

# Both on forward KL (KD4: jsd at beta=0 is exactly it), so the ratio is what on-policy sampling adds: generation
# and the longer answer windows of samples, not a costlier divergence (a beta in (0, 1) builds a mixture per token).
VARIANTS = {"kd1_online": ("kd1", "method.teacher_signal=online", "method.divergence=forward_kl"),
            "kd4": ("kd4", "method.lmbda=1", "method.loss=jsd", "method.beta=0")}
# No transfer set (teacher generation stays out) and tiny eval sets: evaluation runs after training, unmeasured.
BENCH_OVERRIDES = ["task=squad_qg", "teacher.prepare.enabled=false", "task.max_train_samples=64",
                   "task.unlabeled_samples=0", "task.max_eval_samples=8", "task.validation_samples=8",
                   "task.max_new_tokens=16", "train.batch_size=8", "hardware.torch_threads=1", "method=kd1"]


def _kd4_runs(work: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted((work / "timed").glob("kd4-*/results.json"))]
    if not found:
        raise RuntimeError(f"bench kd4: no KD4 results.json under {work / 'timed'}")
    return found


def bench_kd4(steps: int = 3, warmup: int = 1, rounds: int = 2, overrides=()) -> dict:
    """Step time of KD4 (every step on-policy) vs KD1-online, and KD4's generation throughput and share."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = isolated(merged(BENCH_OVERRIDES, overrides), work)
        variants = {name: with_method(base, *knobs) for name, knobs in VARIANTS.items()}
        cfg = config(variants["kd4"], work / "out")
        step = time_methods(variants, work, steps=steps, warmup=warmup, rounds=rounds)
        runs = _kd4_runs(work)
    gen_s = sum(r["kd4"]["generate_s"] for r in runs)
    tokens = sum(r["kd4"]["sampled_tokens"] for r in runs)
    train_s = sum(h["train_runtime"] for r in runs for h in r["train_log"] if "train_runtime" in h)
    # Rows actually sampled: a step's last micro-batch of an epoch can be short of train.batch_size.
    rows = sum(r["kd4"]["sampled_rows"] for r in runs)
    return {
        "task": cfg.task.name, "batch_size": cfg.train.batch_size, "steps_timed": steps * rounds,
        "max_new_tokens": cfg.method.generation.max_new_tokens,
        "step_time_s": {m: round(v, 4) for m, v in step.items()},
        "step_time_ratio": {"kd4/kd1_online": round(step["kd4"] / step["kd1_online"], 3)},
        "generate_tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
        "generate_share": round(gen_s / train_s, 4) if train_s else None,
        "mean_sampled_len": round(tokens / rows, 2) if rows else None,
    }
