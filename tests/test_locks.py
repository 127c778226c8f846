"""Locks and leftovers on a shared cache: builders in different PID namespaces (two "hosts" sharing cache_dir), lock
files with stale or garbage content, orphan temporaries, checkpoints left by a run that died after registering."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdexp.core.artefacts import build_once
from kdexp.core.resume import checkpoint_dir
from kdexp.experiments.registry import run_key
from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE

BUILDER = """
import sys, time
from pathlib import Path
from kdexp.core.artefacts import build_once

def build(tmp: Path) -> None:
    time.sleep(1.0)  # long enough for the other builder to arrive while this one holds the lock
    tmp.write_text(sys.argv[2])

built = build_once(Path(sys.argv[1]), build, ready=lambda p: p.exists(), what="test artefact")
print("built" if built else "reused")
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and util-linux unshare")
def test_two_builders_in_separate_pid_namespaces_build_once(tmp_path):
    """Both see themselves as pid 1 (what two nodes sharing cache_dir look like to a pid-based lock)."""
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    target = tmp_path / "shared" / "artefact.txt"
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), str(target)]
    procs = [subprocess.Popen([*cmd, name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(out.strip() for out, _ in outs) == ["built", "reused"]
    assert target.read_text() in ("a", "b")
    assert sorted(p.name for p in target.parent.iterdir()) == ["artefact.txt", "artefact.txt.lock"]


@pytest.mark.parametrize("content", ["", "1", str(os.getpid()), "garbage\n\0"])
def test_whatever_a_lock_file_holds_only_a_live_holder_blocks(tmp_path, content):
    target = tmp_path / "artefact.txt"
    Path(f"{target}.lock").write_text(content)  # e.g. left by the old pid-based lock, or truncated
    start = time.monotonic()
    assert build_once(target, lambda tmp: tmp.write_text("x"), ready=lambda p: p.exists(), what="t")
    assert time.monotonic() - start < 5


def test_orphan_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "artefact.txt"
    orphans = [tmp_path / ".artefact.txt.tmp-otherhost-123", tmp_path / ".artefact.txt.tmp-deadbeef"]
    orphans[0].write_text("half")
    orphans[1].mkdir()
    build_once(target, lambda tmp: tmp.write_text("x"), ready=lambda p: p.exists(), what="t")
    assert target.read_text() == "x" and not any(o.exists() for o in orphans)


def test_checkpoints_left_by_a_run_that_died_after_registering_are_cleared(make_cfg):
    cfg = make_cfg(*SMOKE, "method=b0", "eval_teacher=false", "train.save_steps=2", "train.logging_steps=1")
    run(cfg)
    validate(cfg)
    leftover = checkpoint_dir(cfg, run_key(cfg)) / "stage0" / "checkpoint-2"
    leftover.mkdir(parents=True)  # as if the process died between registering and clearing
    (leftover / "trainer_state.json").write_text(json.dumps({}))
    rerun = make_cfg(*SMOKE, "method=b0", "eval_teacher=false", "train.save_steps=2", "train.logging_steps=1",
                     out="again")
    run(rerun)  # a registry skip
    assert (Path(rerun.output_dir) / "reused_results.json").exists()
    assert not checkpoint_dir(cfg, run_key(cfg)).exists()
