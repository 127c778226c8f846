"""Tasks as data: the YAML-driven loader reproduces the old hard-coded examples, a task defined only in config runs
end to end, and generation honours ``task.stop_strings``.

The golden values were computed with the implementation that branched on ``task.name`` (before tasks were data).
"""

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdexp.config.schema import TaskConfig
from kdexp.core import metrics
from kdexp.core.evaluate import decode_answers, evaluate_model, stop_token_ids
from kdexp.core.models import build_model, encode, load_tokenizer
from kdexp.core.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "eval", "student", "unlabeled")
HW = OmegaConf.create({"device": "cpu", "dtype": "float32", "eval_batch_size": 4})

# Per task: sha256 over every split's (id, prompt, answers, label), and per split its size and first / last ids.
GOLDEN = {
    "sst2": ("5a26eb42976057fff9d512a67e4b87622449d6447dfa4144dd4375f4697c92e1", {
        "train": (66477, ["0", "1"], "67348"),
        "validation": (872, ["2", "23"], "67252"),
        "eval": (872, ["0", "1"], "871"),
        "student": (500, ["58753", "65884"], "2795"),
        "unlabeled": (10000, ["4858", "42330"], "56365"),
    }),
    "squad": ("fc0949560141fec4f3b5f6998b82125e8e522e04c1a9ce374d0605ba1afaa5ef", {
        "train": (8282, ["56be4db0acb8001400a502ec", "56be4db0acb8001400a502ed"], "572929d56aef051400154b0d"),
        "validation": (300, ["56d9895ddc89441400fdb510", "56bead5a3aeaaa14008c91ed"], "572927d06aef051400154adf"),
        "eval": (300, ["57293b843f37b31900478135", "57293d6d1d046914007791b9"], "5737aafd1c456719005744ff"),
        "student": (500, ["56e1c720e3433e140042316e", "5727f44c2ca10214002d9a34"], "5705e26d75f01819005e76d8"),
        "unlabeled": (1000, ["5725c4c289a1e219009abe44", "56e0c1617aa994140058e6d5"], "572a213e6aef0514001552f0"),
    }),
}


def task_cfg(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml"),
                           overrides)


def rows(examples) -> list:
    return [[ex.id, ex.prompt, ex.answers, ex.label] for ex in examples]


@pytest.fixture(scope="module")
def loaded():
    """Each embedded task loaded once, with its default transfer-set size (the largest split the runs use)."""
    return {name: load_task(cfg, cfg.unlabeled_samples) for name in GOLDEN for cfg in [task_cfg(name)]}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_embedded_tasks_give_the_same_examples_as_before(loaded, name):
    data = loaded[name]
    digest, splits = GOLDEN[name]
    for split, (n, first_ids, last_id) in splits.items():
        examples = getattr(data, split)
        assert len(examples) == n, split
        assert [ex.id for ex in examples[:2]] == first_ids and examples[-1].id == last_id, split
    everything = [[split, rows(getattr(data, split))] for split in SPLITS]
    assert hashlib.sha256(json.dumps(everything).encode()).hexdigest() == digest


def test_embedded_example_contents(loaded):
    sst2, squad = loaded["sst2"], loaded["squad"]
    assert rows(sst2.train[:1]) == [["0", "Review: hide new secretions from the parental units\nSentiment:",
                                     [" negative"], 0]]
    assert rows(sst2.eval[:1]) == [["0", "Review: it 's a charming and often affecting journey .\nSentiment:",
                                    [" positive"], 1]]
    assert rows(sst2.student[:1]) == [["58753", "Review: dull plots\nSentiment:", [" negative"], 0]]
    first = squad.train[0]
    assert first.prompt.startswith("Context: Super Bowl 50 was an American football game")
    assert first.prompt.endswith("\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")
    assert first.answers == ["Denver Broncos"] and first.label is None  # three identical golds, deduplicated
    assert all(len(ex.answers) == len(set(ex.answers)) >= 1 for ex in squad.eval)


def test_hub_rows_give_the_embedded_examples(monkeypatch):
    """source=hub goes through datasets.load_dataset; GLUE's hub sentences end with a space (task.strip_fields)."""
    dev = [{"idx": 0, "sentence": "a charming journey ", "label": 1}, {"idx": 1, "sentence": "dull ", "label": 0}]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda hub_id, hub_config: {"train": dev * 5, "validation": dev}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_task(task_cfg("sst2", source="hub"))
    assert rows(data.eval) == [["0", "Review: a charming journey\nSentiment:", [" positive"], 1],
                               ["1", "Review: dull\nSentiment:", [" negative"], 0]]


