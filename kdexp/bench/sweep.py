"""What a KD1 sweep costs, cached vs online teacher: ``sweep_online_over_cached`` (part of the default kd1 bench).

One ``python -m kdexp -m`` process per teacher signal runs the 12-job grid (``method.temperature`` 1,2 ×
``method.alpha`` 0.5,0.9 × ``seed`` 1,2,3) exactly as a user's sweep does (Hydra's basic launcher, every job's
evaluation, teacher evaluation and saving), each from a cold cache_dir (prepared teachers excepted, see
:func:`kdexp.bench.common.isolated`), torch and OpenMP pinned to one thread. The teacher is random-init and at least
4× the student in parameters (:data:`kdexp.bench.memory.WIDE_TEACHER`: 4.88× on the default student); a
``--sweep-overrides`` that widens it further is reported through ``sweep_params``.

Keys: ``sweep_cached_s``, ``sweep_online_s`` (each process's wall time, start to exit), ``sweep_online_over_cached``;
``sweep_cached_cpu_s``, ``sweep_online_cpu_s``, ``sweep_online_over_cached_cpu`` (the same from each process's CPU
seconds, user + system: on a machine shared with jobs that take most of the cores, a process's share of them
changes by the minute and its wall time with it, its CPU time much less);
``sweep_jobs`` (completed jobs per signal), ``sweep_phase_s`` (per signal, each ``timings_s`` key summed over its
jobs: where the time went), ``sweep_params`` (teacher, student, ``teacher_over_student``), ``sweep_overrides``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from kdexp.bench.common import isolated, merged, with_method
from kdexp.bench.memory import WIDE_TEACHER, child_env, parameter_counts

GRID = ["method.temperature=1,2", "method.alpha=0.5,0.9", "seed=1,2,3"]


def summed_timings(results: list[dict]) -> dict:
    """Each ``timings_s`` key summed over the jobs' results (a key a job lacks counts 0 there)."""
    total: dict[str, float] = {}
    for r in results:
        for key, value in (r.get("timings_s") or {}).items():
            total[key] = round(total.get(key, 0.0) + value, 2)
    return total


def child_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sweep(overrides: list[str], sweep_dir: Path) -> tuple[float, float, list[dict]]:
    """Wall and CPU seconds of ``python -m kdexp -m OVERRIDES`` in a fresh process, and its jobs' results.json."""
    args = [*overrides, f"hydra.sweep.dir={sweep_dir.resolve()}"]
    start, cpu = time.perf_counter(), child_cpu_s()
    proc = subprocess.run([sys.executable, "-m", "kdexp", "-m", *args], capture_output=True, text=True,
                          env=child_env())
    wall, cpu = time.perf_counter() - start, child_cpu_s() - cpu
    if proc.returncode:
        raise RuntimeError(f"python -m kdexp -m {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, cpu, [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]


def bench_sweep(overrides: list[str], work: Path, grid: list[str] = tuple(GRID)) -> dict:
    """The sweep once per teacher signal; ``overrides``: the bench's and the sweep's (WIDE_TEACHER goes first)."""
    base = merged(merged(WIDE_TEACHER, overrides), ["hardware.torch_threads=1"])
    walls, cpus, jobs, phases = {}, {}, {}, {}
    for signal in ("cached", "online"):
        args = isolated(with_method(base, "kd1", f"method.teacher_signal={signal}"), Path(work) / f"sweep_{signal}")
        sweep_dir = Path(work) / f"sweep_{signal}" / "multirun"
        walls[signal], cpus[signal], results = run_sweep(merged(args, grid), sweep_dir)
        jobs[signal], phases[signal] = len(results), summed_timings(results)
    return {"sweep_cached_s": walls["cached"], "sweep_online_s": walls["online"],
            "sweep_online_over_cached": walls["online"] / walls["cached"], "sweep_cached_cpu_s": cpus["cached"],
            "sweep_online_cpu_s": cpus["online"], "sweep_online_over_cached_cpu": cpus["online"] / cpus["cached"],
            "sweep_jobs": jobs,
            "sweep_phase_s": phases, "sweep_params": parameter_counts(with_method(base, "kd1")),
            "sweep_overrides": base}
