"""Degenerate outcomes: a run that finished but whose numbers are not a finding.

:func:`detect` looks at one run's results dict and its eval predictions and returns flags such as
``{"code": "single_class", "who": "student", "severity": "degenerate",
"message": "predicts ' positive' for 872/872 eval examples"}``. A flagged run is still recorded; the report marks
it and leaves runs with a ``degenerate`` flag out of significance tests unless asked (``--include-flagged``).

The rules (thresholds are module constants):

- ``single_class``: a classifier (the task has ``label_words``) that predicts one label word for every example.
- ``no_better_than_trivial``: the main metric is at most ε above the best trivial baseline (``trivial``, name →
  metrics dict; for classification also the majority-class rate of the eval examples). ε is
  :data:`EPSILON_POINTS` percentage points of the metric's scale (accuracy on [0, 1]: 0.01; the 0-100 metrics,
  SQuAD EM/F1 and QG ROUGE-L/BLEU: 1.0). Checked for the student and the teacher; at or below the baseline counts.
- ``empty_answers`` / ``constant_answers``: a generator whose answers are empty (after stripping) for at least
  :data:`CONSTANT_SHARE` of the examples, or one and the same non-empty answer for at least that share.
- ``dominant_loss_term`` (severity ``warning``: a cause, not an outcome): in the first logged training entry, the
  largest ``loss_*`` term is at least :data:`DOMINANCE` × every other non-zero term. The logged terms are unweighted;
  pass ``loss_weights`` (term name without ``loss_`` → weight) to compare what each term adds to the loss.
- ``uniform_tail_target`` (severity ``warning``): a cached head + uniform-tail target (``diagnostics`` with
  ``tail_samples`` 0) whose top-k ids hold less than :data:`UNIFORM_TAIL_MASS` of the teacher's mass at the run's T:
  most of the KD target is then the uniform tail, close to label smoothing. On squad_qg at T = 2 the top-64 held 16%
  and KD1 fell below B0 (docs/tasks.md); on SST-2 it holds 37%.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

__all__ = ["CONSTANT_SHARE", "DOMINANCE", "EPSILON_POINTS", "FRACTION_METRICS", "UNIFORM_TAIL_MASS", "detect",
           "is_degenerate", "majority_rate"]

CONSTANT_SHARE = 0.9  # a generator giving one answer (or none) for ≥ 90 % of the examples has not learnt the task
EPSILON_POINTS = 1.0  # "no better than trivial": within one percentage point of the metric's full scale
DOMINANCE = 100.0  # two orders of magnitude: the other terms barely move the gradient
UNIFORM_TAIL_MASS = 0.25  # below a quarter of the mass in the head, the target is mostly the uniform tail
# kdexp.core.metrics: accuracy is a fraction, every other metric (SQuAD EM/F1, QG ROUGE-L/BLEU) is on 0-100.
FRACTION_METRICS = frozenset({"accuracy"})


def _flag(code: str, who: str, message: str, severity: str = "degenerate") -> dict:
    return {"code": code, "who": who, "severity": severity, "message": message}


def is_degenerate(flags: Sequence[Mapping] | None) -> bool:
    """True when any flag is about the outcome (severity ``degenerate``; flags without a severity count too)."""
    return any(f.get("severity", "degenerate") == "degenerate" for f in flags or ())


def majority_rate(examples) -> tuple[str, float]:
    """The most common gold answer (a classifier's label word) and its share of the examples."""
    counts = Counter(ex.answers[0] for ex in examples)
    label, count = counts.most_common(1)[0]
    return label, count / len(examples)


def _constant(predictions: Sequence[str], who: str, classify: bool) -> list[dict]:
    n = len(predictions)
    if not n:
        return []
    if classify:
        values = set(predictions)
        return [_flag("single_class", who, f"predicts {predictions[0]!r} for {n}/{n} eval examples")] \
            if len(values) == 1 else []
    empty = sum(not p.strip() for p in predictions)
    if empty >= CONSTANT_SHARE * n:
        return [_flag("empty_answers", who, f"answers are empty for {empty}/{n} eval examples")]
    answer, count = Counter(p.strip() for p in predictions if p.strip()).most_common(1)[0]
    if count >= CONSTANT_SHARE * n:
        return [_flag("constant_answers", who, f"answers {answer!r} for {count}/{n} eval examples")]
    return []


def _trivial_references(metric: str, task_cfg, eval_examples, trivial: Mapping | None) -> dict[str, float]:
    """Name → the metric's value for each trivial baseline that reports it, and the eval majority-class rate."""
    references = {name: float(m[metric]) for name, m in (trivial or {}).items() if m and m.get(metric) is not None}
    if list(task_cfg.label_words or []) and eval_examples and metric == "accuracy":
        label, rate = majority_rate(eval_examples)
        references[f"majority class {label!r} on eval"] = rate
    return references


def _no_better(value, who: str, metric: str, references: dict[str, float]) -> list[dict]:
    if value is None or not references or not math.isfinite(float(value)):
        return []
    eps = EPSILON_POINTS * (0.01 if metric in FRACTION_METRICS else 1.0)
    name, best = max(references.items(), key=lambda kv: kv[1])
    if float(value) > best + eps:
        return []
    return [_flag("no_better_than_trivial", who, f"{metric} {float(value):.4g} is not more than {eps:g} above the "
                                                 f"trivial baseline ({name}: {best:.4g})")]


def _dominant_term(train_log: Sequence[Mapping] | None, loss_weights: Mapping[str, float] | None) -> list[dict]:
    first = next((e for e in train_log or () if any(k.startswith("loss_") for k in e)), None)
    if first is None:
        return []
    weights = loss_weights or {}
    terms = {k.removeprefix("loss_"): abs(float(v)) * abs(float(weights.get(k.removeprefix("loss_"), 1.0)))
             for k, v in first.items() if k.startswith("loss_") and isinstance(v, int | float) and math.isfinite(v)}
    terms = {k: v for k, v in terms.items() if v > 0}
    if len(terms) < 2:
        return []
    (top, big), *rest = sorted(terms.items(), key=lambda kv: -kv[1])
    small = rest[0][1]
    if big < DOMINANCE * small:
        return []
    weighted = " (weighted)" if loss_weights else ""
    others = ", ".join(f"{k} {v:.3g}" for k, v in rest)
    return [_flag("dominant_loss_term", "student", f"loss term {top} = {big:.3g} at the first logged step is "
                                                   f"{big / small:.0f}x the next ({others}){weighted}", "warning")]


def _uniform_tail(diagnostics: Mapping | None) -> list[dict]:
    d = diagnostics or {}
    mass = d.get("teacher_top_k_mass")
    if d.get("tail_samples") != 0 or mass is None or not math.isfinite(mass) or mass >= UNIFORM_TAIL_MASS:
        return []
    return [_flag("uniform_tail_target", "student", f"the cached KD target keeps {mass:.0%} of the teacher's mass at "
                  f"T={d.get('temperature', float('nan')):g} in its top-{d.get('top_k')} ids and spreads the other "
                  f"{1 - mass:.0%} uniformly (close to label smoothing): try a lower method.temperature, "
                  "method.cache_mode=head_sampled or method.teacher_signal=online", "warning")]


def detect(result: Mapping, *, task_cfg, student_predictions: Sequence[str],
           teacher_predictions: Sequence[str] | None = None, eval_examples=(), trivial: Mapping | None = None,
           loss_weights: Mapping[str, float] | None = None) -> list[dict]:
    """Flags of one run (empty list when nothing looks degenerate); see the module docstring for the rules.

    ``result``: the results dict (reads ``main_metric`` or ``metrics`` / ``teacher_metrics``, and ``train_log``);
    ``student_predictions`` / ``teacher_predictions``: eval-split answers as text, in ``eval_examples`` order;
    ``trivial``: baseline name → metrics dict (``kdexp.core.baselines.trivial_baselines``), or None.
    """
    metric = task_cfg.main_metric
    classify = bool(list(task_cfg.label_words or []))
    main = result.get("main_metric") or {}
    student_value = main.get("value", (result.get("metrics") or {}).get(metric))
    teacher_value = main.get("teacher_value", (result.get("teacher_metrics") or {}).get(metric))
    references = _trivial_references(metric, task_cfg, eval_examples, trivial)
    flags = []
    for who, predictions, value in (("student", student_predictions, student_value),
                                    ("teacher", teacher_predictions, teacher_value)):
        if predictions is None and value is None:
            continue
        found = _constant(list(predictions or []), who, classify)
        # A single-class classifier scores the majority (or minority) rate by construction: one flag says it.
        if not any(f["code"] == "single_class" for f in found):
            found += _no_better(value, who, metric, references)
        flags += found
    return flags + _dominant_term(result.get("train_log"), loss_weights) + _uniform_tail(result.get("diagnostics"))