# ---- a task that exists only as config --------------------------------------------------------------------------

YES_NO = """
name: sst2_yes_no
loader: sst2                 # reuses the SST-2 rows with another prompt and other label words
prompt_template: "Is this review positive? {sentence}\\nAnswer:"
strip_fields: [sentence]
id_field: idx
answer_field: label
label_words: [" no", " yes"]
metric: accuracy
main_metric: accuracy
answer_extraction: strip
max_eval_samples: 6
validation_samples: 50
max_train_samples: 20
max_prompt_tokens: 64
max_answer_tokens: 4
"""

SQUAD_QA = """
name: squad_question_first
loader: squad
prompt_template: "Q: {question}\\nBackground: {context}\\nA:"
id_field: id
answer_field: answers.text
stop_strings: ["\\n", "."]
answer_extraction: strip
metric: squad
main_metric: exact_match
max_eval_samples: 5
validation_samples: 30
max_train_samples: 10
max_prompt_tokens: 64
max_answer_tokens: 8
max_new_tokens: 6
"""


def yaml_task(text: str, **overrides):
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.create(text), overrides)


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    model_cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "student" / "tiny.yaml"),
                                {"quantization": "none", "revision": None})
    tokenizer = load_tokenizer(model_cfg)
    return build_model(model_cfg, len(tokenizer), 0, HW), tokenizer


def test_config_only_classification_task(tiny):
    task = yaml_task(YES_NO)
    data = load_task(task)
    assert len(data.eval) == 6 and len(data.student) == 20 and len(data.validation) == 50
    ex = data.eval[0]
    assert ex.prompt.startswith("Is this review positive? ") and ex.prompt.endswith("\nAnswer:")
    assert ex.answers == [[" no", " yes"][ex.label]]
    golds = [ex.target for ex in data.eval]
    assert metrics.METRICS[task.metric](golds, data.eval) == {"accuracy": 1.0}
    scores, predictions, _ = evaluate_model(*tiny, data.eval, task, HW, "student")
    assert set(predictions) <= {" no", " yes"}
    assert scores["accuracy"] == metrics.accuracy(predictions, golds) and scores["n_eval"] == 6


def test_config_only_generative_task_and_a_new_metric(tiny, monkeypatch):
    task = yaml_task(SQUAD_QA)
    data = load_task(task)
    ex = data.eval[0]
    assert ex.prompt.startswith("Q: ") and "\nBackground: " in ex.prompt and ex.prompt.endswith("\nA:")
    assert metrics.METRICS["squad"]([e.target for e in data.eval], data.eval) == {"exact_match": 100.0, "f1": 100.0}
    # A new metric is one function and one table entry; the task YAML then names it.
    monkeypatch.setitem(metrics.METRICS, "answer_chars", lambda preds, exs: {"chars": sum(map(len, preds))})
    task.metric, task.main_metric = "answer_chars", "chars"
    scores, predictions, _ = evaluate_model(*tiny, data.eval, task, HW, "student")
    assert len(predictions) == 5 and scores["chars"] == sum(map(len, predictions))
    assert not any("\n" in p or "." in p or p != p.strip() for p in predictions)


def test_unknown_names_fail_with_the_choices(tiny):
    with pytest.raises(ValueError, match="task.loader='nope'"):
        load_task(yaml_task(YES_NO, loader="nope"))
    data = load_task(yaml_task(YES_NO))
    with pytest.raises(ValueError, match="task.metric='nope'.*accuracy"):
        evaluate_model(*tiny, data.eval, yaml_task(YES_NO, metric="nope"), HW, "student")
    with pytest.raises(ValueError, match="task.main_metric='f1'"):
        evaluate_model(*tiny, data.eval, yaml_task(YES_NO, main_metric="f1"), HW, "student")


# ---- stop strings ---------------------------------------------------------------------------------------------

def test_existing_tasks_stop_at_eos_or_newline(tiny):
    _, tokenizer = tiny
    for name in GOLDEN:  # what decoding hard-coded before stop_strings were config
        assert stop_token_ids(tokenizer, task_cfg(name).stop_strings) == [tokenizer.eos_token_id, 198]


