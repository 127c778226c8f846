"""A sweep's command line → the config of each of its runs, composed as ``python -m kdexp -m OVERRIDES`` composes it.

Hydra's own pieces, in Hydra's order: the master config in MULTIRUN mode (so ``experiment=<preset>`` brings its
``hydra.sweeper.params``), SweepGuard's cross-method knob sharing, the basic sweeper's cartesian product of the
preset's params and the command line, then each job's config from the master (``load_sweep_config``), with the
``hydra`` node removed as Hydra removes it before calling the task function.
"""

from __future__ import annotations

from pathlib import Path

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from kdexp.config import CONF_DIR
from kdexp.experiments.compose import register
from kdexp.experiments.preflight import hydra_error_line
from kdexp.experiments.sweeps import share_method_knobs

CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A sweep whose configs do not compose or validate: one line naming the key."""


def job_configs(overrides: list[str], output_dir: Path) -> list[tuple[list[str], DictConfig]]:
    """(each job's overrides, its composed config with ``output_dir`` set) in the sweep's job order."""
    register()
    jobs, failing = [], overrides
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            master, grid = _grid(loader, overrides)
            for job in grid:
                failing = job  # a job that does not compose is described by its own overrides
                jobs.append((job, loader.load_sweep_config(master, job)))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_describe(err, failing)) from None
    for _, cfg in jobs:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        cfg.output_dir = str(output_dir)  # the runs' own folders are Hydra's; nothing is written there
    return jobs


def _grid(loader, overrides: list[str]) -> tuple[DictConfig, list[list[str]]]:
    """The master config and every job's overrides, as Hydra's multirun and basic sweeper make them."""
    master = loader.load_configuration(CONFIG_NAME, overrides, run_mode=RunMode.MULTIRUN)
    sweeper = master.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        raise ConfigError(f"hydra.sweeper is {sweeper.get('_target_')}: a search proposes its configs as it goes, "
                          "so only a grid (Hydra's basic sweeper) can be expanded ahead of time")
    share_method_knobs(master)  # what SweepGuard does before the sweeper expands the grid
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    lines = params + OmegaConf.to_container(master.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(lines)
    for override in parsed:
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise ConfigError(f"{override.input_line}: only a grid (comma list, range(), choice()) can be expanded "
                              "ahead of time; an interval is for a search sweeper")
    return master, BasicSweeper.split_arguments(parsed, None)[0]


def _describe(err: Exception, overrides: list[str]) -> str:
    """The run's own one-line message for the first job when it has one (it names the key), else Hydra's first line."""
    try:
        first = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0][0]
        line = hydra_error_line(first)
    except (HydraException, OmegaConfBaseException, IndexError):
        line = None
    if line:
        return line.removeprefix("kdexp: config error: ")
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
