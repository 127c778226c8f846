"""What every bench shares: one way to compose and set up a run, and one way to watch the user's own path train.

- :func:`isolated` / :func:`config` / :func:`context`: the config ``python -m kdexp OVERRIDES`` would run (composed by
  :func:`kdexp.experiments.compose.compose`, checked by :func:`kdexp.methods.validate`), with a fresh cache under the
  bench's work directory, and the data + teacher a method's ``run`` would set up.
- :func:`watch_training`: observes every student ``Trainer.train`` call of whatever runs inside it (step wall times,
  and optionally memory) without changing what runs; :func:`time_methods` and :func:`peak_rss` use it on
  ``kdexp.main.run`` (in this process) and on ``python -m kdexp`` (in a fresh child process).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig
from transformers import Trainer, TrainerCallback

from kdexp import main, methods
from kdexp.core.artefacts import seed_everything
from kdexp.core.evaluate import peak_memory
from kdexp.core.runner import Context, setup
from kdexp.experiments.compose import compose

# Every measured run reruns (the registry would skip a repeated config), saves nothing and never scores the teacher.
RUN_FLAGS = ["force=true", "eval_teacher=false", "save_student=false"]
_CHILD = "from kdexp.bench.common import child_main; child_main()"


# ---- config and setup ----------------------------------------------------------------------------------------------

def isolated(overrides: list[str], work: Path) -> list[str]:
    """``overrides`` plus a fresh ``cache_dir`` under ``work``, so teacher caches, teacher answers and the run
    registry are built cold; prepared teachers (cache_dir/teachers) stay shared with the configured cache_dir."""
    cfg = compose(list(overrides))
    cache = Path(work) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if cfg.teacher.prepare.enabled and not (cache / "teachers").exists():
        shared = Path(cfg.cache_dir).resolve() / "teachers"
        shared.mkdir(parents=True, exist_ok=True)
        (cache / "teachers").symlink_to(shared, target_is_directory=True)
    return [*overrides, f"cache_dir={cache.resolve()}"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merged(defaults: list[str], overrides) -> list[str]:
    """A bench's default overrides, less those whose key the user's ``overrides`` set, then the user's."""
    keys = {_key(o) for o in overrides}
    return [*(d for d in defaults if _key(d) not in keys), *overrides]


def with_method(overrides: list[str], name: str, *knobs: str) -> list[str]:
    """``overrides`` as ``method=name`` plus ``knobs``: other methods' knobs are dropped (its schema rejects them)."""
    own = methods.knobs(name)

    def keep(override: str) -> bool:
        key = _key(override)
        return key != "method" and (not key.startswith("method.") or key.split(".")[1] in own)

    return [*(o for o in overrides if keep(o)), f"method={name}", *knobs]


def config(overrides: list[str], out_dir: Path) -> DictConfig:
    """The composed, validated config of ``python -m kdexp OVERRIDES output_dir=OUT_DIR``."""
    cfg = compose([*overrides, f"output_dir={Path(out_dir).resolve()}"])
    methods.validate(cfg)
    return cfg


def context(cfg: DictConfig, need_teacher: bool = True) -> Context:
    """Tokenizers, data and (prepared) teacher exactly as the method's ``run`` sets them up, seeded as main does."""
    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    seed_everything(cfg.seed)
    module = methods.get(cfg.method.name)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return setup(cfg, out_dir, "bench", need_teacher=need_teacher, shared_vocab=module.NEEDS_SHARED_VOCAB,
                 unlabeled_samples=cfg.method.get("unlabeled_samples", 0))


# ---- watching the user's path --------------------------------------------------------------------------------------

def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def vm_hwm_mb() -> float:
    """This process's peak RSS. Linux keeps ru_maxrss across fork + exec (a child would report its parent's peak),
    so read the address space's own high-water mark, VmHWM, where /proc has it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, end to end: from the previous step's end (or the start of training) to this
    step's end, so fetching and collating the batch (e.g. reading the teacher cache) counts too."""

    def __init__(self, times: list[float]):
        self.times, self._last = times, None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


