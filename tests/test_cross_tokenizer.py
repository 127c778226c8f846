"""Cross-tokenizer KD1 (method.divergence=uld): the embedded 8k BPE, alignments on real tokenizers, the config error
of a mismatched pair, and end-to-end runs of both alignments with both teacher signals."""

import json
import math
from types import SimpleNamespace

import pytest

from kdexp.core.alignment import answer_spans, offset_spans, truncate_spans
from kdexp.core.bpe8k import ASSET, VOCAB_SIZE, train_bpe8k
from kdexp.core.models import load_tokenizer
from kdexp.core.tasks import load_squad
from kdexp.main import run
from tests.conftest import SMOKE, results


def _tok(source):
    return load_tokenizer(SimpleNamespace(tokenizer=source, path=None, revision=None, name=source))


@pytest.fixture(scope="module")
def pair():
    return _tok("embedded:bpe8k"), _tok("embedded:gpt2-bpe")


def test_shipped_bpe8k_is_what_the_builder_makes():
    assert train_bpe8k().to_str() == json.dumps(json.loads((ASSET / "tokenizer.json").read_text()),
                                                ensure_ascii=False, separators=(",", ":"))


def test_bpe8k_loads_from_its_embedded_name(pair):
    student, teacher = pair
    assert len(student) == VOCAB_SIZE and student.eos_token == teacher.eos_token == "<|endoftext|>"
    assert student.pad_token_id == student.eos_token_id
    text = "Review: a gripping, funny film\nSentiment: positive café"
    ids = student(text, add_special_tokens=False)["input_ids"]
    assert student.decode(ids) == text and ids != teacher(text, add_special_tokens=False)["input_ids"]


def _answers():
    _, squad_eval = load_squad()
    return [" " + r["answers"]["text"][0] for r in squad_eval[:300]] + [" negative", " positive", " café 東京 naïve"]


def test_truncate_pairs_positions_up_to_the_shorter_answer():
    assert truncate_spans(3, 5) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)] and truncate_spans(0, 2) == []


def test_offset_spans_cover_the_same_text_on_both_sides(pair):
    student, teacher = pair
    differ = 0
    for text in _answers():
        s_ids = student(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"]
        spans = answer_spans(text, student, teacher, len(s_ids), len(t_ids), "offsets")
        assert spans[0][0] == spans[0][2] == 0 and spans[-1][1] == len(s_ids) and spans[-1][3] == len(t_ids)
        for (s0, s1, t0, t1), nxt in zip(spans, spans[1:] + [None], strict=True):
            assert s1 > s0 and t1 > t0 and student.decode(s_ids[s0:s1]) == teacher.decode(t_ids[t0:t1])
            assert nxt is None or (nxt[0], nxt[2]) == (s1, t1)  # contiguous: no token skipped
        differ += len(s_ids) != len(t_ids)
    assert differ > 30  # the pair really tokenizes differently, so the check above is not vacuous


def test_offset_spans_drop_a_truncated_end_and_align_eos(pair):
    student, teacher = pair
    text = " Denver Broncos"
    assert answer_spans(text, student, teacher, 2 + 1, 2 + 1, "offsets", eos=True)[-1] == (2, 3, 2, 3)
    # A truncated student answer: spans stop at the last boundary both sides share.
    offsets_s, offsets_t = [(0, 4), (4, 7), (7, 15)], [(0, 7), (7, 15)]
    assert offset_spans(offsets_s[:2], offsets_t) == [(0, 2, 0, 1)]
    assert offset_spans(offsets_s[:1], offsets_t) == []


def test_kd1_forward_kl_with_a_mismatched_pair_stops_before_any_model_loads(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, "student=tiny_bpe8k")
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    text = str(exit_info.value.code)
    assert "\n" not in text and "share a vocabulary" in text and "method.divergence=uld" in text
    assert not (tmp_path / "cache" / "teachers").exists() and not list(tmp_path.rglob("results.json"))


def test_bad_alignment_is_a_config_error(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, "student=tiny_bpe8k", "method.divergence=uld", "method.alignment=dtw")
    with pytest.raises(SystemExit, match=r"^kdexp: config error: method.alignment='dtw' must be one of truncate, "):
        run(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
@pytest.mark.parametrize("alignment,signal", [("truncate", "cached"), ("offsets", "online"), ("truncate", "online"),
                                              ("offsets", "cached")])
def test_uld_end_to_end(alignment, signal, make_cfg, one_torch_thread):
    cfg = make_cfg(*SMOKE, "method=kd1", "method.divergence=uld", "student=tiny_bpe8k",
                   f"method.alignment={alignment}", f"method.teacher_signal={signal}", "hardware.torch_threads=1")
    run(cfg)
    res = results(cfg)
    assert res["status"] == "complete" and res["student"] == "tiny_bpe8k"
    assert 0 <= res["metrics"]["accuracy"] <= 1 and math.isfinite(res["metrics"]["perplexity"])
    kd = [h["loss_kd"] for h in res["train_log"] if "loss_kd" in h]
    assert kd and all(0 < v <= 2 for v in kd)
    assert res["alignment"]["mode"] == alignment and res["alignment"]["spans"] > 0
    assert ("teacher_cache" in res) == (signal == "cached")
