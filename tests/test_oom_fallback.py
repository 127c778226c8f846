"""teacher.fallback: an out-of-memory teacher is replaced once by the fallback preset, and results.json says so."""

import json
import logging
from pathlib import Path

import pytest
import torch

from kdexp.core import teacher as teacher_module
from kdexp.core.teacher import prepare_teacher
from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg

# A small teacher preset, written where the fallback lookup reads presets (monkeypatched to tmp_path).
SMALL = """name: tiny-small
path: null
tokenizer: embedded:gpt2-bpe
arch: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_position_embeddings: 512}
init_seed: 7
prepare: {enabled: true, epochs: 1, lr: 2e-3, batch_size: 16, max_train_samples: 64}
"""


@pytest.fixture
def presets(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "tiny-small.yaml").write_text(SMALL)
    monkeypatch.setattr(teacher_module, "preset_path", lambda name: folder / f"{name}.yaml")
    return folder


def _oom_for(name: str, calls: list, error=None):
    def fake(cfg, tokenizer, data):
        calls.append(cfg.teacher.name)
        if cfg.teacher.name == name:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return prepare_teacher(cfg, tokenizer, data)

    return fake


def test_oom_teacher_falls_back_once_and_records_it(make_cfg, presets, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr("kdexp.core.teacher.prepare_teacher", _oom_for("tiny", calls))
    cfg = make_cfg(*SMOKE, "method=kd1", "teacher.fallback=tiny-small")
    with caplog.at_level(logging.WARNING):
        run(cfg)
    res = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    info = res["teacher_info"]
    assert calls == ["tiny", "tiny-small"]
    assert info["fallback_used"] and info["requested_teacher"] == "tiny" and info["used_teacher"] == "tiny-small"
    assert info["oom_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert res["teacher"] == "tiny-small" and res["config"]["teacher"]["name"] == "tiny"
    assert res["teacher_metrics"] is not None and res["teacher_cache"]["tokens"] > 0
    assert "teacher tiny ran out of memory" in caplog.text and "teacher.fallback=tiny-small" in caplog.text


def test_cuda_oom_runtime_error_counts_too_but_other_errors_do_not(make_cfg, presets, monkeypatch):
    calls = []
    monkeypatch.setattr("kdexp.core.teacher.prepare_teacher",
                        _oom_for("tiny", calls, RuntimeError("CUDA error: out of memory")))
    run(make_cfg(*SMOKE, "method=b0", "teacher.fallback=tiny-small", out="a"))
    assert calls == ["tiny", "tiny-small"]
    monkeypatch.setattr("kdexp.core.teacher.prepare_teacher", _oom_for("tiny", [], RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(make_cfg(*SMOKE, "method=b0", "teacher.fallback=tiny-small", "force=true", out="b"))


def test_without_fallback_or_when_the_fallback_also_fails_the_oom_propagates(make_cfg, presets, monkeypatch):
    monkeypatch.setattr("kdexp.core.teacher.prepare_teacher", _oom_for("tiny", []))
    with pytest.raises(torch.OutOfMemoryError):
        run(make_cfg(*SMOKE, "method=kd1", out="none"))
    calls = []

    def both(cfg, tokenizer, data):
        calls.append(cfg.teacher.name)
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr("kdexp.core.teacher.prepare_teacher", both)
    cfg = make_cfg(*SMOKE, "method=kd1", "teacher.fallback=tiny-small", out="both")
    with pytest.raises(torch.OutOfMemoryError):
        run(cfg)
    assert calls == ["tiny", "tiny-small"] and not (Path(cfg.output_dir) / "results.json").exists()


@pytest.mark.parametrize("fallback,message", [
    ("nope", "teacher.fallback='nope' is not a teacher preset"),
    ("tiny", "teacher.fallback='tiny' is the teacher itself"),
])
def test_bad_fallback_names_are_one_line_errors(fallback, message, tmp_path):
    with pytest.raises(ValueError) as err:
        validate(compose_cfg([f"teacher.fallback={fallback}"], tmp_path))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
