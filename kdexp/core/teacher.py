"""The teacher: preparation (fine-tune once, store content-addressed under ``cache_dir/teachers/<key>``, reuse
forever), its identity for cache keys, and the out-of-memory fallback to a smaller preset (``teacher.fallback``).

The key hashes everything that determines the prepared weights (model source and architecture, init seed,
tokenizer, task data and formatting, preparation hyper-parameters, dtype). A tiny teacher has no pretrained weights,
so this is how it becomes worth distilling; a hub teacher can be fine-tuned the same way (teacher.prepare.enabled).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from transformers import TrainerCallback

from kdexp.config import CONF_DIR, later_task_keys
from kdexp.config.schema import TeacherConfig
from kdexp.core.artefacts import atomic_write_json, build_once, content_hash
from kdexp.core.distributed import outside_process_group
from kdexp.core.models import build_model, encode, load_saved, load_tokenizer, tokenizer_source
from kdexp.core.tasks import TaskData
from kdexp.core.training import train_model, training_args

log = logging.getLogger(__name__)
MARKER = "kdexp_teacher.json"
# What loading a prepared teacher reads as weights; the marker records each one's SHA-256 (docs/design.md).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json")
# What decides the examples and their encoding (so the teacher's training data, answers and logits).
TASK_DATA_KEYS = ("name", "source", "hub_id", "hub_config", "loader", "prompt_template", "id_field", "answer_field",
                  "strip_fields", "label_words", "stop_strings", "answer_extraction", "append_eos",
                  "validation_samples", "max_prompt_tokens", "max_answer_tokens")


def task_identity(task_cfg) -> dict:
    task = OmegaConf.to_container(task_cfg, resolve=True)
    return {**{k: task[k] for k in TASK_DATA_KEYS}, **later_task_keys(task)}


def teacher_spec(cfg) -> dict:
    t = OmegaConf.to_container(cfg.teacher, resolve=True)
    return {
        "model": {k: t[k] for k in ("path", "revision", "arch", "init_seed")},
        # The configured name, not the resolved path: the embedded tokenizer lives wherever kdexp is installed.
        "tokenizer": t["tokenizer"] or t["path"],
        "task": task_identity(cfg.task),
        "prepare": t["prepare"],
        "dtype": cfg.hardware.dtype,
        "format": 1,
    }


def teacher_key(cfg) -> str:
    return content_hash(teacher_spec(cfg))


def teacher_identity(cfg) -> str:
    """What determines the teacher's outputs, without loading it: the prepared-teacher key or the model source."""
    if cfg.teacher.prepare.enabled:
        return teacher_key(cfg)
    if cfg.teacher.path is None and cfg.teacher.init_seed is None:  # random weights drawn from the run seed
        return content_hash({**teacher_spec(cfg), "seed": cfg.seed})
    return cfg.teacher.path or content_hash(teacher_spec(cfg))


