"""The KD1 bench: teacher-cache cost and fidelity, step time and peak memory of B0 vs cached vs online KD1.

Every figure comes from the path a user's command takes: the cache is built by the KD1 runner's ``ensure_cache`` and
read through its ``cached_collator``; step times are measured on ``kdexp.main.run`` in this process (a ratio of
medians, variants interleaved), peak memory on ``python -m kdexp`` in a fresh process per variant. Prepared teachers
are shared with the configured cache_dir; everything else (teacher cache, answers, registry) is built fresh.

Keys of the JSON object: ``vocab_size``, ``torch_threads``, ``teacher`` (prepared-teacher key), ``train_examples``;
the cache's ``cache_bytes_per_token``, ``cache_tokens``, ``cache_build_tokens_per_s``, ``cache_read_tokens_per_s``,
``cache_top_k``, ``cache_compression``; ``kd_loss_abs_error`` and ``kd_loss_abs_error_imitating_student`` (per
temperature, |cached − full| forward KL), ``teacher_top_k_mass``, ``loss_error_tokens``; per cache mode (head_uniform,
head_sampled, sampled at one id budget, ``method.top_k``), student ("untrained", "imitating") and T ("1", "2", "4"):
``kd_loss_abs_error_by_mode`` (mean per-token |cached − full|), ``kd_loss_mean_error_by_mode`` (mean cached − mean
full: the bias left after averaging over tokens) and ``kd_grad_cosine_by_mode`` (gradients w.r.t. the student's
logits), with ``cache_mode_layouts`` (mode -> [top_k, samples]); ``cache_bytes_per_token_by_mode`` (mode -> K ("64",
"128") -> stored bytes per token at that id budget); ``step_s`` (median seconds
per optimizer step of b0, kd1_cached, kd1_online) with ``kd1_cached_over_b0_step`` and ``kd1_online_over_b0_step``;
``peak_rss_mb`` (per variant: ``before_train_mb``, ``train_peak_mb``, ``setup_peak_mb``, ``process_peak_mb``) with
``peak_rss_kd1_over_b0`` and ``peak_rss_kd1_online_over_b0`` (ratios of train_peak_mb); the whole real command's
peak, B0 vs KD1 with a warm cache and a teacher >= 4x the student, ``peak_rss_kd1_run_over_b0_run`` and its
``peak_rss_run_*`` details (kdexp/bench/memory.py); the default B0 command's per-run fixed costs,
``b0_fixed_overhead_frac`` and ``b0_fixed_overhead_incl_eval_frac`` with ``b0_overhead_*`` details
(kdexp/bench/overhead.py); unless ``sweep`` is false, a 12-job ``python -m kdexp -m`` KD1 sweep per teacher signal
with a teacher >= 4x the student: ``sweep_cached_s``, ``sweep_online_s``, ``sweep_online_over_cached``,
``sweep_jobs``, ``sweep_phase_s``, ``sweep_params``, ``sweep_overrides`` (kdexp/bench/sweep.py); and
``load_average_1m``, ``self_cpu_s`` to judge how loaded the machine was (``load_average_1m`` also before and after
each of the overhead and sweep parts: ``load_average_1m_by_part``).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from kdexp.bench.common import config, context, isolated, merged, peak_rss, time_methods, with_method
from kdexp.bench.memory import bench_run_memory
from kdexp.bench.overhead import bench_overhead
from kdexp.bench.sweep import GRID, bench_sweep
from kdexp.core.cache_fidelity import (
    MODES,
    bytes_per_token_by_mode,
    cached_forward_kl_error_report,
    mode_layout,
    sparse_target_report,
)
from kdexp.core.models import answer_logits, collate
from kdexp.core.runner import build_student
from kdexp.methods.kd1 import cached_collator, ensure_cache, kd_features

BENCH_OVERRIDES = ["method=kd1", "hardware.torch_threads=2"]
SWEEP_OVERRIDES = ["task.max_train_samples=200", "method.unlabeled_samples=800", "train.epochs=1"]
VARIANTS = {"b0": ("b0",), "kd1_cached": ("kd1", "method.teacher_signal=cached"),
            "kd1_online": ("kd1", "method.teacher_signal=online")}


def cache_figures(ctx, feats) -> dict:
    """Build the teacher cache as a KD1 run does (cold), then read it back in random-order training batches."""
    cfg = ctx.cfg
    if cfg.method.cache_path:
        raise ValueError("the kd1 bench measures building the teacher cache: leave method.cache_path unset")
    cache = ensure_cache(ctx, feats)
    info = ctx.extra["teacher_cache"]
    tokens, bs = info["tokens"], cfg.train.batch_size
    collator = cached_collator(cache, ctx.tokenizer.pad_token_id)
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for lo in range(0, len(order), bs):
        collator([feats[i] for i in order[lo:lo + bs]])
    read_s = time.perf_counter() - start
    return {"cache_bytes_per_token": info["bytes"] / tokens, "cache_tokens": tokens,
            "cache_build_tokens_per_s": tokens / ctx.timings["teacher_cache_s"],
            "cache_read_tokens_per_s": tokens / read_s, "cache_top_k": cfg.method.top_k,
            "cache_compression": cfg.method.cache_compression}


@torch.no_grad()
def loss_error(ctx, feats, n: int = 512) -> dict:
    """|cached − full-vocabulary| forward KL on the prepared teacher, for an untrained and an imitating student."""
    top_k = ctx.cfg.method.top_k
    batch = collate(feats[:n], ctx.tokenizer.pad_token_id)
    mask = batch["answer_mask"]
    teacher = answer_logits(ctx.teacher, batch)[0][mask]
    student = answer_logits(build_student(ctx).eval(), batch)[0][mask]
    # A student that already imitates the teacher (teacher logits plus noise) has a tail correlated with the
    # teacher's: the regime where the uniform-tail cross term errs most.
    imitating = teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(0))
    return {
        "kd_loss_abs_error": cached_forward_kl_error_report(teacher, student, top_k=top_k),
        "kd_loss_abs_error_imitating_student": cached_forward_kl_error_report(teacher, imitating, top_k=top_k),
        "teacher_top_k_mass": {f"{t:g}": float(torch.softmax(teacher / t, -1).topk(top_k).values.sum(-1).mean())
                               for t in (1, 2, 4)},
        "loss_error_tokens": int(mask.sum()),
        **mode_figures(ctx.cfg.method, teacher, {"untrained": student, "imitating": imitating}),
    }


def mode_figures(m, teacher, students: dict) -> dict:
    """The cache modes compared at one id budget (``method.top_k`` ids per token) on the same teacher logits, with
    the run's sampling knobs; then stored bytes per token at 64 and 128 ids."""
    layouts = {mode: mode_layout(mode, m.top_k) for mode in MODES}
    keys = {"abs_error": "kd_loss_abs_error_by_mode", "mean_error": "kd_loss_mean_error_by_mode",
            "grad_cosine": "kd_grad_cosine_by_mode"}
    by_mode = {key: {} for key in keys.values()}
    for mode, (top_k, samples) in layouts.items():
        for name, student in students.items():
            report = sparse_target_report(teacher, student, top_k=top_k, samples=samples, seed=m.cache_seed,
                                          sample_temperature=m.cache_sample_temperature)
            for figure, key in keys.items():
                by_mode[key].setdefault(mode, {})[name] = {t: figures[figure] for t, figures in report.items()}
    compression = None if m.cache_compression == "none" else m.cache_compression
    sizes = bytes_per_token_by_mode(teacher, compression=compression, sample_temperature=m.cache_sample_temperature,
                                    seed=m.cache_seed)
    return {**by_mode, "cache_mode_layouts": {mode: list(lay) for mode, lay in layouts.items()},
            "cache_bytes_per_token_by_mode": sizes}


