"""Optional Weights & Biases mirror of a run (``logger=wandb``) and of a report; results.json stays the record.

A run opens its W&B run before training, so HF Trainer's ``WandbCallback`` (``report_to=["wandb"]``, see
:func:`kdexp.training.training_args`) logs the loss curves (loss, loss_ce, loss_kd) into it instead of starting its
own; :func:`finish` adds the final metrics. Without ``WANDB_API_KEY`` (and no explicit ``logger.mode``) everything
is written offline next to the results, to be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def resolve_mode(mode: str | None) -> str:
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run_name(cfg) -> str:
    name = f"{cfg.task.name}-{cfg.method.name}"
    if cfg.method.name not in ("b0", "eval"):  # T and alpha mean nothing to B0 (registry.KD_ONLY_KEYS)
        name += f"-T{cfg.method.temperature:g}-a{cfg.method.alpha:g}"
    return f"{name}-s{cfg.seed}"


def _group(cfg) -> str | None:
    """The sweep directory for multirun jobs (so a sweep is one W&B group), None for a single run."""
    from hydra.core.hydra_config import HydraConfig

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


def _init(logger_cfg, out_dir: Path, **kwargs):
    import wandb

    mode = resolve_mode(logger_cfg.get("mode"))
    run = wandb.init(project=logger_cfg.get("project") or "kdexp", entity=logger_cfg.get("entity"), mode=mode,
                     dir=str(out_dir), tags=list(logger_cfg.get("tags") or []), **kwargs)
    if mode == "offline":
        log.info("W&B offline (no WANDB_API_KEY): upload later with `wandb sync %s`", Path(run.dir).parent)
    return run


def start(cfg, out_dir: Path):
    """Open the W&B run of this training run when logger=wandb; None otherwise."""
    if cfg.logger.name != "wandb":
        return None
    config = _flat(OmegaConf.to_container(cfg, resolve=True))
    return _init(cfg.logger, out_dir, name=run_name(cfg), group=_group(cfg), job_type=cfg.method.name,
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
    run.summary.update(summary)
    run.finish()


def log_report(tables: dict, out: Path, logger_cfg: dict) -> None:
    """The report's tables as W&B Tables (and its figures as images) in one ``job_type=report`` run."""
    import wandb

    run = _init(logger_cfg, out, name=f"report-{out.resolve().parent.name}", job_type="report")
    for name, per_group in tables.items():
        rows = [{"protocol": g.protocol, "setting": g.label, **r} for g, group_rows in per_group for r in group_rows]
        if rows:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
    run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "figures").glob("*.png"))})
    run.finish()
