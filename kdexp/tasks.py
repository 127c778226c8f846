"""Task data: the same examples from the embedded copies or from the Hugging Face hub, split the same way.

Splits (see docs/design.md):
- ``train``: the training pool minus ``validation``; teachers are prepared on all of it.
- ``validation``: ``task.validation_samples`` carved from the training pool with a fixed seed. Every selection
  (early stopping, sweeps, Optuna) uses it, never ``eval``.
- ``eval``: GLUE SST-2 dev / the last 10 SQuAD articles (hub: the ``validation`` split). Reported metrics only.
- ``student``: the student's labelled subset, ``task.max_train_samples`` drawn from ``train`` with
  ``task.subset_seed`` (fixed across run seeds so that seeds pair), and ``unlabeled``: the next examples of the same
  permutation, disjoint from it, used without gold labels as a KD transfer set.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

SQUAD_EMBEDDED_TRAIN_ARTICLES = 38  # of 48, in file order (SOURCES.md)


@dataclass
class Example:
    id: str
    prompt: str
    # Gold answers: SST-2 the label word; SQuAD every annotated answer text (metrics take the max over them).
    answers: list[str]
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.answers[0]


def _asset(*parts: str):
    return resources.files("kdexp").joinpath("assets", *parts)


def _sst2_rows(path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    reader = csv.reader(io.StringIO(raw.decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    next(reader)  # header: sentence, label
    return [{"idx": i, "sentence": s.strip(), "label": int(lab)} for i, (s, lab) in enumerate(reader)]


def _squad_rows() -> tuple[list[dict], list[dict]]:
    with gzip.open(_asset("squad", "dev-v1.1.jsonl.gz").open("rb"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    titles = list(dict.fromkeys(r["title"] for r in rows))
    train_titles = set(titles[:SQUAD_EMBEDDED_TRAIN_ARTICLES])
    return [r for r in rows if r["title"] in train_titles], [r for r in rows if r["title"] not in train_titles]


def load_raw(task_cfg) -> tuple[list[dict], list[dict]]:
    """(training pool, eval) rows in the hub's schema, from the embedded files or the hub."""
    if task_cfg.source == "hub":
        import datasets  # import here: costs seconds and is only needed for hub data

        ds = datasets.load_dataset(task_cfg.hub_id, task_cfg.hub_config)
        return list(ds["train"]), list(ds["validation"])
    if task_cfg.name == "sst2":
        return _sst2_rows(_asset("sst2", "train.tsv.gz")), _sst2_rows(_asset("sst2", "dev.tsv"))
    if task_cfg.name == "squad":
        return _squad_rows()
    raise ValueError(f"task.name={task_cfg.name!r} has no embedded data; set task.source=hub")


def to_example(row: dict, task_cfg) -> Example:
    if task_cfg.label_words:  # classification
        sentence = row["sentence"].strip()
        return Example(id=str(row.get("idx", sentence)), prompt=task_cfg.prompt_template.format(sentence=sentence),
                       answers=[task_cfg.label_words[row["label"]]], label=int(row["label"]))
    answers = list(dict.fromkeys(row["answers"]["text"]))  # dedupe, keep order: the first is the training target
    return Example(id=row["id"], prompt=task_cfg.prompt_template.format(context=row["context"],
                                                                         question=row["question"]),
                   answers=answers, meta={"title": row.get("title", "")})


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]
    eval: list[Example]
    student: list[Example]
    unlabeled: list[Example]


def load_task(task_cfg, unlabeled_samples: int = 0) -> TaskData:
    pool_rows, eval_rows = load_raw(task_cfg)
    pool = [to_example(r, task_cfg) for r in pool_rows]
    order = list(range(len(pool)))
    # A fixed seed: the validation split must not move when the run seed or the student subset changes.
    random.Random(20240607).shuffle(order)
    n_val = min(task_cfg.validation_samples, len(pool) // 5)
    validation = [pool[i] for i in sorted(order[:n_val])]
    train = [pool[i] for i in sorted(order[n_val:])]

    perm = list(range(len(train)))
    random.Random(task_cfg.subset_seed).shuffle(perm)
    n_student = len(train) if task_cfg.max_train_samples is None else min(task_cfg.max_train_samples, len(train))
    student = [train[i] for i in perm[:n_student]]
    unlabeled = [train[i] for i in perm[n_student:n_student + unlabeled_samples]]

    evaluation = [to_example(r, task_cfg) for r in eval_rows]
    if task_cfg.max_eval_samples is not None and task_cfg.max_eval_samples < len(evaluation):
        picked = sorted(random.Random(task_cfg.subset_seed).sample(range(len(evaluation)), task_cfg.max_eval_samples))
        evaluation = [evaluation[i] for i in picked]
    return TaskData(train=train, validation=validation, eval=evaluation, student=student, unlabeled=unlabeled)
