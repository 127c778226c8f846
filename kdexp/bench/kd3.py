"""The KD3 bench: step time and peak memory of B0, KD1 (cached and online teacher) and KD3, as ratios to KD3.

Step times are measured on ``kdexp.main.run`` in this process (methods interleaved over rounds, median after
warm-up), so machine load is shared; peak RSS on ``python -m kdexp`` in a fresh process per method (VmHWM), so one
method's peak cannot hide another's. SQuAD by default: long prompts, where hidden states cost the most.

Keys of the JSON object: ``task``, ``batch_size``, ``steps_timed`` (per method), ``student`` and ``teacher``
(layers x hidden size); ``step_time_s`` and ``step_time_ratio`` (``kd3/<method>``); ``peak_rss_mb`` (per method the
VmHWM at the end of training, and ``setup``: the smallest VmHWM any method had reached when its training began),
``peak_rss_kind``, ``setup_rss_mb`` (per method, that VmHWM as training began), ``peak_rss_ratio``
(``kd3/<method>``) and ``train_rss_increment_mb`` (per method, what training added to its own process's peak).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kdexp.bench.common import config, isolated, merged, peak_rss, time_methods, with_method

METHODS = ("b0", "kd1", "kd1_online", "kd3")
VARIANTS = {"b0": ("b0",), "kd1": ("kd1", "method.teacher_signal=cached"),
            "kd1_online": ("kd1", "method.teacher_signal=online"), "kd3": ("kd3",)}
# No transfer set (teacher generation stays out) and small eval sets: evaluation runs after training, unmeasured.
BENCH_OVERRIDES = ["task=squad", "teacher.prepare.enabled=false", "task.max_train_samples=256",
                   "task.unlabeled_samples=0", "task.max_eval_samples=32", "task.validation_samples=32",
                   "train.batch_size=16", "method=kd1"]


def _arch(model_cfg) -> str:
    return f"{model_cfg.arch.num_layers}x{model_cfg.arch.hidden_size}"


def bench_kd3(steps: int = 8, warmup: int = 2, rounds: int = 3, overrides=()) -> dict:
    """Step time per method (``steps`` timed per round) and peak RSS per method (``steps`` trained)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = isolated(merged(BENCH_OVERRIDES, overrides), work)
        cfg = config(base, work / "out")
        variants = {m: with_method(base, *VARIANTS[m]) for m in METHODS}
        step = time_methods(variants, work, steps=steps, warmup=warmup, rounds=rounds)
        # The KD1 teacher cache exists by now, so no process below pays for building it.
        memory = {m: peak_rss(variants[m], steps, work / "rss" / m) for m in METHODS}
    peaks = {m: memory[m]["process_peak_mb"] for m in METHODS}
    setup = {m: memory[m]["setup_peak_mb"] for m in METHODS}
    return {
        "task": cfg.task.name, "batch_size": cfg.train.batch_size, "steps_timed": steps * rounds,
        "student": _arch(cfg.student), "teacher": _arch(cfg.teacher),
        "step_time_s": {m: round(v, 4) for m, v in step.items()},
        "step_time_ratio": {f"kd3/{m}": round(step["kd3"] / step[m], 3) for m in METHODS if m != "kd3"},
        "peak_rss_mb": {"setup": min(setup.values()), **peaks},
        "peak_rss_kind": "VmHWM of a fresh `python -m kdexp` process per method, at the end of training",
        "setup_rss_mb": setup,
        "peak_rss_ratio": {f"kd3/{m}": round(peaks["kd3"] / peaks[m], 3) for m in METHODS if m != "kd3"},
        "train_rss_increment_mb": {m: round(peaks[m] - setup[m], 1) for m in METHODS},
    }
