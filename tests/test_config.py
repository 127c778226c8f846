"""Every config group option composes; bad values stop the run with a one-line error naming the key."""

import pytest
from omegaconf import OmegaConf

from kdexp.config import CONF_DIR
from kdexp.methods import validate
from tests.conftest import compose_cfg, run_cli

GROUPS = ["teacher", "student", "task", "method", "hardware", "stage", "experiment"]


def _options(group: str) -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    validate(cfg)
    if group != "experiment":
        assert cfg[group].name == option
    OmegaConf.to_object(cfg)  # the structured schema accepts it


def test_real_hub_pair_composes(tmp_path):
    cfg = compose_cfg(["teacher=qwen2.5-3b-instruct", "student=qwen2.5-0.5b-instruct", "task=squad",
                       "hardware=cuda"], tmp_path)
    validate(cfg)
    assert cfg.teacher.path == "Qwen/Qwen2.5-3B-Instruct" and cfg.hardware.dtype == "bfloat16"


@pytest.mark.parametrize("override,key", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-3", "train.lr"),
    ("train.batch_size=-2", "train.batch_size"),
    ("task.max_train_samples=-5", "task.max_train_samples"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("student.arch.num_heads=3", "student.arch.num_heads"),
    ("hardware.device=tpu", "hardware.device"),
    ("task.source=ftp", "task.source"),
])
def test_out_of_range_values_name_the_key(override, key, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_typo_key_is_rejected_at_compose(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_cfg(["train.lrr=0.1"], tmp_path)


@pytest.mark.slow
def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad = run_cli("train.lr=-1", cwd=tmp_path)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "kdexp: config error: train.lr=-1.0 must be > 0"
    assert not list(tmp_path.rglob("results.json"))
    unknown = run_cli("method=kd9", cwd=tmp_path)
    assert unknown.returncode != 0 and "Available options" in unknown.stderr and "b0" in unknown.stderr
    typo = run_cli("train.lrr=1", cwd=tmp_path)
    assert typo.returncode != 0 and "lrr" in typo.stderr


@pytest.mark.slow
def test_cli_help_and_cfg_show_composed_config(tmp_path):
    shown = run_cli("--cfg", "job", "method=b0", "task=squad", cwd=tmp_path)
    assert shown.returncode == 0 and "prompt_template" in shown.stdout and "name: squad" in shown.stdout
    helped = run_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0 and "teacher: tiny" in helped.stdout.replace("teacher:\n", "teacher: tiny")