def cache_and_loss(overrides: list[str], work: Path) -> dict:
    """Setup as the KD1 runner does (prepares the teacher once), then the cache and loss-error figures."""
    ctx = context(config(overrides, work / "setup"))
    feats = kd_features(ctx)
    return {"vocab_size": len(ctx.tokenizer), "torch_threads": torch.get_num_threads(),
            "teacher": ctx.teacher_info.get("key"), "train_examples": len(feats),
            **cache_figures(ctx, feats), **loss_error(ctx, feats)}


def with_load(part: str, loads: dict, figures) -> dict:
    """Run ``figures()`` and note the 1-minute load average before and after it in ``loads[part]``."""
    before = os.getloadavg()[0]
    out = figures()
    loads[part] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return out


def bench_kd1(overrides=(), *, steps: int = 10, warmup: int = 2, rounds: int = 3, rss_steps: int = 20,
              sweep: bool = True, sweep_overrides=tuple(SWEEP_OVERRIDES), sweep_grid=tuple(GRID),
              overhead_rounds: int = 2) -> dict:
    """Every KD1 figure (see ``python -m kdexp.bench --help``); ``overrides`` replace or add to
    :data:`BENCH_OVERRIDES`."""
    overrides = merged(BENCH_OVERRIDES, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = isolated(overrides, work)
        result = cache_and_loss(base, work)
        variants = {name: with_method(base, *spec) for name, spec in VARIANTS.items()}
        step = time_methods(variants, work, steps=steps, warmup=warmup, rounds=rounds)
        result.update({"step_s": step, "kd1_cached_over_b0_step": step["kd1_cached"] / step["b0"],
                       "kd1_online_over_b0_step": step["kd1_online"] / step["b0"]})
        rss = {name: peak_rss(v, rss_steps, work / "rss" / name) for name, v in variants.items()}
        b0_peak = rss["b0"]["train_peak_mb"]
        result.update({"peak_rss_mb": rss, "peak_rss_kd1_over_b0": rss["kd1_cached"]["train_peak_mb"] / b0_peak,
                       "peak_rss_kd1_online_over_b0": rss["kd1_online"]["train_peak_mb"] / b0_peak})
        result.update(bench_run_memory(overrides, work))  # the real commands' peaks (kdexp/bench/memory.py)
        loads: dict = {}
        result.update(with_load("overhead", loads, lambda: bench_overhead(overrides, work, rounds=overhead_rounds)))
        if sweep:
            result.update(with_load("sweep", loads, lambda: bench_sweep(merged(overrides, sweep_overrides), work,
                                                                        grid=list(sweep_grid))))
        result["load_average_1m_by_part"] = loads
    result["load_average_1m"] = os.getloadavg()[0]
    result["self_cpu_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    return result
