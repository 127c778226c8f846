"""hardware=ddp: a 2-process gloo run on CPU under torchrun completes, exits 0 and writes exactly one results.json;
the preset refuses to run without a launcher, and a launcher without the preset is refused too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdexp.main import run
from tests.conftest import ROOT, SMOKE

DDP_CPU = ["hardware=ddp", "hardware.device=cpu", "hardware.dtype=float32", "hardware.dataloader_num_workers=0"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=kd1"], ["method=kd4", "method.lmbda=1"]], ids=["kd1", "kd4"])
def test_two_process_gloo_run_writes_one_results_json(tmp_path, method):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "KDEXP_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "kdexp", *SMOKE, *method,
                           *DDP_CPU], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = list(tmp_path.rglob("results.json"))
    assert len(found) == 1, found
    res = json.loads(found[0].read_text())
    assert res["status"] == "complete" and res["config"]["hardware"]["distributed"]
    # 64 prompts, 16 per process and step, 2 processes: 2 optimizer steps per epoch instead of 4.
    assert res["stages"][0]["world_size"] == 2 and res["stages"][0]["steps"] == 2
    assert len(list((tmp_path / "cache" / "runs").glob("*.json"))) == 1  # one registry entry
    assert (found[0].parent / "student" / "model.safetensors").exists()
    if "kd4" in res:  # every step sampled from the DDP-wrapped student on both ranks, and the teacher scored it
        kd4 = res["kd4"]
        assert kd4["steps"] == kd4["on_policy_steps"] == res["stages"][0]["steps"] == 2
        assert kd4["mean_sampled_len"] > 0 and len(kd4["sample_hashes"]) == 2


def test_ddp_preset_without_a_launcher_is_a_one_line_error(make_cfg, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = make_cfg(*SMOKE, *DDP_CPU)
    with pytest.raises(SystemExit) as err:
        run(cfg)
    message = str(err.value.code)
    assert message.startswith("kdexp: config error: hardware.distributed=true (hardware=ddp) needs a distributed "
                              "launcher: torchrun") and "\n" not in message
    assert not Path(cfg.output_dir, "results.json").exists()


def test_launcher_without_ddp_preset_is_refused(make_cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="hardware.distributed=false but launched with WORLD_SIZE=2"):
        run(make_cfg(*SMOKE))