def prepare_teacher(cfg, tokenizer, data: TaskData):
    """Return (teacher model in eval mode, info dict for results.json)."""
    t_cfg = cfg.teacher
    if not t_cfg.prepare.enabled:
        model = build_model(t_cfg, len(tokenizer), seed=cfg.seed, hw_cfg=cfg.hardware)
        if t_cfg.path is None:
            log.warning("teacher %s has random weights (teacher.prepare.enabled=false)", t_cfg.name)
        return model.eval(), {"source": t_cfg.path or "random-init", "prepared": False}

    key = teacher_key(cfg)
    target = Path(cfg.cache_dir) / "teachers" / key
    built = build_once(target, lambda tmp: _train_teacher(cfg, tokenizer, data, tmp), ready=_verified,
                       what=f"prepared teacher {key}")
    if not built:
        log.info("teacher: reusing prepared teacher %s", target)
    info = {"key": key, "path": str(target), "prepared": True, **json.loads((target / MARKER).read_text()),
            "reused": not built}
    try:
        model = load_saved(str(target), cfg.hardware)
    except (SafetensorError, OSError) as err:  # its checksums matched just now, so this is not a damaged file
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"prepared teacher {target} cannot be loaded ({type(err).__name__}: {first}); "
                         "delete that directory to prepare it again") from err
    return model.eval(), info


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weight_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every weight file in ``folder`` (``WEIGHT_FILES``), by file name."""
    names = sorted({p.name for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern)})
    return {name: file_sha256(Path(folder) / name) for name in names}


def unverified_reason(folder: Path) -> str | None:
    """Why the prepared teacher in ``folder`` must not be loaded (None: its marker parses and every weight file
    matches the SHA-256 recorded at preparation). Hashing costs one read of the weights (docs/design.md)."""
    try:
        files = json.loads((Path(folder) / MARKER).read_text()).get("files")
    except FileNotFoundError:
        return f"it has no {MARKER} (its preparation did not finish)"
    except (OSError, ValueError, AttributeError) as err:
        return f"its {MARKER} is malformed ({type(err).__name__}: {err})"
    if not isinstance(files, dict) or not files:
        return f"its {MARKER} records no weight checksums (prepared by an older kdexp version)"
    found = weight_digests(folder)
    bad = sorted(name for name in files.keys() | found.keys() if files.get(name) != found.get(name))
    return f"its weight files {', '.join(bad)} do not match the checksums in {MARKER}" if bad else None


def _verified(folder: Path) -> bool:
    if not folder.exists():
        return False
    reason = unverified_reason(folder)
    if reason is not None:
        log.warning("prepared teacher %s is not usable: %s; preparing it again", folder, reason)
    return reason is None


class PreparationEta(TrainerCallback):
    """One log line with the time left, once the first steps have measured the pace (a first run takes minutes)."""

    def __init__(self, after_s: float = 10.0):
        self.after_s, self.start, self.said = after_s, None, False

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.start = self.start or now  # from the end of step 1: the first step pays for warm-up
        if self.said or now - self.start < self.after_s or state.global_step < 2:
            return
        self.said = True
        left = (now - self.start) / (state.global_step - 1) * (state.max_steps - state.global_step)
        log.info("teacher: preparation needs about %.0f more minutes (%d/%d steps; once — later runs reuse it). "
                 "A seconds-long check meanwhile: python -m kdexp experiment=smoke", math.ceil(left / 60),
                 state.global_step, state.max_steps)


def _train_teacher(cfg, tokenizer, data: TaskData, tmp: Path) -> None:
    p = cfg.teacher.prepare
    examples = data.train if p.max_train_samples is None else data.train[: p.max_train_samples]
    log.info("teacher: preparing %s on %d %s examples (one time; key %s)", cfg.teacher.name, len(examples),
             cfg.task.name, teacher_key(cfg))
    model = build_model(cfg.teacher, len(tokenizer), seed=p.seed, hw_cfg=cfg.hardware, for_training=True)
    train_cfg = OmegaConf.create({"batch_size": p.batch_size, "epochs": p.epochs, "lr": p.lr,
                                  "weight_decay": p.weight_decay, "warmup_ratio": p.warmup_ratio})
    args = training_args(cfg, tmp / "trainer", train_cfg=train_cfg, seed=p.seed, logging_steps=50)
    start = time.perf_counter()
    history = train_model(model, encode(examples, tokenizer, cfg.task), args, tokenizer.pad_token_id,
                          callbacks=[PreparationEta()])
    seconds = time.perf_counter() - start
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    meta = {"train_examples": len(examples), "train_seconds": round(seconds, 1), "spec": teacher_spec(cfg),
            "final_train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
            # Not part of the key, but the bits depend on them: see docs/design.md (teacher preparation).
            "prepared_with": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                              "device": str(next(model.parameters()).device)},
            "files": weight_digests(tmp)}  # checked before every load: damaged weights are prepared again
    atomic_write_json(tmp / MARKER, meta)  # written last: its presence marks a complete preparation


# ---- out-of-memory fallback ----------------------------------------------------------------------------------------

def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def preset_path(name: str) -> Path:
    return Path(CONF_DIR) / "teacher" / f"{name}.yaml"


def fallback_teacher_node(name: str):
    return OmegaConf.merge(OmegaConf.structured(TeacherConfig), OmegaConf.load(preset_path(name)))


def check_fallback(cfg) -> None:
    name = cfg.teacher.fallback
    if name is None:
        return
    if name == cfg.teacher.name:
        raise ValueError(f"teacher.fallback={name!r} is the teacher itself; name a smaller teacher preset")
    if not preset_path(name).is_file():
        raise ValueError(f"teacher.fallback={name!r} is not a teacher preset (no {preset_path(name)})")
    if fallback_teacher_node(name).fallback is not None:
        raise ValueError(f"teacher.fallback={name!r}: that preset sets its own fallback; the retry happens once")


@torch.no_grad()
def probe_teacher(teacher, cfg) -> None:
    """One forward at the largest evaluation batch shape, so an OOM while running the teacher shows up now."""
    length = cfg.task.max_prompt_tokens + cfg.task.max_answer_tokens
    device = next(teacher.parameters()).device
    ids = torch.zeros((cfg.hardware.eval_batch_size, length), dtype=torch.long, device=device)
    teacher(input_ids=ids, logits_to_keep=cfg.task.max_answer_tokens + 1, use_cache=False)


def teacher_with_fallback(cfg, tokenizer, teacher_tokenizer, data, check_vocab):
    """prepare_teacher, retried once with ``teacher.fallback`` on OOM; returns (teacher, info, teacher tokenizer).

    The fallback swaps ``cfg.teacher`` in place, so every key and cache downstream follows the teacher really used;
    ``check_vocab(tokenizer, teacher_tokenizer)`` re-checks the pair. Running out of memory later is not retried.
    """
    try:
        with outside_process_group():
            teacher, info = prepare_teacher(cfg, teacher_tokenizer, data)
        if cfg.teacher.fallback:
            probe_teacher(teacher, cfg)
        return teacher, info, teacher_tokenizer
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not (is_oom(err) and cfg.teacher.fallback):
            raise
        requested, message = cfg.teacher.name, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    teacher = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.warning("teacher %s ran out of memory (%s); retrying once with teacher.fallback=%s", requested, message,
                cfg.teacher.fallback)
    cfg.teacher = fallback_teacher_node(cfg.teacher.fallback)
    same = tokenizer_source(cfg.teacher) == tokenizer_source(cfg.student)
    teacher_tokenizer = tokenizer if same else load_tokenizer(cfg.teacher)
    check_vocab(tokenizer, teacher_tokenizer)
    with outside_process_group():
        teacher, info = prepare_teacher(cfg, teacher_tokenizer, data)
    info.update(fallback_used=True, requested_teacher=requested, used_teacher=cfg.teacher.name, oom_error=message)
    return teacher, info, teacher_tokenizer
