"""Trivial baselines on the eval split, reported beside the teacher so a reader sees whether it is worth distilling.

- classification (``task.label_words``): ``majority_class``, the most frequent label of the student's labelled subset;
- generation: ``most_frequent_target``, the most frequent training target (ties: the first seen), for every example;
- every task: ``task.baseline_fields`` (name -> row field), the field's text as the prediction (squad_qg:
  ``answer_sentence``, the answer's sentence as the question).

Each is scored by the task's own metric, so the numbers sit in the same table as the models'.
"""

from __future__ import annotations

from collections import Counter

from kdexp.core.metrics import task_metric
from kdexp.core.tasks import TaskData, field_value, load_raw


def trivial_baselines(data: TaskData, task_cfg) -> dict[str, dict]:
    """``{baseline name: metric dict on data.eval}``; the training side is the student's labelled subset."""
    metric = task_metric(task_cfg.metric)
    if not data.student:
        raise ValueError("trivial_baselines: the student's labelled subset is empty")
    # Counter.most_common keeps first-seen order among ties, so the pick is deterministic.
    top = Counter(ex.target for ex in data.student).most_common(1)[0][0]
    name = "majority_class" if task_cfg.label_words else "most_frequent_target"
    out = {name: metric([top] * len(data.eval), data.eval)}
    fields = dict(task_cfg.get("baseline_fields") or {})
    if fields:
        _, eval_rows = load_raw(task_cfg)
        by_id = {str(field_value(r, task_cfg.id_field)): r for r in eval_rows}
        for baseline, row_field in fields.items():
            predictions = [str(field_value(by_id[ex.id], row_field)) for ex in data.eval]
            out[baseline] = metric(predictions, data.eval)
    return out
