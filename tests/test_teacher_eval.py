"""The content-addressed teacher evaluation (kdexp/core/teacher_eval.py) and the lazy teacher (runner.Context):
scored once, verified on every reuse, and a run whose caches are warm never loads the teacher."""

import json
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_cli

from kdexp.core import live
from kdexp.core.diagnostics import eval_diagnostics
from kdexp.core.runner import build_student, setup
from kdexp.core.teacher_eval import RESULT, teacher_evaluation

# A random-weights teacher (nothing to prepare), three disagreement rows.
FAST = [*SMOKE, "teacher.prepare.enabled=false", "num_samples=3"]


def _context(cfg, fail_on_load: bool = False):
    ctx = setup(cfg, Path(cfg.output_dir), "test", need_teacher=True, shared_vocab=True)
    loader, ctx.loads = ctx._teacher_loader, []

    def load():
        if fail_on_load:
            pytest.fail("the teacher was loaded although its evaluation is cached")
        ctx.loads.append(1)
        loader()

    ctx._teacher_loader = load
    return ctx


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [t["id"] for t in ra["tokens"]] == [t["id"] for t in rb["tokens"]]
        for ta, tb in zip(ra["tokens"], rb["tokens"], strict=True):
            assert ta["kl"] == pytest.approx(tb["kl"], abs=1e-5)
            assert ta["teacher_prob"] == pytest.approx(tb["teacher_prob"], abs=1e-6)
            assert [x["id"] for x in ta["teacher_top"]] == [x["id"] for x in tb["teacher_top"]]


def test_scored_once_then_reused_without_loading_the_teacher(make_cfg, one_torch_thread):
    cfg = make_cfg(*FAST)
    ctx = _context(cfg)
    first = teacher_evaluation(ctx, ctx.data.eval)
    assert ctx.loads == [1] and not first.reused and ctx.teacher_loaded
    assert first.metrics["n_eval"] == len(ctx.data.eval) == len(first.predictions) == len(first.topk)
    assert [len(t) for t in first.topk] == [len(s) for s in first.samples] + [1] * (len(first.topk) - 3)

    warm = _context(make_cfg(*FAST), fail_on_load=True)
    second = teacher_evaluation(warm, warm.data.eval)
    assert second.reused and second.path == first.path and not warm.teacher_loaded
    assert second.metrics == first.metrics and second.predictions == first.predictions
    assert second.efficiency == first.efficiency
    assert all(torch.equal(a, b) for a, b in zip(first.topk, second.topk, strict=True))

    # The dashboard's rows from the cached teacher logits are the ones the loaded teacher gives.
    student = build_student(ctx, for_training=False)
    found, rows = eval_diagnostics(student, ctx.tokenizer, ctx.data.eval, cfg.task, cfg.hardware.eval_batch_size,
                                   teacher_topk=second.topk, teacher_samples=second.samples)
    _same_rows(rows, live.disagreement_samples(student, ctx.teacher, ctx.tokenizer, ctx.data.eval, cfg.task, 3))
    assert 0 <= found["top1_agreement"] <= 1 and 0 <= found["top_k_overlap"] <= 1 and found["student_ece"] >= 0


def test_a_changed_evaluation_is_scored_again(make_cfg, one_torch_thread, caplog):
    ctx = _context(make_cfg(*FAST))
    first = teacher_evaluation(ctx, ctx.data.eval)
    result = first.path / RESULT
    data = json.loads(result.read_text())
    data["metrics"]["accuracy"] = 1.0
    result.write_text(json.dumps(data))
    again = _context(make_cfg(*FAST))
    second = teacher_evaluation(again, again.data.eval)
    assert again.loads == [1] and not second.reused and second.metrics == first.metrics
    assert "does not match the checksum" in caplog.text


def test_the_key_follows_the_teacher(make_cfg, one_torch_thread):
    a = _context(make_cfg(*FAST))
    b = _context(make_cfg(*FAST, "teacher.init_seed=7"))
    assert teacher_evaluation(a, a.data.eval).path != teacher_evaluation(b, b.data.eval).path
    assert b.loads == [1]


@pytest.mark.slow
def test_a_warm_cached_kd1_run_never_loads_the_teacher(tmp_path):
    """Two `python -m kdexp` runs in fresh processes: the first prepares and loads the teacher and builds every
    cache; the second loads no teacher and reports the same teacher metrics."""
    runs = []
    for name in ("cold", "warm"):
        proc = run_cli(*SMOKE, "hardware.torch_threads=1", "force=true", f"hydra.run.dir={tmp_path / name}",
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout + proc.stderr + (tmp_path / name / "kdexp.log").read_text()  # Hydra's job log
        runs.append((log, json.loads((tmp_path / name / "results.json").read_text())))
    (cold_log, cold), (warm_log, warm) = runs
    assert "teacher: loading" in cold_log and cold["teacher_info"]["loaded"] is True
    assert "teacher: loading" not in warm_log and warm["teacher_info"]["loaded"] is False
    assert warm["teacher_metrics"] == cold["teacher_metrics"] and warm["teacher_metrics"] is not None
    assert warm["efficiency"]["teacher"] == cold["efficiency"]["teacher"]
    assert warm["teacher_info"]["key"] == cold["teacher_info"]["key"]
    assert (tmp_path / "warm" / live.DISAGREEMENTS).exists()
    for key in ("teacher_top_k_mass", "teacher_tail_mass", "top1_agreement", "top_k_overlap", "student_ece"):
        assert 0 <= warm["diagnostics"][key] <= 1, key
