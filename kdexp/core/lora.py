"""LoRA / QLoRA students (peft) and bitsandbytes quantization: config checks, wrapping, merging after training.

peft and bitsandbytes cost seconds to import, so they are imported inside the functions that need them, and only
when ``student.lora.enabled`` / a ``quantization`` other than ``none`` asks for them. After training the adapter is
saved on its own (``lora_adapter/``) and merged into the base weights (``merge_and_unload``); everything after that
(evaluation, efficiency figures, the saved ``student/``) sees the merged, standalone model.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdexp.core.models import build_model

log = logging.getLogger(__name__)
QUANTIZATION = ("none", "4bit", "8bit")


# ---- compose-time checks -------------------------------------------------------------------------------------------

def module_names(model_cfg) -> tuple[list[str], list[str]]:
    """Module names and leaf-module suffixes, from a weightless skeleton on the meta device (no weight download)."""
    with torch.device("meta"):
        if model_cfg.path is None:
            meta = SimpleNamespace(device="meta", dtype="float32")
            model = build_model(model_cfg, vocab_size=8, seed=0, hw_cfg=meta, for_training=True)
        else:
            config = AutoConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision)
            model = AutoModelForCausalLM.from_config(config)
    modules = [(name, module) for name, module in model.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in modules if not list(module.children())})
    return [name for name, _ in modules], leaves


def check_lora(cfg, trains_student: bool) -> None:
    lora = cfg.student.lora
    if not lora.enabled:
        return
    if lora.r <= 0:
        raise ValueError(f"student.lora.r={lora.r} must be > 0")
    if lora.alpha <= 0:
        raise ValueError(f"student.lora.alpha={lora.alpha} must be > 0")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"student.lora.dropout={lora.dropout} must be in [0, 1)")
    if not trains_student:
        raise ValueError(f"student.lora.enabled=true needs a method that trains the student (method="
                         f"{cfg.method.name} does not)")
    if importlib.util.find_spec("peft") is None:
        raise ValueError("student.lora.enabled=true needs the peft package: pip install -e '.[lora]'")
    if not lora.target_modules:
        raise ValueError("student.lora.target_modules=[] is empty: name the modules to adapt (e.g. q_proj, v_proj)")
    names, leaves = module_names(cfg.student)
    for target in lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"student.lora.target_modules: {target!r} matches no module of student="
                             f"{cfg.student.name} (leaf modules: {', '.join(leaves)})")


def check_quantization(cfg, role: str, trains_student: bool, model_cfg=None) -> None:
    """Fail before anything loads when this platform cannot load ``<role>.quantization`` (never fall back)."""
    model_cfg = model_cfg or cfg[role]
    mode, key = model_cfg.quantization, f"{role}.quantization"
    if mode not in QUANTIZATION:
        raise ValueError(f"{key}={mode!r} must be one of {', '.join(QUANTIZATION)}")
    if mode == "none":
        return
    if cfg.hardware.device != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"{key}={mode} needs a CUDA GPU (bitsandbytes); this run has hardware.device="
                         f"{cfg.hardware.device} and torch.cuda.is_available()={torch.cuda.is_available()}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{key}={mode} needs the bitsandbytes package: pip install -e '.[lora]'")
    if model_cfg.path is None:
        raise ValueError(f"{key}={mode} needs a pretrained model ({role}.path); tiny models are built in float32")
    if role == "student" and trains_student and not cfg.student.lora.enabled:
        raise ValueError(f"{key}={mode} trains only through an adapter: set student.lora.enabled=true (QLoRA)")
    if role == "teacher" and cfg.teacher.prepare.enabled:
        raise ValueError(f"{key}={mode} cannot be combined with teacher.prepare.enabled=true (preparation "
                         "fine-tunes the full-precision weights)")


# ---- loading, wrapping, merging ------------------------------------------------------------------------------------

def wrap_student(model, cfg):
    """The student with a fresh LoRA adapter (peft); only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = cfg.student.lora
    if cfg.student.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.hardware.gradient_checkpointing)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # adapter init does not shift the run's random stream
        model = get_peft_model(model, config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("lora: r=%d alpha=%g on %s: %d trainable of %d parameters", lora.r, lora.alpha,
             ",".join(lora.target_modules), trainable, total)
    return model


def merged_student(ctx, student):
    """Save the adapter, merge it into the base weights and return the standalone model (non-LoRA: unchanged)."""
    if not ctx.cfg.student.lora.enabled:
        return student
    adapter_params = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    adapter_dir = None
    if ctx.cfg.save_student:
        adapter_dir = Path(ctx.out_dir) / "lora_adapter"
        student.save_pretrained(adapter_dir)
    merged = student.merge_and_unload()
    merged.requires_grad_(False)
    lora = ctx.cfg.student.lora
    ctx.extra["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                         "target_modules": list(lora.target_modules), "adapter_params": adapter_params,
                         "adapter_dir": str(adapter_dir) if adapter_dir else None, "merged": True}
    log.info("lora: merged the adapter (%d parameters) into the student", adapter_params)
    return merged
