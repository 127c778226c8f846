"""Entry point: compose, validate, seed, dispatch to a method runner, write results.json, return the metric.

The return value is the task's main metric on the VALIDATION split: Hydra sweepers (Optuna) optimise what main
returns, and selection must never see the eval split. Reported numbers come from ``metrics`` (eval) in results.json.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from kdexp import distill, distributed, kd2, kd3, registry, resilience, runners, wandb_log
from kdexp.schema import register_configs, validate
from kdexp.sweeps import register_resolvers
from kdexp.utils import atomic_write_json, seed_everything

log = logging.getLogger("kdexp")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

RUNNERS = {
    "b0": runners.run_b0,
    "kd1": distill.run_kd1,
    "kd2": kd2.run_kd2,
    "kd3": kd3.run_kd3,
    "eval": runners.run_eval,
}

register_configs()
register_resolvers()


def run(cfg: DictConfig) -> float:
    """Run one experiment from a composed config (also callable from tests without Hydra's CLI)."""
    try:
        validate(cfg)
        distributed.setup_launch(cfg)
        if cfg.method.name not in RUNNERS:
            raise ValueError(f"method.name={cfg.method.name!r} must be one of {', '.join(RUNNERS)}")
    except ValueError as err:
        sys.exit(f"kdexp: config error: {err}")
    key = registry.run_key(cfg)
    done = registry.lookup(cfg, key)
    if done is not None and not cfg.force:
        log.info("skip: a complete run with this config exists at %s (force=true reruns)", done["_path"])
        if Path(done["_path"]).parent.resolve() != Path(cfg.output_dir).resolve():
            # A pointer keeps this sweep's directory complete for kdexp.report (e.g. B0 deduplicated across T/alpha).
            atomic_write_json(Path(cfg.output_dir) / "reused_results.json", {"results": done["_path"], "run_key": key})
        return done["main_metric"]["validation_value"]

    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = runners.base_results(cfg, key)
    tracker = wandb_log.start(cfg, out_dir) if distributed.is_main_process() else None  # None unless logger=wandb
    start = time.perf_counter()
    try:
        # hardware=ddp: ranks other than 0 write into a throwaway directory, never results/registry/W&B.
        results.update(RUNNERS[cfg.method.name](cfg, distributed.rank_output_dir(out_dir)))
    except ValueError as err:  # bad input found once data/tokenizers are known (e.g. vocabulary mismatch)
        sys.exit(f"kdexp: error: {err}")
    if not distributed.is_main_process():
        return results["main_metric"]["validation_value"]
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    results["status"] = "complete"
    atomic_write_json(out_dir / "results.json", results)
    registry.record(cfg, key, out_dir / "results.json")
    resilience.clear_checkpoints(cfg, key)  # train.save_steps: the run is complete, nothing left to resume
    wandb_log.finish(tracker, results)
    main = results["main_metric"]
    log.info("done in %.1fs: %s eval %s=%.4f (validation %.4f, teacher %s) -> %s", results["wall_time_s"],
             cfg.method.name, main["name"], main["value"], main["validation_value"], main["teacher_value"],
             out_dir / "results.json")
    return main["validation_value"]


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    return run(cfg)


def cli() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()
    distributed.exit_launched_process()  # torchrun: exit 0 before gloo's teardown can abort a finished run
