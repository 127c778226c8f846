"""Encoded features, content-addressed (kdexp/core/features.py), and the finer timings runs record."""

import json
import time

import pytest

from kdexp import main
from kdexp.core import features
from kdexp.core.models import encode, load_tokenizer
from kdexp.core.tasks import Example
from tests.conftest import SMOKE, compose_cfg, results


@pytest.fixture
def setting(tmp_path):
    cfg = compose_cfg(["method=b0"])
    examples = [Example(id=str(i), prompt=f"Review: film number {i} was {'good' * (i % 3)}\nSentiment:",
                        answers=[" positive" if i % 2 else " negative"], label=i % 2)
                for i in range(features.MIN_CACHED + 6)]
    features.clear_memo()
    features.use_dir(tmp_path / "features")
    yield load_tokenizer(cfg.student), cfg.task, examples, tmp_path / "features"
    features.use_dir(None)
    features.clear_memo()


def rows(encoded) -> list:
    return [(e.prompt_ids, e.answer_ids, e.index, e.labelled) for e in encoded]


def test_round_trip_memo_and_disk(setting):
    tok, task, examples, folder = setting
    first = encode(examples, tok, task)
    files = list(folder.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["n"] == len(examples)
    first[0].prompt_ids.append(-1)  # a caller changing its copy must not change the next caller's
    first[0].index = 99
    again = encode(examples, tok, task)
    assert again[0].index == 0 and -1 not in again[0].prompt_ids
    features.clear_memo()
    from_disk = encode(examples, tok, task, labelled=False)
    assert [r[:3] for r in rows(from_disk)] == [r[:3] for r in rows(again)] and not from_disk[0].labelled
    features.use_dir(None)
    features.clear_memo()
    assert rows(encode(examples, tok, task)) == rows(again)  # tokenised afresh: the same ids


def test_corrupted_file_is_rebuilt(setting, caplog):
    tok, task, examples, folder = setting
    good = rows(encode(examples, tok, task))
    path = next(folder.glob("*.json"))
    stored = json.loads(path.read_text())
    stored["rows"][0][0][0] += 1  # valid JSON, wrong ids: only the checksum can tell
    path.write_text(json.dumps(stored))
    features.clear_memo()
    assert features.read(path, stored["key"]) is None
    assert rows(encode(examples, tok, task)) == good
    assert "rebuilt encoded features" in caplog.text
    assert features.read(path, stored["key"]) is not None
    path.write_text(path.read_text()[:100])  # truncated
    features.clear_memo()
    assert rows(encode(examples, tok, task)) == good


def test_key_changes_with_what_the_rows_depend_on(setting):
    tok, task, examples, _ = setting
    pairs, targets = [(e.id, e.prompt) for e in examples], [e.target for e in examples]
    key = features.features_key(tok, task, pairs, targets)
    assert key == features.features_key(tok, task, pairs, targets)
    shorter = compose_cfg(["method=b0", "task.max_prompt_tokens=8"]).task
    assert features.features_key(tok, shorter, pairs, targets) != key
    assert features.features_key(tok, task, pairs[:-1] + [("x", pairs[-1][1])], targets) != key
    assert features.features_key(tok, task, pairs, [" negative"] * len(targets)) != key


def test_results_have_the_finer_timings(make_cfg):
    cfg = make_cfg(*SMOKE, "method=b0", "eval_teacher=false")
    main.run(cfg)
    timings = results(cfg)["timings_s"]
    assert {"setup_s", "train_s", "evaluate_s", "tokenizer_s", "data_s", "build_student_s", "evaluate_student_s",
            "validation_s", "diagnostics_s", "save_s", "teacher_eval_s", "preflight_s"} <= set(timings)
    assert "startup_s" not in timings  # an in-process run has no process start-up of its own


def test_cli_first_run_reports_process_startup():
    main._startup["pending"] = True
    found = main.startup_timings(time.time())
    assert found["startup_s"] >= found["imports_s"] > 0
    assert main.startup_timings(time.time()) == {}  # later jobs of the same process
