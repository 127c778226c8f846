"""Per-run fixed costs of the real command: ``b0_fixed_overhead_frac`` (docs/teacher_cache.md, "Per-run fixed costs
and sweeps").

``python -m kdexp method=b0`` (the default B0 run: SST-2, 500 labelled examples, teacher scored beside it) runs in a
fresh process, unchanged but for ``force=true``, ``hardware.torch_threads=1`` (OMP pinned too) and its output
folder. Its cache_dir is fresh (run registry) except for the content-addressed artefacts a user's repeated run finds
warm, linked from the configured cache_dir: prepared teachers, the teacher's evaluation and encoded features. It runs
``rounds`` times; the figures are the last round's (the first may build those artefacts), the first round's are kept
beside them.

Definitions (seconds; ``wall`` is the child process's wall time as this process sees it, start to exit; the others
come from its results.json ``timings_s``):

- ``student_eval_s`` = ``evaluate_student_s`` + ``validation_s`` + ``diagnostics_s``: scoring the student on eval
  and on validation, and its diagnostics;
- ``b0_fixed_overhead_frac`` = (wall − ``train_s`` − ``student_eval_s``) / wall: what is neither the training phase
  nor evaluating the student — interpreter start and imports, Hydra's compose, tokenizer, task data, building the
  student, reusing the teacher's evaluation, saving, the registry. ``train_s`` is B0's training phase as the method
  times it (encoding the labelled examples, building the Trainer, the training loop);
- ``b0_fixed_overhead_incl_eval_frac`` = (wall − ``train_s``) / wall: the same, counting evaluation as overhead.

Keys: those two, ``b0_overhead_wall_s``, ``b0_overhead_cpu_s`` (the child's CPU seconds), ``b0_overhead_timings_s``
(the measured run's ``timings_s``),
``b0_overhead_first_round`` (the first round's fractions and wall), ``b0_overhead_overrides``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from kdexp.bench.common import isolated, merged, with_method
from kdexp.bench.memory import child_env
from kdexp.bench.sweep import child_cpu_s
from kdexp.experiments.compose import compose

# Artefacts of cache_dir that a user's second run finds warm; everything else starts empty.
SHARED = ("teacher_eval", "features")
STUDENT_EVAL = ("evaluate_student_s", "validation_s", "diagnostics_s")


def fixed_overhead(timings: dict, wall_s: float) -> dict:
    """The fractions of the module doc from one run's ``timings_s`` and its process wall time."""
    if wall_s <= 0:
        raise ValueError(f"wall time {wall_s!r} s: expected > 0")
    train = timings.get("train_s", 0.0)
    student_eval = sum(timings.get(k, 0.0) for k in STUDENT_EVAL)
    return {"b0_fixed_overhead_frac": (wall_s - train - student_eval) / wall_s,
            "b0_fixed_overhead_incl_eval_frac": (wall_s - train) / wall_s,
            "student_eval_s": student_eval, "train_s": train}


def share_artefacts(overrides: list[str], work: Path) -> list[str]:
    """:func:`isolated` overrides whose cache_dir also links the configured cache_dir's :data:`SHARED` folders."""
    shared = Path(compose(list(overrides)).cache_dir).expanduser().resolve()
    out = isolated(overrides, work)
    cache = Path(work) / "cache"
    for name in SHARED:
        (shared / name).mkdir(parents=True, exist_ok=True)
        if not (cache / name).exists():
            (cache / name).symlink_to(shared / name, target_is_directory=True)
    return out


def timed_run(overrides: list[str], run_dir: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of ``python -m kdexp OVERRIDES`` in a fresh process, and its results.json."""
    args = [*overrides, "force=true", f"hydra.run.dir={run_dir.resolve()}"]
    start, cpu = time.perf_counter(), child_cpu_s()
    proc = subprocess.run([sys.executable, "-m", "kdexp", *args], capture_output=True, text=True, env=child_env())
    wall, cpu = time.perf_counter() - start, child_cpu_s() - cpu
    results = run_dir / "results.json"
    if proc.returncode or not results.exists():
        raise RuntimeError(f"python -m kdexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, cpu, json.loads(results.read_text())


def bench_overhead(overrides=(), work: Path = Path("."), rounds: int = 2) -> dict:
    """The default B0 command ``rounds`` times in fresh processes; see the module doc. ``overrides`` (a KD1 bench's:
    other methods' knobs are dropped) apply to it, torch threads pinned to 1."""
    b0 = with_method(merged(list(overrides), ["hardware.torch_threads=1"]), "b0")
    args = share_artefacts(b0, Path(work) / "overhead")
    seen = []
    for r in range(rounds):
        wall, cpu, results = timed_run(args, Path(work) / "overhead" / f"b0-{r}")
        seen.append((wall, cpu, results["timings_s"], fixed_overhead(results["timings_s"], wall)))
    wall, cpu, timings, fractions = seen[-1]
    first_wall, _, _, first = seen[0]
    return {"b0_fixed_overhead_frac": fractions["b0_fixed_overhead_frac"],
            "b0_fixed_overhead_incl_eval_frac": fractions["b0_fixed_overhead_incl_eval_frac"],
            "b0_overhead_wall_s": wall, "b0_overhead_cpu_s": cpu, "b0_overhead_timings_s": timings,
            "b0_overhead_first_round": {**first, "wall_s": first_wall}, "b0_overhead_overrides": args}
