"""Sweep support: OmegaConf resolvers used by the presets, and a Hydra callback that checks a sweep before it starts.

:class:`SweepGuard` runs once per ``--multirun`` (``on_multirun_start``), before any job:

- every grid value and every Optuna interval endpoint is composed and validated like a single run, so a bad value
  (``method.alpha=0.5,1.5``) or an empty interval stops the sweep with one line instead of failing at job 17;
- in a sweep over several methods, ``method.<knob>`` overrides reach every job, also those whose method lacks the
  knob (it is dropped there, see :func:`share_method_knobs`);
- for the Optuna sweeper it creates the sweep directory (the sqlite study lives there) and, when the study already
  holds finished trials, shrinks ``n_trials`` to what is left of the budget and puts the new jobs in fresh subdirs,
  so re-running a killed search resumes it rather than starting over or overwriting earlier trials.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdexp import methods

log = logging.getLogger("kdexp.experiments.sweeps")

# Metrics where smaller is better; every other main metric (accuracy, f1, exact_match) is maximised.
MINIMIZE = {"perplexity", "loss"}


def register_resolvers() -> None:
    # ${kdexp.per_task:${task.name},{sst2: 500, squad: 200}}: a preset value that depends on the swept task.
    OmegaConf.register_new_resolver("kdexp.per_task", _per_task, replace=True)
    # ${kdexp.direction:${task.main_metric}}: the Optuna direction follows the task's main metric.
    OmegaConf.register_new_resolver("kdexp.direction", _direction, replace=True)
    # ${kdexp.job_dir:${hydra.job.num},${hydra.job.override_dirname}}: a multirun job folder named by its overrides.
    OmegaConf.register_new_resolver("kdexp.job_dir", job_dir, replace=True)


JOB_DIR_MAX = 64


def job_dir(num: Any, overrides: Any) -> str:
    """``3_method=kd1,seed=2``: the job number (unique, sorts like Hydra's) and its overrides, filesystem-safe.

    Characters other than letters, digits and ``.,=+-_`` become ``_`` (a path value's ``/`` would nest folders); a name
    over ``JOB_DIR_MAX`` characters keeps its start and a hash of the whole, so two long names never collide.
    """
    safe = re.sub(r"[^A-Za-z0-9.,=+\-_]", "_", str(overrides or ""))
    name = f"{num}_{safe}" if safe else str(num)
    if len(name) > JOB_DIR_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:JOB_DIR_MAX - 9]}~{digest}"
    return name


def _per_task(task: str, table: Any) -> Any:
    if task not in table:
        raise ValueError(f"kdexp.per_task: no value for task {task!r} (have {', '.join(table)})")
    return table[task]


def _direction(metric: str) -> str:
    return "minimize" if metric in MINIMIZE else "maximize"


def _sweep_values(sweep) -> list:
    if isinstance(sweep, ChoiceSweep):
        return list(sweep.list)
    if isinstance(sweep, RangeSweep):
        return list(sweep.range())
    if isinstance(sweep, IntervalSweep):
        if not sweep.start < sweep.end:
            raise ValueError(f"interval({sweep.start}, {sweep.end}) is empty: the lower bound must be < the upper")
        if "log" in sweep.tags and sweep.start <= 0:
            raise ValueError(f"tag(log, interval({sweep.start}, {sweep.end})) needs a lower bound > 0")
        return [sweep.start, sweep.end]
    raise ValueError(f"unsupported sweep {sweep!r}")


def sweep_overrides(config: DictConfig) -> tuple[list[str], list[tuple[str, list]]]:
    """(fixed command-line overrides, [(key, values to check)]) from the command line and hydra.sweeper.params."""
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    fixed, swept = [], []
    for line, override in zip(lines, OverridesParser.create().parse_overrides(lines), strict=True):
        if not override.is_sweep_override():
            fixed.append(line)
            continue
        try:
            swept.append((override.get_key_element(), _sweep_values(override.value())))
        except ValueError as err:
            raise ValueError(f"{override.get_key_element()}: {err}") from None
    return fixed, swept


def _is(key: str, name: str) -> bool:
    return key.lstrip("+") == name


def check_sweep(config: DictConfig) -> int:
    """Compose and validate each swept value once per swept method (not the whole product); return the number of
    checks. A knob's range is a method's own, so ``method.gold_mix=0,1.5`` is checked under every method swept."""
    fixed, swept = sweep_overrides(config)
    method_values = next((values for key, values in swept if _is(key, "method")), [None])
    checks = 0
    for key, values in swept:
        for value in values:
            for method in [None] if _is(key, "method") else method_values:
                overrides = [*fixed, f"{key}={value}", *([f"method={method}"] if method else [])]
                cfg = compose(config_name=config.hydra.job.config_name, overrides=overrides)
                try:
                    methods.validate(cfg)
                except ValueError as err:
                    raise ValueError(f"{err} (a value of the sweep over {key})") from None
                checks += 1
    return checks


def _force_method_knob(line: str) -> str:
    bare = line.lstrip("+")
    return "++" + bare if bare.startswith("method.") else line


def share_method_knobs(config: DictConfig) -> None:
    """In a sweep over several methods, hand every ``method.<knob>`` override to every job (``++``), also to jobs
    whose method has no such knob: :func:`kdexp.methods.prepare` then drops it there, so ``--multirun
    method=b0,kd2 method.gold_mix=0,0.5`` runs and trains B0 once per seed instead of failing to compose."""
    _, swept = sweep_overrides(config)
    if not any(_is(key, "method") and len(values) > 1 for key, values in swept):
        return
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.overrides.task = [_force_method_knob(line) for line in config.hydra.overrides.task]
        params = config.hydra.sweeper.get("params")
        if params:
            config.hydra.sweeper.params = {_force_method_knob(k): v for k, v in params.items()}


def resume_optuna(config: DictConfig) -> None:
    sweeper = config.hydra.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")):
        return
    if sweeper.n_trials < 1:
        raise ValueError(f"hydra.sweeper.n_trials={sweeper.n_trials} must be >= 1")
    Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
    if not sweeper.storage:
        return
    import optuna

    try:
        study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
    except KeyError:  # no study of that name yet: a fresh search
        return
    finished = sum(t.state.is_finished() for t in study.trials)
    remaining = max(sweeper.n_trials - finished, 0)
    log.info("optuna: study %r in %s has %d finished trial(s); running %d more for n_trials=%d",
             sweeper.study_name, sweeper.storage, finished, remaining, sweeper.n_trials)
    with read_write(config.hydra):
        sweeper.n_trials = remaining
        if sweeper.sampler.get("seed") is not None:
            # A sampler reseeded identically would propose the first trials' parameters again.
            sweeper.sampler.seed = sweeper.sampler.seed + finished
        # Job numbers restart at 0 in each invocation: new subdirs keep the earlier trials' results in place.
        config.hydra.overrides.hydra.append(
            f"hydra.sweep.subdir='resume{finished}_${{kdexp.job_dir:${{hydra.job.num}},${{hydra.job.override_dirname}}}}'")


def name_jobs_by_swept_keys(config: DictConfig) -> None:
    """Job folders carry only what varies between jobs (``3_method=kd1,seed=2``): the overrides every job shares
    (``experiment=smoke``) are left out of ``hydra.job.override_dirname``, which ``hydra.sweep.subdir`` uses."""
    fixed, _ = sweep_overrides(config)
    keys = sorted({o.get_key_element() for o in OverridesParser.create().parse_overrides(fixed)})
    if keys:
        quoted = ",".join("'" + k.replace("'", "\\'") + "'" for k in keys)
        config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]")


class SweepGuard(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            share_method_knobs(config)
            with read_write(config.hydra):
                name_jobs_by_swept_keys(config)
            checks = check_sweep(config)
            resume_optuna(config)
        except ValueError as err:
            sys.exit(f"kdexp: sweep config error: {err}")
        log.info("sweep: %d swept value(s) validated before launching", checks)
