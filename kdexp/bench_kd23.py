"""Benchmarks for KD2 and KD3 on the tiny pair; ``python -m kdexp.bench_kd23`` prints one JSON object.

- ``bench_kd2``: teacher generation throughput (prompts/s, generated tokens/s) per decoding strategy, and the size of
  the generation cache; the teacher is the tiny preset with random weights (it decodes to max_new_tokens, so every
  prompt costs the same).
- ``bench_kd3``: training step time of B0, KD1 (cached and online teacher) and KD3, all measured in this process so
  machine load is shared, reported as ratios to KD3; and peak RSS of each method's training, each in a fresh
  subprocess (``ru_maxrss`` of that process), so one method's peak cannot hide another's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

METHODS = ("b0", "kd1", "kd1_online", "kd3")


def compose(overrides: list[str], work: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdexp.main import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*overrides, f"cache_dir={work / 'cache'}"])
    cfg.output_dir = str(work / "out")
    return cfg


def _context(cfg, work: Path):
    from kdexp.runners import setup

    return setup(cfg, work / "out", need_teacher=True)


# ---- KD2 -----------------------------------------------------------------------------------------------------------

def bench_kd2(task: str = "squad", prompts: int = 64, strategies=("greedy", "beam", "sample"),
              overrides: tuple = ()) -> dict:
    """Generation throughput and cache size of the KD2 teacher answers, per decoding strategy."""
    from kdexp.kd2 import teacher_answers

    out = {"task": task, "prompts": prompts, "teacher": "tiny (random init)"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = ["method=kd2", f"task={task}", "teacher.prepare.enabled=false", f"task.max_train_samples={prompts}",
                "method.unlabeled_samples=0", *overrides]
        ctx = _context(compose(base, work), work)
        examples = ctx.data.student
        out["eval_batch_size"] = ctx.cfg.hardware.eval_batch_size
        for strategy in strategies:
            ctx.cfg.method.decoding.strategy = strategy
            start = time.perf_counter()
            _, info = teacher_answers(ctx, examples)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            _, again = teacher_answers(ctx, examples)
            row = {"examples_per_s": round(len(examples) / seconds, 2), "seconds": round(seconds, 3),
                   "cache_bytes": info["bytes"], "cache_reuse_s": round(time.perf_counter() - start, 4)}
            if info["generated_tokens"] is not None:
                row["generated_tokens"] = info["generated_tokens"]
                row["tokens_per_s"] = round(info["generated_tokens"] / seconds, 1)
            assert again["reused"], "the second call must read the cache"
            out[strategy] = row
    return out


# ---- KD3 -----------------------------------------------------------------------------------------------------------

class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from step begin to step end."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _trainer(method: str, ctx, steps: int, timer: StepTimer):
    """The Trainer the method's runner would build (same features, collator, loss), limited to ``steps`` steps."""
    from kdexp import distill, kd3
    from kdexp.losses import resolve_divergence
    from kdexp.models import collate, encode
    from kdexp.runners import build_student
    from kdexp.training import AnswerTrainer, FeatureDataset, training_args

    cfg, m, pad = ctx.cfg, ctx.cfg.method, ctx.tokenizer.pad_token_id
    args = training_args(cfg, Path(cfg.output_dir) / method)
    args.max_steps, args.logging_steps, args.disable_tqdm = steps, 10**6, True
    student = build_student(ctx)
    kd = {"teacher": ctx.teacher, "vocab_size": len(ctx.tokenizer), "temperature": m.temperature,
          "divergence": resolve_divergence(m.divergence), "chunk_size": m.chunk_size}
    collator, projections = (lambda fs: collate(fs, pad)), None
    if method == "b0":
        feats, cls, kwargs = encode(ctx.data.student, ctx.tokenizer, cfg.task), AnswerTrainer, {}
    elif method.startswith("kd1"):
        feats, cls, kwargs = distill.kd_features(ctx), distill.DistillationTrainer, {**kd, "alpha": m.alpha}
        if method == "kd1":
            collator, kwargs["teacher"] = distill.cached_collator(distill.ensure_cache(ctx, feats), pad), None
    else:
        feats, cls = distill.kd_features(ctx), kd3.FeatureDistillationTrainer
        pairs = kd3.auto_layer_map(student.config.num_hidden_layers, ctx.teacher.config.num_hidden_layers)
        projections = kd3.build_projections(pairs, student.config.hidden_size, ctx.teacher.config.hidden_size,
                                            cfg.seed)
        kwargs = {**kd, "w_ce": 0.5, "w_kl": 0.5, "w_feat": 1.0, "pairs": pairs, "projections": projections,
                  "feature_loss": "mse", "feature_tokens": "all", "feature_norm": "none"}
    trainer = cls(model=student, args=args, train_dataset=FeatureDataset(feats), data_collator=collator,
                  callbacks=[timer], **kwargs)
    return trainer, student, projections