def _pick_stop(tokenizer, ids: list[int]) -> tuple[int, str]:
    """A position k >= 2 whose token, decoded alone, is a stop string that first occurs right there."""
    for k in range(2, len(ids)):
        stop = tokenizer.decode([ids[k]])
        before = tokenizer.decode(ids[:k])
        if (stop.strip() and tokenizer(stop, add_special_tokens=False)["input_ids"] == [ids[k]]
                and ids[k] not in ids[:k] and (before + stop).find(stop) == len(before)):
            return k, stop
    raise AssertionError("no usable stop token in the generated text")


def _sample(model, tokenizer, example, task, kwargs: dict, stop_strings=None):
    if stop_strings is not None:
        task.stop_strings = stop_strings
    torch.manual_seed(0)  # sampling: a random tiny model's greedy answer just repeats the prompt's last token
    return decode_answers(model, tokenizer, example, task, 1, kwargs)


def test_decode_answers_stops_at_a_stop_string(tiny):
    model, tokenizer = tiny
    task = task_cfg("squad", stop_strings=[], answer_extraction="strip", max_prompt_tokens=64)
    example = load_task(task).eval[:1]
    sample = {"do_sample": True, "top_k": 0, "temperature": 3.0, "max_new_tokens": 16}
    # Oracle: the same seeded continuation, stopped only by the length limit; a stop cannot change what came first.
    prompt = torch.tensor([encode(example, tokenizer, task, targets=[""])[0].prompt_ids])
    torch.manual_seed(0)
    full = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **sample,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    full = full[0, prompt.shape[1]:].tolist()
    assert tokenizer.eos_token_id not in full and len(full) == 16
    assert _sample(model, tokenizer, example, task, sample) == ([tokenizer.decode(full).strip()], 16)

    k, stop = _pick_stop(tokenizer, full)
    answers, n_tokens = _sample(model, tokenizer, example, task, sample, stop_strings=[stop])
    assert n_tokens == k + 1  # generation ended at the stop token, which counts
    assert answers == [tokenizer.decode(full[:k]).strip()] and stop not in answers[0]


def test_validation_by_group_keeps_every_article_on_one_side(loaded):
    from kdexp.core.tasks import load_raw

    cfg = task_cfg("squad", validation_group="title")
    data = load_task(cfg, cfg.unlabeled_samples)
    pool, _ = load_raw(cfg)
    title = {r["id"]: r["title"] for r in pool}
    val_titles, train_titles = {title[ex.id] for ex in data.validation}, {title[ex.id] for ex in data.train}
    assert val_titles and val_titles.isdisjoint(train_titles)
    # Whole articles until >= validation_samples: the last one taken may overshoot, never by a whole article more.
    sizes = {t: sum(title[ex.id] == t for ex in data.validation) for t in val_titles}
    assert 300 <= len(data.validation) < 300 + max(sizes.values())
    assert len(data.validation) + len(data.train) == len(pool)
    assert rows(data.eval) == rows(loaded["squad"].eval)  # eval does not depend on how validation is carved
    again = load_task(task_cfg("squad", validation_group="title", max_train_samples=7), 0)
    assert rows(again.validation) == rows(data.validation)  # fixed seed: independent of the student subset


def test_validation_group_names_the_key_when_rows_lack_the_field():
    with pytest.raises(ValueError, match=r"task.validation_group='topic' is not a field"):
        load_task(task_cfg("sst2", validation_group="topic"), 0)


def test_validation_group_enters_the_keys_only_when_set(tmp_path):
    from kdexp.core.teacher import teacher_key
    from kdexp.experiments.registry import run_key
    from tests.conftest import compose_cfg

    # The prepared default teacher (and every cache keyed on it) keeps the key it was built under before the key
    # existed; the same holds for the run registry.
    default = compose_cfg(["task=sst2"], tmp_path)
    assert teacher_key(default) == "2db3d8dffdec3dff"
    by_title = compose_cfg(["task=squad_qg", "task.validation_group=title"], tmp_path)
    plain = compose_cfg(["task=squad_qg"], tmp_path)
    assert teacher_key(by_title) != teacher_key(plain) and run_key(by_title) != run_key(plain)
