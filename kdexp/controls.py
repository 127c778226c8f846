"""Compose-time checks of the training controls (docs/training_controls.md); each raises a one-line ValueError."""

from __future__ import annotations

from kdexp import lora, param_groups, resilience, stages


def check_training_controls(cfg) -> None:
    param_groups.compile_rules(cfg.optim.param_groups)
    stages.check_stages(cfg)
    resilience.check_resume(cfg)
    for role in ("teacher", "student"):
        lora.check_quantization(cfg, role)
    lora.check_lora(cfg)
    resilience.check_fallback(cfg)
    if cfg.teacher.fallback:
        lora.check_quantization(cfg, "teacher", resilience.fallback_teacher_node(cfg.teacher.fallback))