def time_steps(method: str, ctx, steps: int) -> list[float]:
    from kdexp.kd3 import attached

    timer = StepTimer()
    trainer, student, projections = _trainer(method, ctx, steps, timer)
    with attached(student, projections):
        trainer.train()
    return timer.times


def _bench_overrides(overrides: tuple) -> list[str]:
    # SQuAD: long prompts, where hidden states cost the most; unlabeled_samples=0 keeps teacher generation out.
    return ["task=squad", "teacher.prepare.enabled=false", "task.max_train_samples=256", "method.unlabeled_samples=0",
            "train.batch_size=16", "method=kd1", *overrides]


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux keeps ru_maxrss across fork + exec (a child would report its parent's peak),
    so read the address space's own high-water mark, VmHWM, where /proc has it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def rss_worker(method: str, steps: int, overrides: list[str], work: Path) -> dict:
    """Body of one subprocess: set up, train ``steps`` steps of ``method`` ("setup": none), report peak RSS."""
    ctx = _context(compose(overrides, work), work)
    before = peak_rss_mb()
    if method != "setup":
        time_steps(method, ctx, steps)
    return {"method": method, "setup_rss_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def bench_kd3(steps: int = 8, warmup: int = 2, rounds: int = 3, overrides: tuple = ()) -> dict:
    """Step time (one process; methods interleaved over ``rounds``; median after warm-up) and peak RSS (one
    subprocess per method)."""
    overrides = _bench_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ctx = _context(compose(overrides, work), work)
        times = {m: [] for m in METHODS}
        for _ in range(rounds):  # interleaved, so a burst of load on the shared machine hits every method
            for m in METHODS:
                times[m] += time_steps(m, ctx, warmup + steps)[warmup:]  # the first kd1 round builds its cache
        step = {m: statistics.median(t) for m, t in times.items()}
        peaks = {}
        for method in ("setup", *METHODS):  # the KD1 cache already exists, so no worker pays for building it
            cmd = [sys.executable, "-m", "kdexp.bench_kd23", "--rss-worker", method, "--steps", str(steps),
                   "--work", str(work), "--overrides", json.dumps(overrides)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[method] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    cfg = ctx.cfg
    return {
        "task": cfg.task.name, "batch_size": cfg.train.batch_size, "steps_timed": steps * rounds,
        "student": f"{cfg.student.arch.num_layers}x{cfg.student.arch.hidden_size}",
        "teacher": f"{cfg.teacher.arch.num_layers}x{cfg.teacher.arch.hidden_size}",
        "step_time_s": {m: round(v, 4) for m, v in step.items()},
        "step_time_ratio": {f"kd3/{m}": round(step["kd3"] / step[m], 3) for m in METHODS if m != "kd3"},
        "peak_rss_mb": peaks, "peak_rss_kind": "VmHWM of a fresh process per method",
        "peak_rss_ratio": {f"kd3/{m}": round(peaks["kd3"] / peaks[m], 3) for m in METHODS if m != "kd3"},
        "train_rss_increment_mb": {m: round(peaks[m] - peaks["setup"], 1) for m in METHODS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rss-worker", choices=("setup", *METHODS))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--overrides", default="[]", help="JSON list of Hydra overrides")
    args = parser.parse_args(argv)
    # Trainer prints its summary to stdout: keep stdout for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        if args.rss_worker:
            result = rss_worker(args.rss_worker, args.steps, json.loads(args.overrides), args.work)
        else:
            extra = tuple(json.loads(args.overrides))
            result = {"kd2": bench_kd2(prompts=args.prompts, overrides=extra),
                      "kd3": bench_kd3(steps=args.steps, overrides=extra)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
