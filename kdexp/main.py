"""Entry point: compose, validate, seed, dispatch to the method's module, write results.json, return the metric.

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
from omegaconf import DictConfig, OmegaConf

from kdexp import methods
from kdexp.config import CONF_DIR
from kdexp.core import distributed, resume
from kdexp.core.artefacts import atomic_write_json, seed_everything
from kdexp.experiments import registry, wandb_log
from kdexp.experiments.compose import register

log = logging.getLogger("kdexp")
register()


def base_results(cfg, key: str) -> dict:
    return {
        "status": "running", "run_key": key, "method": cfg.method.name, "task": cfg.task.name,
        "teacher": cfg.teacher.name, "student": cfg.student.name, "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True), "versions": registry.versions(),
        "torch_threads": torch.get_num_threads(),
    }


def run(cfg: DictConfig) -> float:
    """Run one experiment from a composed config (also callable from tests without Hydra's CLI)."""
    try:
        methods.validate(cfg)
        distributed.setup_launch(cfg)
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
    results = base_results(cfg, key)
    tracker = wandb_log.start(cfg, out_dir) if distributed.is_main_process() else None  # None unless logger=wandb
    start = time.perf_counter()
    try:
        # hardware=ddp: ranks other than 0 write into a throwaway directory, never results/registry/W&B.
        results.update(methods.get(cfg.method.name).run(cfg, distributed.rank_output_dir(out_dir), key))
    except ValueError as err:  # bad input found once data/tokenizers are known (e.g. vocabulary mismatch)
        sys.exit(f"kdexp: error: {err}")
    if not distributed.is_main_process():
        return results["main_metric"]["validation_value"]
    results["wall_time_s"] = round(time.perf_counter() - start, 2)
    results["status"] = "complete"
    atomic_write_json(out_dir / "results.json", results)
    registry.record(cfg, key, out_dir / "results.json")
    resume.clear_checkpoints(cfg, key)  # train.save_steps: the run is complete, nothing left to resume
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
