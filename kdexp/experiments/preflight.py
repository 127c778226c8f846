"""What runs before Hydra and before any expensive work: a one-line error for every bad input it can see.

- :func:`hydra_error_line`: Hydra prints its own message for an unknown option (``method=foo``), a misspelled key
  (``train.lrr=1``) or a wrong type (``seed=abc``); composing the same overrides here gives the last line of that
  output, ``kdexp: config error: ...`` naming the key and the choices.
- :func:`check_environment`: what this machine must provide for the config (the device, readable model paths,
  writable output and cache folders), after the config itself validated.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

import torch
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from kdexp.config import CONF_DIR
from kdexp.experiments.compose import compose

# Command-line flags after which the argv is not a plain list of overrides (Hydra handles those itself).
FLAGS = ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--config-dir", "-cd",
         "--config-name", "-cn", "--config-path", "-cp", "--shell-completion", "-sc", "--resolve", "--package", "-p",
         "--run", "-r", "--version", "--experimental-rerun")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _closest_key(full_key: str) -> str:
    parent, _, key = full_key.rpartition(".")
    node = compose([]).get(parent) if parent else compose([])
    keys = list(node.keys()) if OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _describe(err: Exception, overrides: list[str]) -> str:
    if isinstance(err, MissingConfigException):
        for line in overrides:
            group, _, option = line.lstrip("+~").partition("=")
            if (Path(CONF_DIR) / group).is_dir() and option not in _options(group):
                choices = ", ".join(o for o in _options(group) if not o.endswith("_schema"))
                return f"{group}={option} is not an option of {group} (choices: {choices})"
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    full_key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if full_key and isinstance(cause, ConfigKeyError | ConfigAttributeError):  # "Key 'lrr' not in 'TrainConfig'"
        return f"{full_key} is not a key of the config{_closest_key(full_key)}"
    if full_key:
        return f"{full_key}: {first}"
    return first


def hydra_error_line(argv: list[str]) -> str | None:
    """``kdexp: config error: ...`` when these command-line overrides do not compose, else None."""
    if any(arg.split("=", 1)[0] in FLAGS for arg in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        run_dir = Path(compose(overrides, hydra_config=True).hydra.run.dir)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException,
            OmegaConfBaseException) as err:
        return f"kdexp: config error: {_describe(err, overrides)}"
    if not _creatable(run_dir):  # Hydra creates it before kdexp runs, and would fail with a traceback
        return f"kdexp: config error: hydra.run.dir={str(run_dir)!r} cannot be created here (not writable)"
    return None


def _creatable(folder: Path) -> bool:
    """Whether ``folder`` exists as a writable folder or could be made: its nearest existing ancestor must be a
    writable folder (checked without creating anything)."""
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _local_path(path: str) -> bool:
    """A path that names a folder on this machine rather than a hub repo id (``org/name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def _writable(key: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{key}={str(folder)!r} is not writable ({type(err).__name__}: {err.strerror})") from None


def check_environment(cfg) -> None:
    """What this machine must provide for ``cfg``; one-line ValueError naming the key. Runs before any data loads."""
    device = cfg.hardware.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware.device=cuda (hardware={cfg.hardware.name}) needs a CUDA GPU, and torch sees none "
                         "on this machine; use hardware=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("hardware.device=mps needs Apple-silicon MPS, which torch does not see; use hardware=cpu")
    for role in ("teacher", "student"):
        path = cfg[role].path
        if path and _local_path(path) and not Path(os.path.expanduser(path)).is_dir():
            raise ValueError(f"{role}.path={path!r} does not exist (a local model folder; a hub model is 'org/name')")
    _writable("output_dir", Path(cfg.output_dir))
    _writable("cache_dir", Path(cfg.cache_dir))
