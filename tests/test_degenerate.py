"""Degenerate-run flags (kdexp.core.degenerate) on constructed results: each rule fires on its case and only there."""

from types import SimpleNamespace

import pytest

from kdexp.core.degenerate import CONSTANT_SHARE, detect, is_degenerate, majority_rate
from kdexp.core.tasks import Example

SST2 = SimpleNamespace(main_metric="accuracy", label_words=[" negative", " positive"])
SQUAD = SimpleNamespace(main_metric="f1", label_words=[])
WORDS = SST2.label_words


def _sst2_examples(n_pos: int, n_neg: int) -> list[Example]:
    return [Example(str(i), "p", [WORDS[1]], 1) for i in range(n_pos)] + \
        [Example(str(n_pos + i), "p", [WORDS[0]], 0) for i in range(n_neg)]


def _accuracy(preds, examples) -> float:
    return sum(p == ex.answers[0] for p, ex in zip(preds, examples, strict=True)) / len(examples)


def _result(student: float, teacher: float | None = None, train_log=None) -> dict:
    return {"main_metric": {"name": "accuracy", "value": student, "teacher_value": teacher},
            "train_log": train_log or []}


def _codes(flags) -> set[tuple[str, str]]:
    return {(f["code"], f["who"]) for f in flags}


def test_single_class_classifier_is_flagged_with_the_count():
    examples = _sst2_examples(444, 428)  # the GLUE dev balance: 444/872 positive
    preds = [WORDS[1]] * 872
    teacher = [ex.answers[0] if i % 5 else WORDS[0] for i, ex in enumerate(examples)]  # a teacher that learnt
    flags = detect(_result(_accuracy(preds, examples), _accuracy(teacher, examples)), task_cfg=SST2,
                   student_predictions=preds, teacher_predictions=teacher, eval_examples=examples, trivial=None)
    assert _codes(flags) == {("single_class", "student")}
    assert flags[0]["message"] == "predicts ' positive' for 872/872 eval examples"
    assert is_degenerate(flags)


def test_classifier_near_the_majority_rate_is_flagged_and_a_learning_one_is_not():
    examples = _sst2_examples(600, 400)
    label, rate = majority_rate(examples)
    assert (label, rate) == (WORDS[1], 0.6)
    # Mostly " positive", a few right negatives and as many wrong ones: accuracy = the majority rate, two classes.
    preds = [WORDS[1]] * 600 + [WORDS[0]] * 5 + [WORDS[1]] * 395
    preds[:5] = [WORDS[0]] * 5
    acc = _accuracy(preds, examples)
    assert acc == pytest.approx(0.6)
    flags = detect(_result(acc), task_cfg=SST2, student_predictions=preds, teacher_predictions=None,
                   eval_examples=examples, trivial=None)
    assert _codes(flags) == {("no_better_than_trivial", "student")}
    assert "majority class ' positive' on eval: 0.6" in flags[0]["message"]
    good = [ex.answers[0] for ex in examples[:700]] + [WORDS[1]] * 300  # all 600 positives + 100 negatives right
    acc = _accuracy(good, examples)
    assert acc == pytest.approx(0.7)
    assert detect(_result(acc), task_cfg=SST2, student_predictions=good, teacher_predictions=None,
                  eval_examples=examples, trivial=None) == []


def test_epsilon_boundary_on_accuracy():
    examples = _sst2_examples(50, 50)
    mixed = [WORDS[0], WORDS[1]] * 50
    at = detect(_result(0.51), task_cfg=SST2, student_predictions=mixed, teacher_predictions=None,
                eval_examples=examples, trivial=None)
    above = detect(_result(0.5101), task_cfg=SST2, student_predictions=mixed, teacher_predictions=None,
                   eval_examples=examples, trivial=None)
    assert _codes(at) == {("no_better_than_trivial", "student")} and above == []


def test_generator_empty_and_constant_answers():
    n = 100
    k = int(CONSTANT_SHARE * n)
    empty = [""] * k + ["Paris"] * (n - k)
    flags = detect({"metrics": {"f1": 3.0}}, task_cfg=SQUAD, student_predictions=empty, teacher_predictions=None,
                   eval_examples=[], trivial=None)
    assert _codes(flags) == {("empty_answers", "student")} and f"{k}/{n}" in flags[0]["message"]
    constant = [" the "] * k + [str(i) for i in range(n - k)]
    flags = detect({"metrics": {"f1": 3.0}}, task_cfg=SQUAD, student_predictions=constant, teacher_predictions=None,
                   eval_examples=[], trivial=None)
    assert _codes(flags) == {("constant_answers", "student")} and "'the'" in flags[0]["message"]
    # One short of the threshold: varied enough, nothing flagged.
    varied = [""] * (k - 1) + [str(i) for i in range(n - k + 1)]
    assert detect({"metrics": {"f1": 30.0}}, task_cfg=SQUAD, student_predictions=varied, teacher_predictions=None,
                  eval_examples=[], trivial=None) == []


