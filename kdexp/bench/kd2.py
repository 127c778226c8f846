"""The KD2 bench: teacher generation throughput and answer-cache size, per decoding strategy.

It times :func:`kdexp.core.answers.teacher_answers` on exactly the prompts and decoding spec the KD2 runner builds
(``decoding_spec(task, method.decoding, hardware.eval_batch_size)``), cold and then reused. By default the teacher is
the tiny preset with random weights (``teacher.prepare.enabled=false``): it decodes to max_new_tokens, so every
prompt costs the same.

Keys of the JSON object: ``task``, ``prompts``, ``teacher``, ``eval_batch_size`` and, per strategy, a row with
``examples_per_s``, ``seconds``, ``cache_bytes``, ``cache_reuse_s`` (the second, cached call) and, for generative
tasks, ``generated_tokens`` and ``tokens_per_s``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from kdexp.bench.common import config, context, isolated, merged
from kdexp.core.answers import decoding_spec, teacher_answers

STRATEGIES = ("greedy", "beam", "sample")


def bench_kd2(task: str = "squad", prompts: int = 64, strategies=STRATEGIES, overrides=()) -> dict:
    """Per strategy: prompts/s, generated tokens/s, seconds, cache bytes and the time to reuse the cache."""
    base = merged(["method=kd2", f"task={task}", "teacher.prepare.enabled=false", f"task.max_train_samples={prompts}",
                   "method.unlabeled_samples=0"], overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ctx = context(config(isolated(base, work), work / "out"))
        cfg, examples = ctx.cfg, ctx.data.student + ctx.data.unlabeled  # the prompts kd2.run answers
        source = ctx.teacher_info.get("key") or ctx.teacher_info.get("source")
        out = {"task": cfg.task.name, "prompts": len(examples),
               "teacher": f"{cfg.teacher.name} ({'random init' if source == 'random-init' else source})",
               "eval_batch_size": cfg.hardware.eval_batch_size}
        for strategy in strategies:
            cfg.method.decoding.strategy = strategy
            spec = decoding_spec(cfg.task, cfg.method.decoding, cfg.hardware.eval_batch_size)
            start = time.perf_counter()
            _, info = teacher_answers(ctx, examples, spec)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            _, again = teacher_answers(ctx, examples, spec)
            if not again["reused"]:
                raise RuntimeError(f"kd2 bench: the second {strategy} call rebuilt the answers, not reused them")
            row = {"examples_per_s": round(len(examples) / seconds, 2), "seconds": round(seconds, 3),
                   "cache_bytes": info["bytes"], "cache_reuse_s": round(time.perf_counter() - start, 4)}
            if info["generated_tokens"] is not None:
                row["generated_tokens"] = info["generated_tokens"]
                row["tokens_per_s"] = round(info["generated_tokens"] / seconds, 1)
            out[strategy] = row
    return out
