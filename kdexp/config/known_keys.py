"""Reject keys the schema does not know, including ones added with Hydra's ``+`` (which bypasses struct mode).

Hydra suggests ``+task.max_train_sample=100`` when a key is missing, and that form composes silently: the run starts
with the real key unchanged. Every typed group (everything but ``method``, whose keys :func:`kdexp.methods.prepare`
checks against the method's own schema) is compared here with its dataclass, and a stray key fails with the closest
known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from omegaconf import DictConfig, OmegaConf

from kdexp.config.schema import Config

# Free-form nodes: their keys are data, not schema fields.
_OPEN = {"method", "task.baseline_fields"}


def _schema_node(node) -> bool:
    return isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))


def _walk(node: DictConfig, schema: DictConfig, prefix: str) -> None:
    for key in node:
        path = f"{prefix}{key}"
        if path in _OPEN:
            continue
        if key not in schema.keys():
            known = sorted(str(k) for k in schema)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(f"{path} is not a config key ({prefix.rstrip('.') or 'the root'} has: "
                             f"{', '.join(known)}){hint}")
        child, child_schema = node._get_node(key), schema._get_node(key)
        if isinstance(child, DictConfig) and _schema_node(child_schema) and not child._is_missing():
            _walk(child, child_schema, f"{path}.")


def check_known_keys(cfg: DictConfig) -> None:
    """One-line ``ValueError`` for the first key of ``cfg`` (outside ``method``) that its group's schema lacks."""
    _walk(cfg, _typed_schema(), "")


def _typed_schema() -> DictConfig:
    """The root schema, its MISSING group nodes (teacher, task, ...) replaced by their dataclasses' defaults."""
    schema = OmegaConf.structured(Config)
    for name, cls in typing.get_type_hints(Config).items():
        if name not in _OPEN and dataclasses.is_dataclass(cls) and schema._get_node(name)._is_missing():
            schema[name] = OmegaConf.structured(cls)
    return schema
