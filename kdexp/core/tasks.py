"""Task data: the same examples from the embedded copies or from the Hugging Face hub, split the same way.

A task is data (conf/task/<name>.yaml, docs/tasks.md): the YAML names the loader of its embedded copy, the prompt
template and the row fields that hold the id and the gold answer; nothing here knows a task by name.

Splits (see docs/design.md):
- ``train``: the training pool minus ``validation``; teachers are prepared on all of it.
- ``validation``: ``task.validation_samples`` carved from the training pool with a fixed seed, at random or, with
  ``task.validation_group``, as whole groups (articles). Every selection (early stopping, sweeps, Optuna) uses it,
  never ``eval``.
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
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from omegaconf import OmegaConf

SQUAD_EMBEDDED_TRAIN_ARTICLES = 38  # of 48, in file order (SOURCES.md)

Rows = tuple[list[dict], list[dict]]  # (training pool, eval) rows in the hub's schema


@dataclass
class Example:
    id: str
    prompt: str
    # Gold answers: SST-2 the label word; SQuAD every annotated answer text (metrics take the max over them).
    answers: list[str]
    label: int | None = None

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


def load_sst2() -> Rows:
    """GLUE SST-2 train / dev (the hub's ``train`` / ``validation``)."""
    return _sst2_rows(_asset("sst2", "train.tsv.gz")), _sst2_rows(_asset("sst2", "dev.tsv"))


def load_squad() -> Rows:
    """SQuAD v1.1 dev split by article: the hub's dev set is the only one small enough to ship."""
    with gzip.open(_asset("squad", "dev-v1.1.jsonl.gz").open("rb"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    titles = list(dict.fromkeys(r["title"] for r in rows))
    train_titles = set(titles[:SQUAD_EMBEDDED_TRAIN_ARTICLES])
    return [r for r in rows if r["title"] in train_titles], [r for r in rows if r["title"] not in train_titles]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _qg_row(row: dict) -> dict:
    """The sentence(s) of the context that hold the first answer, the answer, and the question to generate."""
    context, answer, start = row["context"], row["answers"]["text"][0], row["answers"]["answer_start"][0]
    # A plain end-punctuation split: an abbreviation ("U.S. Army") may cut a sentence, but the span always
    # covers every sentence the answer touches, so the answer is always inside it.
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(context)] + [len(context)]
    first = max(b for b in bounds[:-1] if b <= start)
    last = min(b for b in bounds[1:] if b >= start + len(answer))
    return {"id": row["id"], "title": row["title"], "sentence": context[first:last].strip(), "answer": answer,
            "question": row["question"].strip()}


def load_squad_qg() -> Rows:
    """Answer-aware question generation on the embedded SQuAD split: (answer sentence(s), answer) -> question."""
    pool, evaluation = load_squad()
    return [_qg_row(r) for r in pool], [_qg_row(r) for r in evaluation]


# task.loader -> the embedded copy of a task's data. A new task with embedded data adds one function and one line.
LOADERS: dict[str, Callable[[], Rows]] = {"sst2": load_sst2, "squad": load_squad, "squad_qg": load_squad_qg}


def load_raw(task_cfg) -> Rows:
    """(training pool, eval) rows in the hub's schema, from the embedded files or the hub."""
    if task_cfg.source == "hub":
        return _hub_rows(task_cfg)
    if task_cfg.source != "embedded":
        raise ValueError(f"task.source={task_cfg.source!r}: expected embedded or hub")
    if task_cfg.loader is None:
        raise ValueError(f"task {task_cfg.name!r} has no embedded data (task.loader is null); set task.source=hub")
    if task_cfg.loader not in LOADERS:
        raise ValueError(f"task.loader={task_cfg.loader!r} is not one of {sorted(LOADERS)} (kdexp/core/tasks.py)")
    try:
        return LOADERS[task_cfg.loader]()
    except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, csv.Error) as err:
        # A damaged install must not surface as a traceback from gzip or csv halfway into a run.
        raise ValueError(f"task.loader={task_cfg.loader}: the embedded data under {_asset(task_cfg.loader)} is "
                         f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         "reinstall kdexp") from None


def _hub_rows(task_cfg) -> Rows:
    import datasets  # import here: costs seconds and is only needed for hub data

    try:
        ds = datasets.load_dataset(task_cfg.hub_id, task_cfg.hub_config)
        return list(ds["train"]), list(ds["validation"])
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, its own DatasetNotFoundError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"task.source=hub: cannot load {task_cfg.hub_id!r} ({task_cfg.hub_config}) from the hub "
                         f"({type(err).__name__}: {first[:200]}); offline, use task.source=embedded") from None


def field_value(row: dict, path: str) -> Any:
    """``row["answers"]["text"]`` for the path ``answers.text``."""
    value = row
    for key in path.split("."):
        value = value[key]
    return value


