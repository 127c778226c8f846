"""Task metrics: SQuAD v1.1 exact match / F1, classification accuracy, ROUGE-L / BLEU-4 for generation.

The SQuAD functions reproduce the official ``evaluate-v1.1.py`` script exactly, so numbers reported
here are comparable with published SQuAD v1.1 results.

:data:`METRICS` is what a task YAML's ``metric`` names: a new metric is one function and one line there.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from kdexp.core.tasks import Example

__all__ = ["METRICS", "accuracy", "exact_match_score", "f1_score", "normalize_answer", "qg_scores", "squad_scores",
           "task_metric"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation, drop articles and collapse whitespace (official SQuAD v1.1)."""
    # The order matters and is the official one: punctuation goes before articles, so "the-cat" becomes
    # "thecat" (no article left), and articles are only matched after lower-casing.
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """True when the two answers are identical after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised answers (official SQuAD v1.1 definition)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    # Deliberately identical to the official script: no shared token means F1 = 0, and that includes the
    # case where both answers normalise to the empty string (e.g. "The" vs "a."), even though exact match
    # is True there. Special-casing it would make our F1 incomparable with published v1.1 numbers.
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _max_over_ground_truths(metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]):
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 on a 0-100 scale, averaged over the questions in ``references``.

    ``references`` maps question id -> list of gold answer strings; each question scores the best match
    over its golds. As in the official script, a question without a prediction scores 0 (a warning says
    how many), and predictions for ids not in ``references`` are ignored.
    """
    if not references:
        raise ValueError("references is empty: no questions to score")
    exact_match = f1 = 0.0
    missing = 0
    for qid, ground_truths in references.items():
        # A bare string would be iterated character by character and silently give wrong scores.
        if isinstance(ground_truths, str):
            raise TypeError(f"references[{qid!r}] must be a list of answer strings, not a str")
        if len(ground_truths) == 0:
            raise ValueError(f"references[{qid!r}] has no gold answers")
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        exact_match += _max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += _max_over_ground_truths(f1_score, prediction, ground_truths)
    if missing:
        warnings.warn(
            f"{missing} of {len(references)} questions have no prediction and score 0", UserWarning, stacklevel=2
        )
    total = len(references)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Fraction (in [0, 1], not a percentage) of positions where ``predictions[i] == labels[i]``."""
    if len(predictions) != len(labels):
        raise ValueError(f"length mismatch: {len(predictions)} predictions vs {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    correct = sum(bool(p == y) for p, y in zip(predictions, labels, strict=True))
    return correct / len(labels)


# ---- the table a task's ``metric`` names ---------------------------------------------------------------------------
# Each entry scores text predictions (one per example, in order) against the examples' gold answers.

def _accuracy_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    # A classification task's one gold answer is its label word, and label words are distinct, so comparing the
    # words gives the same number as comparing label indices.
    return {"accuracy": accuracy(predictions, [ex.target for ex in examples])}


def _squad_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    return squad_scores({ex.id: p for ex, p in zip(examples, predictions, strict=True)},
                        {ex.id: ex.answers for ex in examples})


def qg_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-L F1 (``rouge-score``, Porter stemming, best over the references, averaged) and corpus BLEU-4
    (``sacrebleu`` defaults: 13a tokenisation, "exp" smoothing), both on a 0-100 scale."""
    # Imported here: rouge-score pulls in nltk and scipy.stats (~3 s), and only generation tasks score with it.
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(f"qg_scores: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
                for pred, refs in zip(predictions, references, strict=True))
    # sacrebleu takes one stream per reference position; repeating an example's first reference changes nothing.
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams).score
    return {"rouge_l": 100.0 * rouge / len(references), "bleu": bleu}


def _qg_scores(predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    return qg_scores(predictions, [ex.answers for ex in examples])


METRICS: dict[str, Callable[[Sequence[str], Sequence[Example]], dict[str, float]]] = {
    "accuracy": _accuracy_scores,  # -> accuracy in [0, 1]
    "squad": _squad_scores,  # -> exact_match, f1 on a 0-100 scale
    "qg": _qg_scores,  # -> rouge_l, bleu (BLEU-4) on a 0-100 scale
}


# The scores each metric returns: what ``task.main_metric`` may name (checked before any model loads).
METRIC_KEYS: dict[str, tuple[str, ...]] = {"accuracy": ("accuracy",), "squad": ("exact_match", "f1"),
                                           "qg": ("rouge_l", "bleu")}


def task_metric(name: str) -> Callable[[Sequence[str], Sequence[Example]], dict[str, float]]:
    """The scoring function a task YAML's ``metric`` names."""
    if name not in METRICS:
        raise ValueError(f"task.metric={name!r} is not one of {sorted(METRICS)} (kdexp/core/metrics.py)")
    return METRICS[name]