def test_teacher_no_better_than_a_trivial_baseline_on_a_percent_metric():
    trivial = {"empty answer": {"exact_match": 0.0, "f1": 0.0}, "first context sentence": {"f1": 4.5}}
    result = {"main_metric": {"name": "f1", "value": 20.0, "teacher_value": 5.2}}
    students = [f"answer {i}" for i in range(10)]
    teachers = [f"t {i}" for i in range(10)]
    flags = detect(result, task_cfg=SQUAD, student_predictions=students, teacher_predictions=teachers,
                   eval_examples=[], trivial=trivial)
    # F1 is on 0-100, so ε is one point: 5.2 ≤ 4.5 + 1.0.
    assert _codes(flags) == {("no_better_than_trivial", "teacher")}
    assert "first context sentence: 4.5" in flags[0]["message"]
    result["main_metric"]["teacher_value"] = 5.6
    assert detect(result, task_cfg=SQUAD, student_predictions=students, teacher_predictions=teachers,
                  eval_examples=[], trivial=trivial) == []


def test_empty_teacher_answers_are_flagged_twice_over():
    trivial = {"empty answer": {"f1": 0.0}}
    result = {"main_metric": {"name": "f1", "value": 12.0, "teacher_value": 0.0}}
    flags = detect(result, task_cfg=SQUAD, student_predictions=["a", "b", "c"], teacher_predictions=["", "", ""],
                   eval_examples=[], trivial=trivial)
    assert _codes(flags) == {("empty_answers", "teacher"), ("no_better_than_trivial", "teacher")}


def test_dominant_loss_term_at_the_start():
    examples = _sst2_examples(5, 5)
    good = [ex.answers[0] for ex in examples]
    log = [{"epoch": 0.1}, {"loss": 72.1, "loss_ce": 0.70, "loss_kd": 0.65, "loss_feat": 71.0},
           {"loss": 3.0, "loss_ce": 0.6, "loss_kd": 0.5, "loss_feat": 2.0}]
    flags = detect(_result(1.0, train_log=log), task_cfg=SST2, student_predictions=good, teacher_predictions=None,
                   eval_examples=examples, trivial=None)
    assert _codes(flags) == {("dominant_loss_term", "student")}
    assert flags[0]["severity"] == "warning" and not is_degenerate(flags)
    assert "feat = 71" in flags[0]["message"] and "101x" in flags[0]["message"]
    # Weighted by what each term adds: w_feat = 0.01 brings feat to 0.71, nothing dominates.
    assert detect(_result(1.0, train_log=log), task_cfg=SST2, student_predictions=good, teacher_predictions=None,
                  eval_examples=examples, trivial=None, loss_weights={"feat": 0.01}) == []
    # 99x is below the threshold; a single term or no loss terms cannot dominate anything.
    for entry in ({"loss_ce": 0.7, "loss_feat": 69.3}, {"loss_ce": 0.7}, {"loss": 1.0}):
        assert detect(_result(1.0, train_log=[entry]), task_cfg=SST2, student_predictions=good,
                      teacher_predictions=None, eval_examples=examples, trivial=None) == []


@pytest.mark.parametrize("mass, samples, flagged", [(0.16, 0, True), (0.37, 0, False), (0.16, 64, False),
                                                    (float("nan"), 0, False)])
def test_a_cached_target_that_is_mostly_uniform_tail_is_a_warning(mass, samples, flagged):
    examples = _sst2_examples(5, 5)
    good = [ex.answers[0] for ex in examples]
    result = {**_result(1.0), "diagnostics": {"teacher_top_k_mass": mass, "tail_samples": samples, "top_k": 64,
                                              "temperature": 2.0}}
    flags = detect(result, task_cfg=SST2, student_predictions=good, teacher_predictions=None,
                   eval_examples=examples, trivial=None)
    assert _codes(flags) == ({("uniform_tail_target", "student")} if flagged else set())
    if flagged:  # a cause, not an outcome: the run stays in the significance tests
        assert not is_degenerate(flags) and "16% of the teacher's mass at T=2 in its top-64" in flags[0]["message"]


def test_trivial_baselines_and_the_eval_majority_rate_both_count():
    # kdexp.core.baselines picks the majority class of the student's subset, which may be eval's minority class.
    examples = _sst2_examples(60, 40)
    trivial = {"majority_class": {"accuracy": 0.4}}
    mixed = [WORDS[0], WORDS[1]] * 50
    flags = detect(_result(0.605), task_cfg=SST2, student_predictions=mixed, teacher_predictions=None,
                   eval_examples=examples, trivial=trivial)
    assert _codes(flags) == {("no_better_than_trivial", "student")} and "on eval: 0.6" in flags[0]["message"]
    assert detect(_result(0.62), task_cfg=SST2, student_predictions=mixed, teacher_predictions=None,
                  eval_examples=examples, trivial=trivial) == []
