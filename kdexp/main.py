"""Entry point: compose, validate, seed, dispatch to the method's module, write results.json, return the metric.

The return value is the task's main metric on the VALIDATION split: Hydra sweepers (Optuna) optimise what main
returns, and selection must never see the eval split. Reported numbers come from ``metrics`` (eval) in results.json.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdexp import methods
from kdexp.config import CONF_DIR
from kdexp.core import distributed, live, resume
from kdexp.core.artefacts import atomic_write_json, seed_everything
from kdexp.experiments import registry, wandb_log
from kdexp.experiments.compose import register
from kdexp.experiments.preflight import check_environment, hydra_error_line

log = logging.getLogger("kdexp")
register()
# When this module finished importing (python, torch, transformers, hydra, kdexp): results.json timings_s.imports_s.
_IMPORTED_AT = time.time()
# The CLI's first run reports the process's own start-up (imports, Hydra's compose) in its timings; later jobs of a
# --multirun process and in-process callers (tests, benches) have none of their own to report.
_startup = {"pending": False}


def base_results(cfg, key: str) -> dict:
    return {
        "status": "running", "run_key": key, "method": cfg.method.name, "task": cfg.task.name,
        "teacher": cfg.teacher.name, "student": cfg.student.name, "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True), "versions": registry.versions(),
        "torch_threads": torch.get_num_threads(),
    }


def non_finite(results: dict) -> list[str]:
    """Where a result holds NaN or inf: metrics of student and teacher, the main metric, every logged loss."""
    found = [f"{part}.{k}" for part in ("metrics", "validation_metrics", "teacher_metrics")
             for k, v in (results.get(part) or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    found += [f"main_metric.{k}" for k, v in results["main_metric"].items()
              if isinstance(v, float) and not math.isfinite(v)]
    found += [f"train_log[step {h.get('step', '?')}].{k}" for h in results.get("train_log", []) for k, v in h.items()
              if k.startswith(("loss", "train_loss")) and isinstance(v, float) and not math.isfinite(v)]
    return found


def _threads(cfg) -> int | None:
    """hardware.torch_threads, or an even share of the cores when parallel sweep jobs share this machine: two
    2-thread jobs on 2 cores run ~10x slower, not 2x (hydra/launcher=kdexp_joblib)."""
    if cfg.hardware.torch_threads or not HydraConfig.initialized():
        return cfg.hardware.torch_threads
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    if n_jobs and n_jobs > 1:
        share = max(1, (os.cpu_count() or 1) // n_jobs)
        log.info("%d parallel jobs share %d cores: torch_threads=%d each", n_jobs, os.cpu_count() or 1, share)
        return share
    return None


def _skip(cfg, key: str, done: dict) -> float:
    log.info("skip: a complete run with this config exists at %s (force=true reruns)", done["_path"])
    resume.clear_checkpoints(cfg, key)  # the process that completed it may have died before clearing them
    if Path(done["_path"]).parent.resolve() != Path(cfg.output_dir).resolve():
        # A pointer keeps this sweep's directory complete for kdexp.report (e.g. B0 deduplicated across T/alpha).
        atomic_write_json(Path(cfg.output_dir) / "reused_results.json", {"results": done["_path"], "run_key": key})
    return done["main_metric"]["validation_value"]


def startup_timings(entered: float) -> dict:
    """``imports_s`` (process start → kdexp.main imported) and ``startup_s`` (process start → run() entered: the
    imports plus Hydra's parsing and compose), for the CLI's first run only; the process start is the kernel's."""
    if not _startup["pending"]:
        return {}
    _startup["pending"] = False
    created = psutil.Process().create_time()
    return {"imports_s": _IMPORTED_AT - created, "startup_s": entered - created}


def run(cfg: DictConfig) -> float:
    """Run one experiment from a composed config (also callable from tests without Hydra's CLI)."""
    entered, start = time.time(), time.perf_counter()
    startup = startup_timings(entered)
    try:
        methods.validate(cfg)
        distributed.setup_launch(cfg)
        check_environment(cfg)
    except ValueError as err:
        _discard_empty_run_dir(cfg)
        sys.exit(f"kdexp: config error: {err}")
    cache = Path(cfg.cache_dir).expanduser()
    if not cache.exists():
        log.info("cache: %s (new; prepared teachers, teacher caches and the run registry live here for runs from any "
                 "folder; KDEXP_CACHE_DIR or cache_dir=... moves it)", cache)
    key = registry.run_key(cfg)
    done = registry.lookup(cfg, key)
    if done is not None and not cfg.force:
        return _skip(cfg, key, done)

    previous, threads = torch.get_num_threads(), _threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _execute(cfg, key, {**startup, "preflight_s": time.perf_counter() - start})
    finally:  # run() is also called in-process (tests, benches): leave the caller's thread count as it was
        torch.set_num_threads(previous)


def _discard_empty_run_dir(cfg) -> None:
    """A run stopped by a config error leaves nothing: Hydra made its folder (.hydra/, the log) before run() began."""
    if not HydraConfig.initialized():
        return
    out, top = Path(cfg.output_dir).resolve(), Path.cwd().resolve()
    if not out.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in out.parents:  # outputs/<task>/<method>/ when this was their only run
        if parent == top or top not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def _drop_empty_dirs(out_dir: Path) -> None:
    """Trainer makes its output_dir even when it saves nothing there: keep a run folder free of empty folders."""
    for path in sorted(out_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _execute(cfg: DictConfig, key: str, timings: dict | None = None) -> float:
    """Train, evaluate, check and record one run whose config passed the pre-flight; ``timings`` (seconds before
    it) join the method's in results.json ``timings_s``."""
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for orphan in out_dir.glob(".results.json.*"):  # a temp file of a writer killed mid-write
        orphan.unlink(missing_ok=True)
    if distributed.is_main_process():
        live.beat(out_dir, "setup")  # the dashboard sees the run from now on (and a death before training)
    results = base_results(cfg, key)
    tracker = wandb_log.start(cfg, out_dir) if distributed.is_main_process() else None  # None unless logger=wandb
    start = time.perf_counter()
    try:
        # hardware=ddp: ranks other than 0 write into a throwaway directory, never results/registry/W&B.
        results.update(methods.get(cfg.method.name).run(cfg, distributed.rank_output_dir(out_dir), key))
    except (ValueError, FloatingPointError, TimeoutError) as err:  # bad input found once data is known, a
        sys.exit(f"kdexp: error: {err}")  # NaN loss, a lock held too long: one line, nothing recorded
    if not distributed.is_main_process():
        return results["main_metric"]["validation_value"]
    bad = non_finite(results)
    if bad:
        sys.exit(f"kdexp: error: the run produced non-finite values ({', '.join(bad[:5])}"
                 f"{', ...' if len(bad) > 5 else ''}); not recorded as complete")
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    results["timings_s"] = {**{k: round(v, 2) for k, v in (timings or {}).items()}, **results.get("timings_s", {})}
    results["status"] = "complete"
    atomic_write_json(out_dir / "results.json", results)
    registry.record(cfg, key, out_dir / "results.json")
    resume.clear_checkpoints(cfg, key)  # train.save_steps: the run is complete, nothing left to resume
    _drop_empty_dirs(out_dir)
    wandb_log.finish(tracker, results)
    log.info(summary_line(cfg.method.name, results, out_dir / "results.json"))
    return results["main_metric"]["validation_value"]


def summary_line(method: str, results: dict, path: Path) -> str:
    """The run's last log line: its numbers rounded alike, and any flag a reader must see before trusting them."""
    main = results["main_metric"]
    teacher = "" if main["teacher_value"] is None else f", teacher {main['teacher_value']:.4f}"
    flags = "".join(f"; {'FLAGGED' if f.get('severity', 'degenerate') == 'degenerate' else 'warning'} {f['who']}: "
                    f"{f['message']}" for f in results.get("flags") or [])
    return (f"done in {results['wall_time_s']:.1f}s: method={method}, {main['name']} {main['value']:.4f} on eval "
            f"(validation {main['validation_value']:.4f}{teacher}){flags} -> {path}")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    return run(cfg)


def cli() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _startup["pending"] = True
    problem = hydra_error_line(sys.argv[1:])
    try:
        _hydra_main()
    except SystemExit as err:
        if err.code not in (0, None) and problem:  # Hydra printed its message; the last line names the key
            print(problem, file=sys.stderr)
        raise
    distributed.exit_launched_process()  # torchrun: exit 0 before gloo's teardown can abort a finished run
