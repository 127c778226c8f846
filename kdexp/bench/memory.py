"""Peak memory of the real command, B0 vs KD1 with a warm cache: ``peak_rss_kd1_run_over_b0_run``.

The point of an offline teacher cache is that training never holds the teacher. This measures it where a user sees
it: ``python -m kdexp method=b0`` and ``python -m kdexp`` (cached KD1), each in a fresh process, unchanged (Hydra
CLI, defaults, teacher evaluation, saving), after one cold KD1 run has built every teacher artefact (answers, logit
cache, the teacher's evaluation) in a fresh cache_dir. Peak RSS is the child's ``ru_maxrss`` as GNU ``time``
reports it (the child is exec'd from ``time``, a small process, so no parent's pages are counted); without
/usr/bin/time, the child's RSS sampled every 10 ms. Threads are pinned (``OMP_NUM_THREADS`` and
``hardware.torch_threads`` = 1).

The teacher is at least 4× the student in parameters (the default tiny pair is ~2.2×: a wider teacher,
``MEMORY_OVERRIDES``), with random weights (``teacher.prepare.enabled=false``): memory does not depend on how good
the teacher is, and nothing is prepared. Keys: ``peak_rss_kd1_run_over_b0_run``; ``peak_rss_run_mb`` (b0,
kd1_warm, and kd1_cold — the run that built the caches and so loaded the teacher); ``peak_rss_run_params``
(teacher, student, ratio); ``peak_rss_run_teacher_loaded`` (per run, from its results.json);
``peak_rss_run_kind`` and ``peak_rss_run_overrides``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kdexp.bench.common import isolated, merged, with_method
from kdexp.core.models import build_model, count_parameters, load_tokenizer
from kdexp.experiments.compose import compose

# A random-init teacher ~4.9x the default student (16.0M vs 3.3M parameters, tied embeddings); the sweep of the kd1
# bench uses it too.
WIDE_TEACHER = ["teacher.prepare.enabled=false", "teacher.arch.hidden_size=256", "teacher.arch.num_heads=4",
                "teacher.arch.intermediate_size=1024"]
# ... and a small real run.
MEMORY_OVERRIDES = [*WIDE_TEACHER, "task.max_train_samples=64", "task.unlabeled_samples=256",
                    "task.max_eval_samples=128", "train.epochs=1"]
GNU_TIME = "/usr/bin/time"
_MARK = "kdexp-maxrss-kb"


def child_env() -> dict:
    """A child's environment: one OpenMP/MKL/BLAS thread (torch threads come from the config), no progress bars."""
    pinned = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**os.environ, **pinned, "TQDM_DISABLE": "1"}


def _sampled_peak_kb(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    return peak // 1024, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_peak_mb(overrides: list[str], run_dir: Path) -> tuple[float, dict]:
    """Peak RSS (MB) of ``python -m kdexp OVERRIDES`` in a fresh process, and its results.json."""
    args = [*overrides, "force=true", f"hydra.run.dir={run_dir.resolve()}"]
    cmd = [sys.executable, "-m", "kdexp", *args]
    if shutil.which(GNU_TIME) or Path(GNU_TIME).exists():
        proc = subprocess.run([GNU_TIME, "-f", f"{_MARK} %M", *cmd], capture_output=True, text=True, env=child_env())
        marks = [line for line in proc.stderr.splitlines() if line.startswith(_MARK)]
        peak_kb = int(marks[-1].split()[1]) if marks else 0
    else:
        peak_kb, proc = _sampled_peak_kb(cmd)
    results = run_dir / "results.json"
    if proc.returncode or not results.exists():
        raise RuntimeError(f"python -m kdexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return peak_kb / 1024, json.loads(results.read_text())


def parameter_counts(overrides: list[str]) -> dict:
    cfg = compose(list(overrides))
    vocab = len(load_tokenizer(cfg.student))
    teacher = count_parameters(build_model(cfg.teacher, vocab, seed=0, hw_cfg=cfg.hardware))[0]
    student = count_parameters(build_model(cfg.student, vocab, seed=0, hw_cfg=cfg.hardware))[0]
    return {"teacher": teacher, "student": student, "teacher_over_student": teacher / student}


def bench_run_memory(overrides, work: Path) -> dict:
    """KD1 once cold (builds the caches), then B0 and KD1 warm, each in a fresh process; see the module doc."""
    # Threads pinned last: a bench's own thread count (kd1: 2) would let a machine's load decide the comparison.
    overrides = isolated([*merged(MEMORY_OVERRIDES, overrides), "hardware.torch_threads=1"], Path(work) / "run_memory")
    kd1 = with_method(overrides, "kd1", "method.teacher_signal=cached")
    b0 = with_method(overrides, "b0")
    peaks, loaded = {}, {}
    for name, args in (("kd1_cold", kd1), ("b0", b0), ("kd1_warm", kd1)):
        peaks[name], results = run_peak_mb(args, Path(work) / "run_memory" / name)
        loaded[name] = (results.get("teacher_info") or {}).get("loaded", True)
        peaks[name] = round(peaks[name], 1)
    return {"peak_rss_kd1_run_over_b0_run": peaks["kd1_warm"] / peaks["b0"], "peak_rss_run_mb": peaks,
            "peak_rss_run_params": parameter_counts(kd1), "peak_rss_run_teacher_loaded": loaded,
            "peak_rss_run_kind": "gnu_time_maxrss" if Path(GNU_TIME).exists() else "sampled_rss",
            "peak_rss_run_overrides": overrides}