@dataclass
class Watch:
    """What :func:`watch_training` saw of the student's training under ``root`` (its output_dir)."""

    root: Path
    memory: bool = False
    step_times: list[float] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def owns(self, trainer) -> bool:
        return Path(trainer.args.output_dir).resolve().is_relative_to(self.root)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Memory around one ``train`` call: RSS when the first one starts, the sampled RSS peak while any runs
        (``peak_memory``), and VmHWM before the first and after the last."""
        if not self.memory:
            yield
            return
        self.figures.setdefault("before_train_mb", rss_mb())
        self.figures.setdefault("setup_peak_mb", vm_hwm_mb())
        with peak_memory("cpu") as mem:
            yield
        self.figures["train_peak_mb"] = max(self.figures.get("train_peak_mb", 0.0), mem["peak_memory_mb"])
        self.figures["process_peak_mb"] = vm_hwm_mb()


@contextlib.contextmanager
def watch_training(root: Path, memory: bool = False) -> Iterator[Watch]:
    """Observe every ``Trainer.train`` whose output_dir is under ``root`` (the student's; a teacher being prepared on
    the way is left alone): a :class:`StepTimer` is added and, with ``memory``, memory is sampled. What trains, and
    how, is unchanged."""
    watch, original = Watch(Path(root).resolve(), memory), Trainer.train

    def train(trainer, *args, **kwargs):
        if not watch.owns(trainer):
            return original(trainer, *args, **kwargs)
        trainer.add_callback(StepTimer(watch.step_times))
        with watch.measuring():
            return original(trainer, *args, **kwargs)

    Trainer.train = train
    try:
        yield watch
    finally:
        Trainer.train = original


def time_methods(variants: dict[str, list[str]], work: Path, *, steps: int, warmup: int, rounds: int) -> dict:
    """Median seconds per optimizer step of each variant's ``kdexp.main.run``, all in this process.

    Each run trains ``warmup + steps`` steps (``train.max_steps``) and the first ``warmup`` are dropped; variants are
    interleaved over ``rounds`` so a burst of load on a shared machine hits every one of them alike.
    """
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: the first step includes building the data loader, so warmup must be >= 1")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, overrides in variants.items():
            out = Path(work) / "timed" / f"{name}-{r}"
            cfg = config([*overrides, *RUN_FLAGS, f"train.max_steps={warmup + steps}"], out)
            with watch_training(out) as watch:
                main.run(cfg)
            times[name] += watch.step_times[warmup:]
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss(overrides: list[str], steps: int, run_dir: Path) -> dict:
    """Memory of ``python -m kdexp OVERRIDES`` training ``steps`` steps, in a fresh process (MB): ``before_train_mb``
    (RSS as training starts), ``train_peak_mb`` (sampled RSS peak while it trains), ``setup_peak_mb`` and
    ``process_peak_mb`` (VmHWM as training starts and as it ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_dir / "bench_memory.json"
    args = [*overrides, *RUN_FLAGS, f"train.max_steps={steps}", f"hydra.run.dir={run_dir.resolve()}"]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(report), *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode or not report.exists():
        raise RuntimeError(f"python -m kdexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())


def child_main() -> None:
    """In the child process of :func:`peak_rss`: argv is REPORT OVERRIDES...; run ``python -m kdexp OVERRIDES`` as
    is (Hydra CLI included) under :func:`watch_training`, then write what it saw to REPORT."""
    report, *overrides = sys.argv[1:]
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir="))
    sys.argv = ["kdexp", *overrides]
    with watch_training(Path(run_dir), memory=True) as watch:
        runpy.run_module("kdexp", run_name="__main__", alter_sys=True)
    Path(report).write_text(json.dumps({k: round(v, 1) for k, v in watch.figures.items()}))
