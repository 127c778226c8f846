"""One-line config checks: each raises ``ValueError("<key>=<value> <rule>")`` naming the full key path."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import OmegaConf


def fail(key: str, value: Any, rule: str) -> None:
    raise ValueError(f"{key}={value!r} {rule}")


def choice(cfg, key: str, allowed: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        fail(key, value, f"must be one of {', '.join(map(str, allowed))}")


def positive(cfg, keys: list[str], strict: bool = True) -> None:
    """``> 0`` (``strict``) or ``>= 0``; None passes (an optional knob left unset)."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if (strict and value <= 0) or (not strict and value < 0):
            fail(key, value, "must be > 0" if strict else "must be >= 0")


def fraction(cfg, keys: list[str]) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            fail(key, value, "must be in [0, 1]")


def finite(cfg, keys: list[str]) -> None:
    """NaN passes every comparison above (nan <= 0 is False), so floats are checked for finiteness first."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, value, "must be a finite number")
