"""Benchmarks that print one JSON object: ``python -m kdexp.bench kd1|kd2|kd3 [--steps N] [--sweep]``.

Timings on a shared 2-core CPU are noisy, so every figure that matters is a ratio measured inside one process with
interleaved repetitions (b0, kd1-cached, kd1-online, b0, ...) and torch threads pinned. Peak RSS is measured in a
fresh child process per method, so one method's peak cannot hide another's. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_OVERRIDES = ["method=kd1", "hardware.torch_threads=2"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from kdexp.main import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=BENCH_OVERRIDES + overrides)


def _context(overrides: list[str], out_dir: Path, need_teacher: bool = True):
    """The default experiment's data, prepared (trained) teacher and KD features: what the bench measures on."""
    from kdexp.distill import kd_features
    from kdexp.runners import setup

    cfg = _compose(overrides)
    cfg.output_dir = str(out_dir)
    torch.set_num_threads(cfg.hardware.torch_threads)
    ctx = setup(cfg, out_dir, need_teacher=need_teacher)
    return cfg, ctx, kd_features(ctx)


def _trainer(cfg, ctx, student, cache, variant: str):
    from kdexp.distill import DistillationTrainer, cached_collator
    from kdexp.losses import resolve_divergence
    from kdexp.models import collate
    from kdexp.training import FeatureDataset, training_args

    pad = ctx.tokenizer.pad_token_id
    alpha = 0.0 if variant == "b0" else cfg.method.alpha
    collator = cached_collator(cache, pad) if variant == "kd1_cached" else (lambda fs: collate(fs, pad))
    trainer = DistillationTrainer(
        model=student, args=training_args(cfg, ctx.out_dir / variant), train_dataset=FeatureDataset([]),
        data_collator=collator, alpha=alpha, temperature=cfg.method.temperature,
        divergence=resolve_divergence(cfg.method.divergence), teacher=ctx.teacher, vocab_size=len(ctx.tokenizer))
    return trainer, collator


