"""Teacher preparation: fine-tune once, store content-addressed under ``cache_dir/teachers/<key>``, reuse forever.

The key hashes everything that determines the prepared weights (model source and architecture, init seed,
tokenizer, task data and formatting, preparation hyper-parameters, dtype). A tiny teacher has no pretrained weights,
so this is how it becomes worth distilling; a hub teacher can be fine-tuned the same way (teacher.prepare.enabled).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdexp.models import build_model, encode, load_saved
from kdexp.tasks import TaskData
from kdexp.training import train_model, training_args
from kdexp.utils import atomic_write_json, content_hash, dir_lock

log = logging.getLogger(__name__)
TASK_DATA_KEYS = ("name", "source", "hub_id", "hub_config", "prompt_template", "label_words", "append_eos",
                  "validation_samples", "max_prompt_tokens", "max_answer_tokens")


def task_identity(task_cfg) -> dict:
    return {k: OmegaConf.to_container(task_cfg, resolve=True)[k] for k in TASK_DATA_KEYS}


def teacher_spec(cfg) -> dict:
    t = OmegaConf.to_container(cfg.teacher, resolve=True)
    return {
        "model": {k: t[k] for k in ("path", "revision", "arch", "init_seed")},
        # The configured name, not the resolved path: the embedded tokenizer lives wherever kdexp is installed.
        "tokenizer": t["tokenizer"] or t["path"],
        "task": task_identity(cfg.task),
        "prepare": t["prepare"],
        "dtype": cfg.hardware.dtype,
        "format": 1,
    }


def teacher_key(cfg) -> str:
    return content_hash(teacher_spec(cfg))


def teacher_identity(cfg) -> str:
    """What determines the teacher's outputs, without loading it: the prepared-teacher key or the model source."""
    if cfg.teacher.prepare.enabled:
        return teacher_key(cfg)
    if cfg.teacher.path is None and cfg.teacher.init_seed is None:  # random weights drawn from the run seed
        return content_hash({**teacher_spec(cfg), "seed": cfg.seed})
    return cfg.teacher.path or content_hash(teacher_spec(cfg))


def prepare_teacher(cfg, tokenizer, data: TaskData):
    """Return (teacher model in eval mode, info dict for results.json)."""
    t_cfg = cfg.teacher
    if not t_cfg.prepare.enabled:
        model = build_model(t_cfg, len(tokenizer), seed=cfg.seed, hw_cfg=cfg.hardware)
        if t_cfg.path is None:
            log.warning("teacher %s has random weights (teacher.prepare.enabled=false)", t_cfg.name)
        return model.eval(), {"source": t_cfg.path or "random-init", "prepared": False}

    key = teacher_key(cfg)
    target = Path(cfg.cache_dir) / "teachers" / key
    info = {"key": key, "path": str(target), "prepared": True}
    with dir_lock(target):
        if (target / "kdexp_teacher.json").exists():
            log.info("teacher: reusing prepared teacher %s", target)
            info.update(OmegaConf.to_container(OmegaConf.load(target / "kdexp_teacher.json")))
            info["reused"] = True
            return load_saved(str(target), cfg.hardware).eval(), info
        info.update(_train_teacher(cfg, tokenizer, data, target))
        info["reused"] = False
    return load_saved(str(target), cfg.hardware).eval(), info


def _train_teacher(cfg, tokenizer, data: TaskData, target: Path) -> dict:
    p = cfg.teacher.prepare
    examples = data.train if p.max_train_samples is None else data.train[: p.max_train_samples]
    log.info("teacher: preparing %s on %d %s examples (one time; key %s)", cfg.teacher.name, len(examples),
             cfg.task.name, target.name)
    model = build_model(cfg.teacher, len(tokenizer), seed=p.seed, hw_cfg=cfg.hardware, for_training=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_cfg = OmegaConf.create({"batch_size": p.batch_size, "epochs": p.epochs, "lr": p.lr,
                                  "weight_decay": p.weight_decay, "warmup_ratio": p.warmup_ratio})
    args = training_args(cfg, tmp / "trainer", train_cfg=train_cfg, seed=p.seed, logging_steps=50)
    start = time.perf_counter()
    history = train_model(model, encode(examples, tokenizer, cfg.task), args, tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    meta = {"train_examples": len(examples), "train_seconds": round(seconds, 1), "spec": teacher_spec(cfg),
            "final_train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
            # Not part of the key, but the bits depend on them: see docs/design.md (teacher preparation).
            "prepared_with": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                              "device": str(next(model.parameters()).device)}}
    atomic_write_json(tmp / "kdexp_teacher.json", meta)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # the marker file inside makes it complete; a crash before this leaves only *.tmp
    return meta