def example_maker(task_cfg) -> Callable[[dict], Example]:
    """row -> :class:`Example` as the task YAML says. The config is read once here: an OmegaConf attribute read
    costs microseconds, which for SST-2's 67k rows was most of the time spent loading the task."""
    template, id_field, answer_field = task_cfg.prompt_template, task_cfg.id_field, task_cfg.answer_field
    strip_fields, label_words = list(task_cfg.strip_fields), list(task_cfg.label_words)

    def make(row: dict) -> Example:
        # GLUE sentences on the hub end with a space; the embedded copy is stripped already, so both give one prompt.
        row = {**row, **{k: row[k].strip() for k in strip_fields}}
        gold = field_value(row, answer_field)
        prompt = template.format(**row)
        if label_words:  # classification: the answer field holds the index of the gold label word
            return Example(id=str(row[id_field]), prompt=prompt, answers=[label_words[gold]], label=int(gold))
        golds = [gold] if isinstance(gold, str) else gold
        answers = list(dict.fromkeys(golds))  # dedupe, keep order: the first is the training target
        return Example(id=str(row[id_field]), prompt=prompt, answers=answers)

    return make


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]
    eval: list[Example]
    student: list[Example]
    unlabeled: list[Example]


# load_task's splits per (task config, transfer-set size), for the jobs of one sweep process: building SST-2's 67k
# examples is a second of every run, and the same task config always gives the same examples.
_loaded: dict[str, TaskData] = {}


def load_task(task_cfg, unlabeled_samples: int = 0) -> TaskData:
    """The task's splits; a repeat call in this process reuses the examples (new lists, shared :class:`Example`
    objects, which nothing changes)."""
    key = json.dumps([OmegaConf.to_container(task_cfg, resolve=True), unlabeled_samples], sort_keys=True, default=str)
    if key not in _loaded:
        _loaded.clear()  # one task at a time: a sweep over tasks must not hold every task's examples
        _loaded[key] = _load_task(task_cfg, unlabeled_samples)
    data = _loaded[key]
    return TaskData(train=list(data.train), validation=list(data.validation), eval=list(data.eval),
                    student=list(data.student), unlabeled=list(data.unlabeled))


def validation_rows(pool_rows: list[dict], n_val: int, group_field: str | None) -> list[int]:
    """Indices of the pool rows carved out as validation, with a fixed seed (it must not move when the run seed or
    the student subset changes): ``n_val`` rows at random, or with ``group_field`` whole groups in a seeded random
    order until they hold ≥ ``n_val`` rows, so no group has rows on both sides."""
    rng = random.Random(20240607)
    if not group_field:
        order = list(range(len(pool_rows)))
        rng.shuffle(order)
        return sorted(order[:n_val])
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(pool_rows):
        try:
            groups.setdefault(str(field_value(row, group_field)), []).append(i)
        except (KeyError, TypeError):
            raise ValueError(f"task.validation_group={group_field!r} is not a field of the training rows "
                             f"(row fields: {sorted(row)})") from None
    names = sorted(groups)
    rng.shuffle(names)
    picked: list[int] = []
    for name in names:
        if len(picked) >= n_val:
            break
        picked += groups[name]
    if len(picked) == len(pool_rows):
        raise ValueError(f"task.validation_group={group_field!r}: {len(groups)} group(s), too few to leave any for "
                         f"train with validation_samples={n_val}")
    return sorted(picked)


def _load_task(task_cfg, unlabeled_samples: int) -> TaskData:
    pool_rows, eval_rows = load_raw(task_cfg)
    make = example_maker(task_cfg)
    pool = [make(r) for r in pool_rows]
    n_val = min(task_cfg.validation_samples, len(pool) // 5)
    in_validation = set(validation_rows(pool_rows, n_val, task_cfg.get("validation_group")))
    validation = [ex for i, ex in enumerate(pool) if i in in_validation]
    train = [ex for i, ex in enumerate(pool) if i not in in_validation]

    perm = list(range(len(train)))
    random.Random(task_cfg.subset_seed).shuffle(perm)
    n_student = len(train) if task_cfg.max_train_samples is None else min(task_cfg.max_train_samples, len(train))
    student = [train[i] for i in perm[:n_student]]
    unlabeled = [train[i] for i in perm[n_student:n_student + unlabeled_samples]]

    evaluation = [make(r) for r in eval_rows]
    if task_cfg.max_eval_samples is not None and task_cfg.max_eval_samples < len(evaluation):
        picked = sorted(random.Random(task_cfg.subset_seed).sample(range(len(evaluation)), task_cfg.max_eval_samples))
        evaluation = [evaluation[i] for i in picked]
    return TaskData(train=train, validation=validation, eval=evaluation, student=student, unlabeled=unlabeled)