def step_times(cfg, ctx, feats, cache, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step (collate + forward + backward + AdamW) for B0, KD1 cached, KD1 online."""
    from kdexp.runners import build_student

    variants = ("b0", "kd1_cached", "kd1_online")
    setups = {}
    for v in variants:
        student = build_student(ctx).train()
        trainer, collator = _trainer(cfg, ctx, student, cache, v)
        setups[v] = (student, trainer, collator, torch.optim.AdamW(student.parameters(), lr=1e-3))
    bs = cfg.train.batch_size
    times = {v: [] for v in variants}
    for i in range(steps + 2):
        chunk = feats[(i * bs) % (len(feats) - bs):][:bs]
        for v in variants:  # interleaved, so load changes on the shared machine hit every variant alike
            student, trainer, collator, opt = setups[v]
            start = time.perf_counter()
            batch = collator(chunk)
            trainer._ce_count = int(batch["labels"].ne(-100).sum())
            trainer._kd_count = int(batch["answer_mask"].sum())
            trainer.compute_loss(student, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:  # warm-up steps excluded
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def cache_figures(cfg, ctx, feats, tmp: Path) -> tuple[dict, object]:
    from kdexp.cache import collate_cache_rows, load_or_build_teacher_cache
    from kdexp.distill import teacher_rows

    tokens = sum(len(f.answer_ids) for f in feats)
    path = tmp / "bench_cache.h5"
    start = time.perf_counter()
    cache = load_or_build_teacher_cache(
        path, lambda: teacher_rows(ctx.teacher, feats, ctx.tokenizer.pad_token_id, cfg.hardware.eval_batch_size),
        n_examples=len(feats), vocab_size=len(ctx.tokenizer), top_k=cfg.method.top_k,
        compression=cfg.method.cache_compression, meta={"bench": True})
    build_s = time.perf_counter() - start
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for lo in range(0, len(order), cfg.train.batch_size):
        collate_cache_rows([cache[i] for i in order[lo:lo + cfg.train.batch_size]], window=cfg.task.max_answer_tokens)
    read_s = time.perf_counter() - start
    return {"cache_bytes_per_token": path.stat().st_size / tokens, "cache_tokens": tokens,
            "cache_build_tokens_per_s": tokens / build_s, "cache_read_tokens_per_s": tokens / read_s,
            "cache_top_k": cfg.method.top_k, "cache_compression": cfg.method.cache_compression}, cache


@torch.no_grad()
def loss_error(cfg, ctx, feats, n: int = 512) -> dict:
    """|cached − full-vocabulary| forward KL on the trained teacher, for an untrained and a B0-like student."""
    from kdexp.cache import cached_forward_kl_error_report
    from kdexp.models import answer_logits, collate
    from kdexp.runners import build_student

    batch = collate(feats[:n], ctx.tokenizer.pad_token_id)
    mask = batch["answer_mask"]
    teacher = answer_logits(ctx.teacher, batch)[0][mask]
    student = answer_logits(build_student(ctx).eval(), batch)[0][mask]
    # A student that already imitates the teacher (teacher logits plus noise) has a tail correlated with the
    # teacher's: the regime where the uniform-tail cross term errs most.
    imitating = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(0))
    return {
        "kd_loss_abs_error": cached_forward_kl_error_report(teacher, student, top_k=cfg.method.top_k),
        "kd_loss_abs_error_imitating_student": cached_forward_kl_error_report(teacher, imitating,
                                                                              top_k=cfg.method.top_k),
        "teacher_top_k_mass": {f"{t:g}": float(torch.softmax(teacher / t, -1).topk(cfg.method.top_k).values.sum(-1)
                                               .mean()) for t in (1, 2, 4)},
        "loss_error_tokens": int(mask.sum()),
    }


def peak_rss_child(variant: str, steps: int, overrides: list[str], cache_path: Path) -> dict:
    """Run ``steps`` training steps of one variant in a fresh process; return its memory figures in MB.

    Steady state of a sweep job: B0 and cached KD1 never load the teacher (the cache and the transfer-set answers
    exist already); online KD1 holds it. ``train_peak_mb`` is the RSS peak sampled during the steps alone, so the
    start-up peak (imports, data loading) that every variant shares does not hide the difference.
    """
    code = "import sys; from kdexp.bench import _rss_main; _rss_main(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, variant, str(steps), json.dumps(overrides), str(cache_path)],
                         check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_main(variant: str, steps: str, overrides: str, cache_path: str) -> None:
    import psutil

    from kdexp.cache import open_teacher_cache
    from kdexp.evaluate import peak_memory

    with tempfile.TemporaryDirectory() as tmp:
        cfg, ctx, feats = _context(json.loads(overrides), Path(tmp), need_teacher=variant == "kd1_online")
        cache = open_teacher_cache(cache_path) if variant == "kd1_cached" else None
        baseline = psutil.Process().memory_info().rss / 2**20
        with peak_memory("cpu") as mem:
            step_only(cfg, ctx, feats, cache, variant, int(steps))
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak on Linux.
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"train_peak_mb": mem["peak_memory_mb"], "before_train_mb": baseline,
                      "process_peak_mb": hwm / 1024}))


def step_only(cfg, ctx, feats, cache, variant, steps):
    from kdexp.runners import build_student

    student = build_student(ctx).train()
    trainer, collator = _trainer(cfg, ctx, student, cache, variant)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    bs = cfg.train.batch_size
    for i in range(steps):
        batch = collator(feats[i * bs:(i + 1) * bs])
        trainer._ce_count, trainer._kd_count = int(batch["labels"].ne(-100).sum()), int(batch["answer_mask"].sum())
        trainer.compute_loss(student, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def sweep_ratio(overrides: list[str], tmp: Path) -> dict:
    """Wall time of a 12-run KD1 sweep (2 T × 2 alpha × 3 seeds), cached vs online, each from a cold cache."""
    from kdexp.main import run

    timings = {}
    for signal in ("cached", "online"):
        start = time.perf_counter()
        for t in (1, 2):
            for a in (0.5, 0.9):
                for seed in (1, 2, 3):
                    cfg = _compose(overrides + [f"method.teacher_signal={signal}", f"method.temperature={t}",
                                                f"method.alpha={a}", f"seed={seed}", "eval_teacher=false",
                                                "save_student=false", f"cache_dir={tmp / signal}"])
                    cfg.output_dir = str(tmp / signal / f"T{t}_a{a}_s{seed}")
                    # The prepared teacher is shared, so both sweeps start from the same trained teacher.
                    os.makedirs(tmp / signal, exist_ok=True)
                    teachers = Path(_compose(overrides).cache_dir).resolve() / "teachers"
                    if not (tmp / signal / "teachers").exists():
                        os.symlink(teachers, tmp / signal / "teachers")
                    run(cfg)
        timings[signal] = time.perf_counter() - start
    return {"sweep_cached_s": timings["cached"], "sweep_online_s": timings["online"],
            "sweep_online_over_cached": timings["online"] / timings["cached"], "sweep_overrides": overrides}


def bench_kd1(args) -> dict:
    overrides = list(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, ctx, feats = _context(overrides, tmp)
        result = {"vocab_size": len(ctx.tokenizer), "torch_threads": torch.get_num_threads(),
                  "teacher": ctx.teacher_info.get("key"), "train_examples": len(feats)}
        figures, cache = cache_figures(cfg, ctx, feats, tmp)
        result.update(figures)
        result.update(loss_error(cfg, ctx, feats))
        steps = step_times(cfg, ctx, feats, cache, args.steps)
        result.update({"step_s": steps, "kd1_cached_over_b0_step": steps["kd1_cached"] / steps["b0"],
                       "kd1_online_over_b0_step": steps["kd1_online"] / steps["b0"]})
        rss = {v: peak_rss_child(v, args.rss_steps, overrides, tmp / "bench_cache.h5")
               for v in ("b0", "kd1_cached", "kd1_online")}
        result.update({"peak_rss_mb": rss,
                       "peak_rss_kd1_over_b0": rss["kd1_cached"]["train_peak_mb"] / rss["b0"]["train_peak_mb"],
                       "peak_rss_kd1_online_over_b0": rss["kd1_online"]["train_peak_mb"] / rss["b0"]["train_peak_mb"]})
        if args.sweep:
            result.update(sweep_ratio(overrides + args.sweep_overrides, tmp))
    result["load_average_1m"] = os.getloadavg()[0]
    result["self_cpu_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdexp.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["kd1", "kd2", "kd3"])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant")
    parser.add_argument("--rss-steps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time a 12-run cached vs online KD1 sweep")
    parser.add_argument("--sweep-overrides", nargs="*", default=[
        "task.max_train_samples=200", "method.unlabeled_samples=800", "train.epochs=1"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the benchmarked config")
    args = parser.parse_intermixed_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs: keep stdout one JSON object
        result = _bench(args)
    print(json.dumps(result, indent=2))


def _bench(args) -> dict:
    if args.what == "kd1":
        result = bench_kd1(args)
    else:  # generation throughput / feature-KD step time and memory: kdexp/bench_kd23.py
        from kdexp import bench_kd23

        result = (bench_kd23.bench_kd2(overrides=tuple(args.overrides)) if args.what == "kd2"
                  else bench_kd23.bench_kd3(steps=args.steps, overrides=tuple(args.overrides)))
    return result


if __name__ == "__main__":
    main()
