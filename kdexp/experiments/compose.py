"""Composing configs outside ``python -m kdexp`` (benchmarks, fair_compare, tests): one helper, one registration."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from kdexp import methods
from kdexp.config import CONF_DIR
from kdexp.experiments.sweeps import register_resolvers


def register() -> None:
    """Schemas (shared and per method) and the presets' resolvers; idempotent, needed before any compose."""
    methods.register_schemas()
    register_resolvers()


def compose(overrides: list[str], config_dir: str | None = None, hydra_config: bool = False) -> DictConfig:
    """The config ``python -m kdexp OVERRIDES`` would run, as a DictConfig (``--config-dir`` adds a search path)."""
    register()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*extra, *overrides], return_hydra_config=hydra_config)
