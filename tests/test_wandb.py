"""logger=wandb: config checks always; an offline W&B run and report when wandb is installed."""

import json
from pathlib import Path

import pytest

from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg


@pytest.mark.parametrize("override,key", [("logger.mode=sometimes", "logger.mode"),
                                          ("logger.name=mlflow", "logger.name")])
def test_bad_logger_values_name_the_key(override, key, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ValueError, match=rf"^{key}="):
        validate(cfg)


def test_logger_is_off_by_default_and_not_part_of_the_run_key(tmp_path):
    from kdexp.experiments.registry import run_key

    default = compose_cfg([], tmp_path)
    assert default.logger.name == "none"
    with_wandb = compose_cfg(["logger=wandb", "logger.mode=disabled"], tmp_path)
    assert with_wandb.logger.project == "kdexp" and run_key(default) == run_key(with_wandb)


@pytest.fixture
def wandb_spy(monkeypatch):
    """Record wandb.init kwargs, everything logged, and each run's summary as it finishes (offline, no network)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {"init": [], "log": [], "summary": []}
    real_init, run_cls = wandb.init, wandb.sdk.wandb_run.Run
    real_log, real_finish = run_cls.log, run_cls.finish

    def init(**kwargs):
        seen["init"].append(kwargs)
        return real_init(**kwargs)

    def log(self, data, *args, **kwargs):
        seen["log"].append(dict(data))
        return real_log(self, data, *args, **kwargs)

    def finish(self, *args, **kwargs):
        seen["summary"].append({k: self.summary[k] for k in self.summary.keys()})
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(run_cls, "log", log)
    monkeypatch.setattr(run_cls, "finish", finish)
    return wandb, seen


@pytest.mark.slow
def test_wandb_offline_run_and_report(wandb_spy, make_cfg, tmp_path):
    wandb, seen = wandb_spy
    cfg = make_cfg(*SMOKE, "logger=wandb", "method=kd1", "method.temperature=4", "method.alpha=0.7", "seed=5")
    run(cfg)
    init = seen["init"][0]
    assert init["mode"] == "offline" and init["name"] == "sst2-kd1-T4-α0.7-s5" and init["job_type"] == "kd1"
    assert init["config"]["method.temperature"] == 4.0 and init["config"]["seed"] == 5
    curves = [d for d in seen["log"] if "train/loss_kd" in d]
    assert curves and all("train/loss_ce" in d for d in curves)  # the Trainer's per-term losses
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())  # local JSON is written too
    summary = seen["summary"][0]
    assert summary["eval/accuracy"] == results["metrics"]["accuracy"]
    assert summary["main/validation_value"] == results["main_metric"]["validation_value"]
    assert summary["diagnostics/top1_agreement"] == results["diagnostics"]["top1_agreement"]
    assert list((Path(cfg.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))

    from kdexp.analysis.report import build

    out = build([Path(cfg.output_dir)], tmp_path / "report")  # W&B on because the run used logger=wandb
    assert seen["init"][-1]["job_type"] == "report"
    table = next(d["main_results"] for d in seen["log"] if "main_results" in d)
    assert isinstance(table, wandb.Table) and [r[table.columns.index("method")] for r in table.data] == \
        ["kd1", "teacher"]
    assert (out / "index.html").exists()
