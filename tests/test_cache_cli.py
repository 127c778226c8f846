"""``python -m kdexp.cache build``: a sweep's teacher artefacts, de-duplicated by content key, built once ahead of
the sweep, so that its runs never load the teacher (docs/sweeps_and_report.md, "Building the caches before a
sweep")."""

import json
from pathlib import Path

import pytest
from conftest import SMOKE, compose_cfg

from kdexp import main as kdexp_main
from kdexp.cache import build as cache_build
from kdexp.cache.__main__ import main
from kdexp.cache.expand import job_configs
from kdexp.core import runner
from kdexp.methods.artefacts import ANSWERS, CACHE, EVALUATION, TEACHER

# 2 temperatures x 2 seeds of KD1: neither is part of any teacher artefact's key.
SWEEP = [*SMOKE, "method=kd1", "method.temperature=1,2", "seed=1,2", "hardware.torch_threads=1"]


def _no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded")

    monkeypatch.setattr(cache_build, "teacher_with_fallback", refuse)
    monkeypatch.setattr(runner, "teacher_with_fallback", refuse)


def _lines(out: str) -> dict[str, list[str]]:
    """Summary lines by kind (the first two words)."""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        kind = " ".join(line.split()[:2])
        if kind in (TEACHER, ANSWERS, CACHE, EVALUATION):
            found.setdefault(kind, []).append(line.split())
    return found


def _build(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["build", *args])
    captured = capsys.readouterr()
    return code, _lines(captured.out), captured.err


def test_the_grid_expands_as_hydra_expands_it(tmp_path):
    jobs = job_configs([*SWEEP, f"cache_dir={tmp_path}"], tmp_path / "out")
    assert [[o for o in job if o.startswith(("method.temperature", "seed"))] for job, _ in jobs] == [
        ["method.temperature=1", "seed=1"], ["method.temperature=1", "seed=2"],
        ["method.temperature=2", "seed=1"], ["method.temperature=2", "seed=2"]]
    assert [(cfg.method.temperature, cfg.seed) for _, cfg in jobs] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all("hydra" not in cfg and cfg.output_dir == str(tmp_path / "out") for _, cfg in jobs)


def test_a_temperature_by_seed_sweep_needs_one_of_each_artefact(tmp_path, capsys, monkeypatch, one_torch_thread):
    _no_model(monkeypatch)
    code, found, _ = _build(capsys, "--dry-run", *SWEEP, f"cache_dir={tmp_path / 'cache'}")
    assert code == 0
    assert sorted(found) == sorted([TEACHER, ANSWERS, CACHE, EVALUATION])
    for kind, rows in found.items():
        assert len(rows) == 1, kind  # one per kind for the 4 runs
        assert rows[0][3] == "missing" and rows[0][5:7] == ["4", "run(s)"]
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing built, nothing prepared


def test_a_bad_override_is_one_line_naming_the_key_before_anything_loads(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("a tokenizer or data was loaded")

    monkeypatch.setattr(cache_build, "load_tokenizer", refuse)
    monkeypatch.setattr(cache_build, "load_task", refuse)
    cache = f"cache_dir={tmp_path / 'cache'}"
    for overrides, key in ((["method.alpha=0.5,1.5"], "method.alpha=1.5"),
                           (["method.alpah=0.3"], "method.alpah"),
                           (["method=kd1,kd9"], "method=kd9")):
        code, _, err = _build(capsys, "--dry-run", *SMOKE, *overrides, cache)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("kdexp.cache: config error: ") and key in err, err


def test_after_build_the_sweeps_runs_never_load_the_teacher(tmp_path, capsys, monkeypatch, one_torch_thread):
    cache = f"cache_dir={tmp_path / 'cache'}"
    code, built, err = _build(capsys, *SWEEP, cache)
    assert code == 0, err
    assert {kind: rows[0][3] for kind, rows in built.items()} == dict.fromkeys([TEACHER, ANSWERS, CACHE, EVALUATION],
                                                                               "built")
    paths = {kind: rows[0][-1] for kind, rows in built.items()}
    assert Path(paths[CACHE]).is_file() and Path(paths[CACHE]).stem == built[CACHE][0][2]

    _no_model(monkeypatch)  # from here on, loading the teacher fails the test
    code, again, err = _build(capsys, *SWEEP, cache)
    assert code == 0, err
    assert {kind: (rows[0][3], rows[0][-1]) for kind, rows in again.items()} == {
        kind: ("reused", paths[kind]) for kind in paths}

    cfg = compose_cfg([*SMOKE, "method=kd1", "method.temperature=2", "seed=2", "hardware.torch_threads=1"], tmp_path)
    cache_file = Path(paths[CACHE]).stat()
    kdexp_main.run(cfg)
    result = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert result["teacher_info"]["loaded"] is False
    assert result["teacher_cache"]["path"] == paths[CACHE]
    assert Path(paths[CACHE]).stat().st_mtime_ns == cache_file.st_mtime_ns  # reused, not rebuilt
    assert result["transfer_answers"]["reused"] and result["transfer_answers"]["path"] == paths[ANSWERS]
    assert result["teacher_info"]["evaluation"] == {"path": paths[EVALUATION], "reused": True}
    assert result["teacher_info"]["path"] == paths[TEACHER]


@pytest.mark.slow
def test_every_method_hook_builds_what_its_run_reads(tmp_path, capsys, monkeypatch, one_torch_thread):
    """B0, KD2 and cross-tokenizer KD1 (ULD, cache on the teacher's tokens) in one sweep: after the build, none of
    their runs loads the teacher, and each reads the files the build listed."""
    sweep = [*SMOKE, "student=tiny_bpe8k", "method=b0,kd1,kd2", "method.divergence=uld", "hardware.torch_threads=1"]
    code, built, err = _build(capsys, *sweep, f"cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    assert {kind: [row[3] for row in rows] for kind, rows in built.items()} == {
        TEACHER: ["built"], EVALUATION: ["built"], ANSWERS: ["built", "built"], CACHE: ["built"]}
    listed = {row[-1] for rows in built.values() for row in rows}
    _no_model(monkeypatch)
    for method in ("b0", "kd1", "kd2"):
        cfg = compose_cfg([*SMOKE, "student=tiny_bpe8k", f"method={method}", "hardware.torch_threads=1",
                           *(["method.divergence=uld"] if method == "kd1" else [])], tmp_path)
        cfg.output_dir = str(tmp_path / method)
        kdexp_main.run(cfg)
        result = json.loads((Path(cfg.output_dir) / "results.json").read_text())
        assert result["teacher_info"]["loaded"] is False and result["teacher_info"]["evaluation"]["reused"]
        read = {result["teacher_info"]["evaluation"]["path"], result.get("teacher_cache", {}).get("path"),
                (result.get("transfer_answers") or {}).get("path"), (result.get("kd2") or {}).get("generations", {})
                .get("path")} - {None}
        assert read <= listed and len(read) == {"b0": 1, "kd1": 3, "kd2": 2}[method], (method, read, listed)
