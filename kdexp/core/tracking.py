"""Experiment-tracker plumbing shared by a run's W&B mirror (experiments/wandb_log.py) and a report's
(analysis/report.py). wandb is an optional extra, imported only when a W&B run is opened."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def resolve_mode(mode: str | None) -> str:
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_init(logger_cfg, out_dir: Path, **kwargs):
    import wandb

    mode = resolve_mode(logger_cfg.get("mode"))
    run = wandb.init(project=logger_cfg.get("project") or "kdexp", entity=logger_cfg.get("entity"), mode=mode,
                     dir=str(out_dir), tags=list(logger_cfg.get("tags") or []), **kwargs)
    if mode == "offline":
        log.info("W&B offline (no WANDB_API_KEY): upload later with `wandb sync %s`", Path(run.dir).parent)
    return run
