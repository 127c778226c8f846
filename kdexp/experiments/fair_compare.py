"""Fair comparison driver: ``python -m kdexp.fair_compare [--methods b0,kd1] [--trials 10] [--seeds ...] [OVERRIDES]``.

Every method, B0 included, gets the same budget: ``--trials`` Optuna trials on the VALIDATION split over its own
knobs, taken from the ``experiment=fair_compare`` search space (B0 and eval drop the KD-only ones). Each method's
best configuration is then re-run with ``--seeds`` and compared on the EVAL split by ``kdexp.report``. Stages run as
``python -m kdexp --multirun`` subprocesses under ``OUT/tune/<method>`` and ``OUT/final/<method>``; ``OUT`` holds
the ``fair_compare.json`` manifest that tells the report which protocol produced the final runs (tuning trials are
not reported). Re-running the same command resumes: the Optuna studies and the run registry skip finished work.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from kdexp import methods
from kdexp.analysis.report import build
from kdexp.core.artefacts import atomic_write_json
from kdexp.experiments.compose import compose

DEFAULT_SEEDS = "42,123,456,789,2024"
DOMAIN = {"method.alpha": (0, 1), "method.gold_mix": (0, 1)}


def search_space(experiment: str, config_dir: str | None, overrides: list[str]) -> dict[str, str]:
    cfg = compose([f"experiment={experiment}", *overrides], config_dir=config_dir, hydra_config=True)
    space = dict(cfg.hydra.sweeper.get("params") or {})
    if not space:
        raise ValueError(f"experiment={experiment} has no hydra.sweeper.params search space")
    return space


def method_space(method: str, space: dict[str, str]) -> dict[str, str]:
    """The part of the space a method reads (its schema's knobs, and everything outside ``method``): tuning a knob
    the method ignores (B0 and a temperature) would waste its trials."""
    own = methods.knobs(method)
    return {k: v for k, v in space.items() if not k.startswith("method.") or k.split(".")[1] in own}


def _kdexp(args: list[str], config_dir: str | None) -> None:
    cmd = [sys.executable, "-m", "kdexp", "--multirun", *(["--config-dir", config_dir] if config_dir else []), *args]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise SystemExit(f"kdexp.fair_compare: stage failed (exit {proc.returncode}): {' '.join(args)}")


def best_params(tune_dir: Path) -> dict:
    results = yaml.safe_load((tune_dir / "optimization_results.yaml").read_text())
    return {"params": results["best_params"], "validation_value": results["best_value"]}


def at_edge(best: dict, space: dict[str, str], margin: float = 0.05) -> list[str]:
    """The tuned knobs whose best value lies within ``margin`` of an interval's end (in log space for log tags):
    the optimum may lie outside the range, so the method was not tuned as hard as the budget suggests."""
    edges = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in space.items()]):
        sweep, key = override.value(), override.get_key_element()
        if not isinstance(sweep, IntervalSweep) or key not in best:
            continue
        scale = math.log if "log" in sweep.tags else float
        low, high, value = scale(sweep.start), scale(sweep.end), scale(best[key])
        bounds = DOMAIN.get(key, (None, None))  # an end that is the knob's own limit cannot be widened
        near_low = value - low <= margin * (high - low) and sweep.start != bounds[0]
        near_high = high - value <= margin * (high - low) and sweep.end != bounds[1]
        if near_low or near_high:
            edges.append(f"{key}={best[key]} (range [{sweep.start}, {sweep.end}])")
    return edges


def run_protocol(opts: argparse.Namespace, overrides: list[str]) -> Path:
    out = Path(opts.out or f"multirun/fair_compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    methods, seeds = opts.methods.split(","), opts.seeds.split(",")
    space = search_space(opts.experiment, opts.config_dir, overrides)
    manifest = {"protocol": "fair_compare", "experiment": opts.experiment, "trials": opts.trials, "seeds": seeds,
                "methods": methods, "overrides": overrides,
                "search_space": {m: method_space(m, space) for m in methods}, "best": {}}
    atomic_write_json(out / "fair_compare.json", manifest)
    for method in methods:
        tune = out / "tune" / method
        _kdexp([f"experiment={opts.experiment}", f"method={method}", "hydra/sweeper=kdexp_optuna",
                "hydra.sweeper.params=null", f"hydra.sweeper.n_trials={opts.trials}", f"hydra.sweep.dir={tune}",
                *(f"{k}={v}" for k, v in manifest["search_space"][method].items()), *overrides], opts.config_dir)
        manifest["best"][method] = best_params(tune)
        edges = manifest["best"][method]["at_edge"] = at_edge(manifest["best"][method]["params"],
                                                               manifest["search_space"][method])
        if edges:
            print(f"kdexp.fair_compare: warning: {method}'s best trial is at the edge of its search range: "
                  f"{'; '.join(edges)}. Widen the range and resume with the same --out.", flush=True)
        atomic_write_json(out / "fair_compare.json", manifest)
    for method in methods:
        best = manifest["best"][method]["params"]
        _kdexp([f"experiment={opts.experiment}", f"method={method}", "hydra/sweeper=basic",
                "hydra.sweeper.params=null", f"hydra.sweep.dir={out / 'final' / method}",
                *(f"{k}={v}" for k, v in best.items()), f"seed={','.join(seeds)}", *overrides], opts.config_dir)
    return build([out], out / "report")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdexp.fair_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="b0,kd1", help="comma-separated methods, B0 included (default b0,kd1)")
    parser.add_argument("--trials", type=int, default=10, help="Optuna trials per method on validation (default 10)")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"seeds of the final runs (default {DEFAULT_SEEDS})")
    parser.add_argument("--out", default=None, help="output directory (default multirun/fair_compare/<time>)")
    parser.add_argument("--experiment", default="fair_compare", help="preset holding the search space")
    parser.add_argument("--config-dir", default=None, help="extra Hydra config directory (as kdexp's --config-dir)")
    opts, overrides = parser.parse_known_args(argv)
    if opts.trials < 1:
        sys.exit(f"kdexp.fair_compare: error: --trials={opts.trials} must be >= 1")
    if len(opts.seeds.split(",")) < 2:
        sys.exit(f"kdexp.fair_compare: error: --seeds={opts.seeds} needs at least 2 seeds for a paired test")
    try:
        out = run_protocol(opts, overrides)
    except ValueError as err:
        sys.exit(f"kdexp.fair_compare: error: {err}")
    print(f"report: {out / 'index.html'}")


if __name__ == "__main__":
    main()
