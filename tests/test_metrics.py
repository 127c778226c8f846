import warnings

import pytest

from kdexp.core.metrics import accuracy, exact_match_score, f1_score, normalize_answer, squad_scores


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Cat!", "cat"),
        ("  An   apple,\ta pear.  ", "apple pear"),
        # Punctuation is removed before articles, so the hyphen glues "the" onto "cat" and it survives.
        ("the-cat", "thecat"),
        ("Theatre", "theatre"),
        ("A. The; an!", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match_score("The Cat!", "cat") is True
    assert exact_match_score("cats", "cat") is False


def test_f1_partial_overlap_after_article_removal():
    # "quick brown fox" vs "quick fox jumps": 2 shared tokens, precision 2/3, recall 2/3.
    assert f1_score("the quick brown fox", "quick fox jumps") == pytest.approx(2 / 3)


def test_f1_unequal_lengths_and_repeated_tokens():
    # precision 1/3, recall 1 -> 2 * (1/3) / (4/3) = 0.5
    assert f1_score("quick brown fox", "fox") == pytest.approx(0.5)
    # Counter intersection counts "fox" once, not three times.
    assert f1_score("fox fox fox", "fox") == pytest.approx(0.5)


def test_f1_no_overlap_is_zero():
    assert f1_score("red", "blue") == 0.0


def test_answers_that_normalise_to_empty():
    # Official v1.1 behaviour: EM is 1 (both ""), but F1 is 0 because num_same == 0.
    assert exact_match_score("The", "a.") is True
    assert f1_score("The", "a.") == 0.0
    assert squad_scores({"q": "The"}, {"q": ["a."]}) == {"exact_match": 100.0, "f1": 0.0}


def test_squad_scores_max_over_golds_missing_and_scale():
    references = {
        "q1": ["Paris"],
        "q2": ["slow dog", "quick brown fox"],
        "q3": ["1990"],
        "q4": ["blue"],
    }
    predictions = {"q1": "paris.", "q2": "quick fox", "q4": "red", "not-a-question": "ignored"}
    with pytest.warns(UserWarning, match="1 of 4 questions have no prediction"):
        scores = squad_scores(predictions, references)
    # q1: EM 1, F1 1; q2: best gold gives precision 1, recall 2/3 -> F1 0.8; q3 missing: 0; q4: 0.
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8) / 4)


def test_squad_scores_no_warning_when_complete():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = squad_scores({"a": "x", "b": "y"}, {"a": ["x"], "b": ["z"]})
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_squad_scores_rejects_bad_references():
    with pytest.raises(ValueError, match="empty"):
        squad_scores({"q": "x"}, {})
    with pytest.raises(ValueError, match="no gold answers"):
        squad_scores({"q": "x"}, {"q": []})
    with pytest.raises(TypeError, match="list of answer strings"):
        squad_scores({"q": "x"}, {"q": "x"})


def test_accuracy_is_a_fraction():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    assert accuracy([0], [1]) == 0.0


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
