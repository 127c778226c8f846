"""The layout's rules, checked: imports go one way (import-linter contract in pyproject.toml), no import cycles, and
only the methods package (and the benchmarks of named methods) names a method."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from kdexp.experiments.registry import run_key
from kdexp.methods import METHODS, prepare, validate
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath)}
    return subprocess.run(LINT, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contract_is_kept():
    proc = _lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_import_contract_catches_an_upward_import(tmp_path):
    """A core module importing the entry point (what five modules did for CONF_DIR) breaks the contract."""
    shutil.copytree(ROOT / "kdexp", tmp_path / "kdexp", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    losses = tmp_path / "kdexp" / "core" / "losses.py"
    losses.write_text(losses.read_text() + "\n\ndef _conf_dir():\n    from kdexp.main import CONF_DIR\n\n"
                      "    return CONF_DIR\n")
    proc = _lint(tmp_path, tmp_path)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout
    assert "kdexp.core.losses -> kdexp.main" in proc.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("kdexp")
    cycles = [(m, n) for m in sorted(graph.modules) for n in graph.find_modules_directly_imported_by(m)
              if graph.chain_exists(importer=n, imported=m)]
    assert cycles == []


def test_only_the_methods_package_names_a_method():
    # "eval" is also a split's name ("eval" metrics, the eval rows), so only comparisons with method.name catch it.
    names = "|".join(name for name in METHODS if name != "eval")
    pattern = re.compile(rf"""["']({names})["']|method(\.name)?\s*[=!]=\s*["']""")
    offenders = []
    for path in (ROOT / "kdexp").rglob("*.py"):
        rel = path.relative_to(ROOT / "kdexp").as_posix()
        if rel.startswith(("methods/", "bench/")):  # bench: benchmarks of named methods
            continue
        offenders += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]
    assert offenders == []


def test_a_knob_of_another_method_is_dropped_and_not_part_of_the_run_key(tmp_path):
    keys = set()
    for gold_mix in (0.0, 0.5):
        cfg = compose_cfg(["method=b0", f"++method.gold_mix={gold_mix}", "++method.temperature=3"], tmp_path)
        validate(cfg)
        assert set(cfg.method) == {"name"}
        keys.add(run_key(cfg))
    assert len(keys) == 1


def test_a_typo_in_a_method_key_is_rejected_with_the_closest_key(tmp_path):
    cfg = compose_cfg(["method=kd1", "+method.alpah=0.3"], tmp_path)
    with pytest.raises(ValueError, match=r"^method\.alpah is not a key of method=kd1 .*did you mean method\.alpha\?$"):
        prepare(cfg)


@pytest.mark.slow
def test_b0_trains_once_per_seed_in_a_sweep_over_another_methods_knob(tmp_path):
    """`--multirun method=b0,kd2 method.gold_mix=0,0.5`: 8 jobs, B0 trained once per seed (the other B0 jobs are
    registry skips), KD2 once per (gold_mix, seed)."""
    env = {"KDEXP_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdexp", "--multirun", "experiment=smoke", "method=b0,kd2",
                           "method.gold_mix=0,0.5", "seed=1,2", "hardware.torch_threads=1", "eval_teacher=false",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("results.json")]
    skipped = list((tmp_path / "sweep").rglob("reused_results.json"))
    assert sorted((r["method"], r["seed"]) for r in trained if r["method"] == "b0") == [("b0", 1), ("b0", 2)]
    assert sum(r["method"] == "kd2" for r in trained) == 4 and len(skipped) == 2
    assert all("gold_mix" not in r["config"]["method"] for r in trained if r["method"] == "b0")
