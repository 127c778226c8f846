"""task=squad_qg: rows and splits, prompt format, ROUGE-L / BLEU-4 against the libraries, trivial baselines."""

from collections import Counter

import pytest
import sacrebleu
from omegaconf import OmegaConf
from rouge_score import rouge_scorer

from kdexp.core import baselines, metrics
from kdexp.core.models import encode, load_tokenizer
from kdexp.core.tasks import Example, TaskData, load_squad, load_squad_qg, load_task
from kdexp.methods import validate
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def task_cfg():
    return compose_cfg(["task=squad_qg"]).task


@pytest.fixture(scope="module")
def data(task_cfg):
    return load_task(task_cfg, unlabeled_samples=20)


def test_rows_hold_the_answer_sentence_and_keep_squads_article_split():
    pool, evaluation = load_squad_qg()
    squad_pool, squad_eval = load_squad()
    assert [r["id"] for r in pool] == [r["id"] for r in squad_pool]
    assert [r["id"] for r in evaluation] == [r["id"] for r in squad_eval]
    assert {r["title"] for r in pool}.isdisjoint({r["title"] for r in evaluation})
    for row, raw in zip(pool + evaluation, squad_pool + squad_eval, strict=True):
        assert row["answer"] == raw["answers"]["text"][0] and row["answer"] in row["sentence"]
        assert row["sentence"] in raw["context"] and row["question"] == raw["question"].strip()
    first = pool[0]
    assert first["sentence"].startswith("The American Football Conference (AFC) champion Denver Broncos")
    assert first["sentence"].endswith("third Super Bowl title.")
    # The span is a sentence, not the paragraph: on average well under SQuAD's ~750-character contexts.
    assert sum(len(r["sentence"]) for r in pool) / len(pool) < 300


def test_splits_are_deterministic(task_cfg, data):
    again = load_task(task_cfg, unlabeled_samples=20)
    for split in ("train", "validation", "eval", "student", "unlabeled"):
        assert [(e.id, e.prompt, e.answers) for e in getattr(data, split)] == \
               [(e.id, e.prompt, e.answers) for e in getattr(again, split)]
    assert (len(data.validation), len(data.eval), len(data.student), len(data.unlabeled)) == (300, 300, 500, 20)
    ids = [{e.id for e in getattr(data, s)} for s in ("validation", "student", "unlabeled")]
    assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2])


def test_prompt_format_and_encoding(task_cfg, data):
    ex = next(e for e in data.train if e.id == "56be4db0acb8001400a502ec")
    assert ex.prompt == ("Context: The American Football Conference (AFC) champion Denver Broncos defeated the "
                         "National Football Conference (NFC) champion Carolina Panthers 24–10 to earn their third "
                         "Super Bowl title.\nAnswer: Denver Broncos\nQuestion:")
    assert ex.answers == ["Which NFL team represented the AFC at Super Bowl 50?"]
    tok = load_tokenizer(compose_cfg(["task=squad_qg"]).student)
    enc = encode([ex], tok, task_cfg)[0]
    assert tok.decode(enc.answer_ids) == " Which NFL team represented the AFC at Super Bowl 50?" + tok.eos_token


def test_config_composes_and_validates():
    cfg = compose_cfg(["task=squad_qg", "method=b0"])
    validate(cfg)
    with pytest.raises(ValueError, match="task.main_metric"):
        validate(compose_cfg(["task=squad_qg", "method=b0", "task.main_metric=f1"]))


def test_the_task_sets_the_tiny_teachers_recipe_and_only_the_teacher_key_follows_it(tmp_path):
    from kdexp.core.teacher import teacher_key
    from kdexp.experiments.registry import run_key

    qg = compose_cfg(["task=squad_qg", "method=b0"], tmp_path)
    assert OmegaConf.to_container(qg.teacher.prepare, resolve=True) | {"seed": 0} == {
        "enabled": True, "epochs": 4.0, "lr": 2e-3, "batch_size": 16, "max_train_samples": None,
        "weight_decay": 0.01, "warmup_ratio": 0.05, "seed": 0}
    # SST-2 keeps the one-epoch recipe its prepared teachers were built with.
    assert compose_cfg(["task=sst2"]).teacher.prepare.epochs == 1
    longer = compose_cfg(["task=squad_qg", "method=b0", "task.teacher_epochs=5"], tmp_path)
    assert teacher_key(longer) != teacher_key(qg) and run_key(longer) != run_key(qg)
    # The key hashes the resolved recipe, not where it was written: a direct override is the same teacher.
    direct = compose_cfg(["task=squad_qg", "method=b0", "teacher.prepare.epochs=5"], tmp_path)
    assert teacher_key(direct) == teacher_key(longer) and run_key(direct) == run_key(longer)


PREDS = ["What team won the game?", "Who is the chair of the IPCC?", "when was it", ""]
REFS = [["Which team won Super Bowl 50?"], ["Who is the chair of the IPCC?"], ["When was the treaty signed?"],
        ["What is the capital?"]]


def test_metrics_match_the_libraries():
    scores = metrics.qg_scores(PREDS, REFS)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r[0], p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS, strict=True)) / len(PREDS)
    assert scores["rouge_l"] == pytest.approx(100 * rouge)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [[r[0] for r in REFS]]).score)
    assert 0 < scores["bleu"] < scores["rouge_l"] < 100
    perfect = metrics.qg_scores([r[0] for r in REFS], REFS)
    assert perfect == {"rouge_l": pytest.approx(100.0), "bleu": pytest.approx(100.0)}
    # Several references: ROUGE-L takes the best one.
    multi = metrics.qg_scores(["Who is the chair?"], [["What is it?", "Who is the chair?"]])
    assert multi["rouge_l"] == pytest.approx(100.0)
    examples = [Example(id=str(i), prompt="", answers=r) for i, r in enumerate(REFS)]
    assert metrics.task_metric("qg")(PREDS, examples) == scores and metrics.METRIC_KEYS["qg"] == ("rouge_l", "bleu")


def test_generation_baselines(task_cfg, data):
    out = baselines.trivial_baselines(data, task_cfg)
    assert set(out) == {"most_frequent_target", "answer_sentence"}
    top = Counter(e.target for e in data.student).most_common(1)[0][0]
    assert out["most_frequent_target"] == metrics.qg_scores([top] * len(data.eval), [e.answers for e in data.eval])
    sentences = {r["id"]: r["sentence"] for r in load_squad_qg()[1]}
    expected = metrics.qg_scores([sentences[e.id] for e in data.eval], [e.answers for e in data.eval])
    assert out["answer_sentence"] == expected
    # Copying the sentence shares many words with the question; one fixed question shares few.
    assert out["answer_sentence"]["rouge_l"] > out["most_frequent_target"]["rouge_l"] > 0


def test_classification_majority_baseline():
    cfg = OmegaConf.create({"metric": "accuracy", "label_words": [" negative", " positive"], "baseline_fields": {}})
    ex = lambda i, w: Example(id=str(i), prompt="", answers=[w])  # noqa: E731
    train = [ex(0, " positive"), ex(1, " negative"), ex(2, " positive")]
    evaluation = [ex(3, " positive"), ex(4, " negative"), ex(5, " negative"), ex(6, " negative")]
    data = TaskData(train=train, validation=[], eval=evaluation, student=train, unlabeled=[])
    assert baselines.trivial_baselines(data, cfg) == {"majority_class": {"accuracy": 0.25}}
    with pytest.raises(ValueError, match="empty"):
        baselines.trivial_baselines(TaskData([], [], evaluation, [], []), cfg)
