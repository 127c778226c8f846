"""Optional Weights & Biases mirror of a run (``logger=wandb``); results.json stays the record.

A run opens its W&B run before training, so HF Trainer's ``WandbCallback`` (``report_to=["wandb"]``, see
``kdexp.core.training.training_args``) logs the loss curves (loss, loss_ce, loss_kd) into it instead of starting
its own; :func:`finish` adds the final metrics. Without ``WANDB_API_KEY`` (and no explicit ``logger.mode``) everything
is written offline next to the results, to be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kdexp import methods
from kdexp.core.tracking import wandb_init

log = logging.getLogger(__name__)


def run_name(cfg) -> str:
    """``sst2-kd1-T2-α0.5-s42``: task, method, the method's label knobs (methods/<name>.py LABEL_KNOBS), seed."""
    name = f"{cfg.task.name}-{cfg.method.name}"
    for knob, short in methods.get(cfg.method.name).LABEL_KNOBS.items():
        value = cfg.method[knob]
        name += f"-{short}{value:g}" if isinstance(value, float | int) else f"-{short}{value}"
    return f"{name}-s{cfg.seed}"


def _group(cfg) -> str | None:
    """The sweep directory for multirun jobs (so a sweep is one W&B group), None for a single run."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(Path(hydra_cfg.sweep.dir).resolve()) if hydra_cfg.mode.name == "MULTIRUN" else None


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def start(cfg, out_dir: Path):
    """Open the W&B run of this training run when logger=wandb; None otherwise."""
    if cfg.logger.name != "wandb":
        return None
    config = _flat(OmegaConf.to_container(cfg, resolve=True))
    return wandb_init(cfg.logger, out_dir, name=run_name(cfg), group=_group(cfg), job_type=cfg.method.name,
                 config=config, reinit="finish_previous")


def finish(run, results: dict) -> None:
    """Final metrics (eval, validation, teacher, efficiency) into the run summary, then close it."""
    if run is None:
        return
    summary = {"main/value": results["main_metric"]["value"],
               "main/validation_value": results["main_metric"]["validation_value"],
               "wall_time_s": results.get("wall_time_s")}
    for prefix, key in (("eval", "metrics"), ("validation", "validation_metrics"), ("teacher", "teacher_metrics")):
        summary.update({f"{prefix}/{k}": v for k, v in (results.get(key) or {}).items()})
    for role, eff in (results.get("efficiency") or {}).items():
        summary.update({f"efficiency/{role}/{k}": v for k, v in eff.items() if isinstance(v, int | float)})
    # Teacher top-k/tail mass at the run's T, student-teacher agreement, student ECE (kdexp/core/diagnostics.py).
    summary.update({f"diagnostics/{k}": v for k, v in (results.get("diagnostics") or {}).items()
                    if isinstance(v, int | float)})
    run.summary.update(summary)
    run.finish()
