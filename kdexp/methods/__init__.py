"""The methods: one module each, and the one table that maps ``method.name`` to its module.

A method module holds everything about that method and nothing else needs to name it:

- ``Config``: the dataclass schema (and defaults) of ``conf/method/<name>.yaml``, registered in Hydra's ConfigStore
  as ``method/<name>_schema``, so a typo'd key fails at compose time;
- ``check(cfg)``: its range checks, one-line ``ValueError`` naming the key, run before any model loads;
- ``run(cfg, out_dir, run_key) -> dict``: setup → train → finish (kdexp/core/runner.py);
- ``teacher_artefacts(ctx)``: the content-addressed artefacts its runs need from the teacher (kdexp/methods/
  artefacts.py), for ``python -m kdexp.cache build``;
- ``NEEDS_SHARED_VOCAB``, ``TRAINS_STUDENT``, ``LOSS_WEIGHTS`` (what a stage may reweight), ``BASELINE`` (what the
  report tests the others against) and ``LABEL_KNOBS`` (knobs a report names in every variant label).

What changes a run's result is the method node as its schema has it: :func:`prepare` drops knobs that belong to
other methods (a cross-method sweep sets them for every job), so a B0 run key never depends on a KD knob.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from types import ModuleType

from hydra.core.config_store import ConfigStore
from omegaconf import open_dict

from kdexp.config import register_base
from kdexp.config.known_keys import check_known_keys
from kdexp.core.checks import check_shared
from kdexp.core.runner import Context
from kdexp.methods import b0, eval_only, kd1, kd2, kd3, kd4
from kdexp.methods.artefacts import Artefact

log = logging.getLogger(__name__)
METHODS: dict[str, ModuleType] = {m.NAME: m for m in (b0, kd1, kd2, kd3, kd4, eval_only)}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} must be one of {', '.join(METHODS)}")
    return METHODS[name]


def knobs(name: str) -> set[str]:
    """The top-level keys of a method's node (its schema's fields)."""
    return {f.name for f in dataclasses.fields(get(name).Config)}


def register_schemas() -> None:
    """The shared ``base_config`` and each method's schema; call before Hydra composes (idempotent)."""
    register_base()
    for name, module in METHODS.items():
        ConfigStore.instance().store(group="method", name=f"{name}_schema", node=module.Config)


def prepare(cfg) -> None:
    """Make the composed ``cfg.method`` exactly its schema's keys, or fail naming the key.

    A key of another method's schema (from a sweep such as ``method=b0,kd2 method.gold_mix=0,0.5``) is dropped with
    a log line; a key of no method is a typo (``+method.alpah=0.3``) and fails with the closest known key.
    """
    own = knobs(get(cfg.method.name).NAME)
    foreign = [k for k in cfg.method if k not in own]
    every = set().union(*(knobs(n) for n in METHODS))
    for key in foreign:
        if key not in every:
            close = difflib.get_close_matches(key, sorted(own), n=1)
            hint = f"; did you mean method.{close[0]}?" if close else ""
            raise ValueError(f"method.{key} is not a key of method={cfg.method.name} (it has: "
                             f"{', '.join(sorted(own - {'name'}))}){hint}")
    if foreign:
        log.info("method=%s does not read %s: dropped from this run (and its run key)", cfg.method.name,
                 ", ".join(f"method.{k}" for k in foreign))
        with open_dict(cfg.method):
            for key in foreign:
                del cfg.method[key]


def validate(cfg) -> None:
    """Every pre-flight check of a composed config: no unknown keys, shared groups, then the method's own knobs."""
    check_known_keys(cfg)
    module = get(cfg.method.name)
    prepare(cfg)
    check_shared(cfg, trains_student=module.TRAINS_STUDENT, loss_weights=module.LOSS_WEIGHTS)
    module.check(cfg)


def teacher_artefacts(ctx: Context) -> list[Artefact]:
    """What a run of ``ctx.cfg`` (validated) needs from the teacher, by its method's ``teacher_artefacts``."""
    return get(ctx.cfg.method.name).teacher_artefacts(ctx)
