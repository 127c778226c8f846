"""Typed schema of the shared config groups (everything but ``method``, whose schema lives beside its code).

Hydra merges every group YAML onto these dataclasses (registered as ``base_config``), so a typo'd key or a wrong
type fails at compose time. Range checks need the full key path, which a dataclass shared by ``teacher`` and
``student`` cannot know, so they live in :mod:`kdexp.core.checks` and the method modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ArchConfig:
    """Architecture of a model built from config (no download). Llama-style decoder."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512


@dataclass
class PrepareConfig:
    """Fine-tune a teacher on the task's training split once, before it is used; the result is content-addressed."""

    enabled: bool = False
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 32
    max_train_samples: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory; None builds the model from ``arch`` with random weights.
    path: str | None = None
    # Tokenizer hub id / directory (null = the model's own, from path); "embedded:gpt2-bpe" is the GPT-2 BPE shipped
    # in kdexp/assets.
    tokenizer: str | None = None
    revision: str | None = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    # Seed for building ``arch`` weights; None uses the run seed (students), fixed for teachers so the teacher's
    # content address does not change with the run seed.
    init_seed: int | None = None
    # none | 4bit | 8bit: load through bitsandbytes (CUDA only; checked before loading, kdexp/lora.py).
    quantization: str = "none"


@dataclass
class LoraConfig:
    """Train a LoRA adapter instead of the full student (peft); merged into a standalone student after training."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module name suffixes (peft semantics); every entry must match a module of the student.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TeacherConfig(ModelConfig):
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    # Teacher preset (conf/teacher/<name>.yaml) retried once if this one runs out of memory (kdexp/resilience.py).
    fallback: str | None = None


@dataclass
class TaskConfig:
    """One task as data (docs/tasks.md): where its rows come from, how a row becomes a prompt and gold answers, how
    an answer is decoded and scored. A new task is a YAML under conf/task, plus a loader / metric only if new."""

    name: str = MISSING
    source: str = "embedded"  # embedded | hub
    # Embedded copy: a name in kdexp.core.tasks.LOADERS; null = hub only. Unused with source=hub.
    loader: str | None = None
    hub_id: str = ""
    hub_config: str | None = None
    # str.format over a data row's fields, e.g. "Review: {sentence}\nSentiment:"; the answer follows it directly.
    prompt_template: str = MISSING
    # Row fields whose surrounding whitespace is dropped first (GLUE's hub sentences end with a space). Only the
    # listed ones: SQuAD questions keep theirs, as the prompts always had them.
    strip_fields: list[str] = field(default_factory=list)
    # Row field with the example id; predictions are keyed on it, so it must be unique within a split.
    id_field: str = MISSING
    # Dotted path to the gold answer(s) in a row ("answers.text"): a string or a list of strings; with label_words,
    # the integer index of the gold label word.
    answer_field: str = MISSING
    # Classification tasks: the answer is one of these words, scored by log-probability. Empty = generative task.
    label_words: list[str] = field(default_factory=list)
    # Generation stops at EOS or at the first token of any of these (checked per token, not per string), and the
    # decoded text is cut at the first stop string before answer_extraction.
    stop_strings: list[str] = field(default_factory=list)
    # A name in kdexp.core.evaluate.ANSWER_EXTRACTIONS: decoded text -> the answer that is scored.
    answer_extraction: str = MISSING
    # A name in kdexp.core.metrics.METRICS: (predictions, examples) -> named scores.
    metric: str = MISSING
    # Which of the metric's scores selects and reports runs (results.json "main_metric").
    main_metric: str = MISSING
    append_eos: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_samples: int = 500
    # A row field (dotted path) whose groups are never split between validation and train, e.g. SQuAD's `title`:
    # validation is then whole articles, the same shift as a by-article eval split. null: rows drawn at random.
    validation_group: str | None = None
    subset_seed: int = 0
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 32
    max_new_tokens: int = 32
    # Default size of the KD transfer set (method.unlabeled_samples) for this task.
    unlabeled_samples: int = 0
    # How a tiny teacher is prepared on this task (conf/teacher/tiny.yaml reads these into teacher.prepare, so they
    # are in the prepared teacher's key): train examples (null = all), epochs, batch size, learning rate. A task
    # whose answers are sentences needs far more steps than one whose answer is a label word.
    teacher_train_samples: int | None = None
    teacher_epochs: float = 1.0
    teacher_batch_size: int = 64
    teacher_lr: float = 2e-3
    # Extra trivial baselines (kdexp/core/baselines.py): baseline name -> the row field predicted verbatim, e.g.
    # squad_qg's {answer_sentence: sentence} (the answer's sentence as the question).
    baseline_fields: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    lr_scheduler: str = "linear"
    max_steps: int = -1
    logging_steps: int = 10
    # > 0: checkpoint every N optimizer steps under <cache_dir>/checkpoints/<run_key>; a rerun resumes from there.
    save_steps: int = 0


@dataclass
class ParamGroupRule:
    pattern: str = MISSING  # re.search on the parameter name; the first matching rule wins
    lr_multiplier: float = 1.0  # 0 freezes the parameter
    weight_decay: float | None = None  # null = train.weight_decay (0 for biases and norm weights)


@dataclass
class OptimConfig:
    """Per-parameter learning rates / weight decay by regex (kdexp/param_groups.py, docs/training_controls.md)."""

    param_groups: list[ParamGroupRule] = field(default_factory=list)


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"  # cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16
    tf32: bool = False
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0
    # Pin torch intra-op threads so timings are comparable; None leaves torch's default.
    torch_threads: int | None = None
    eval_batch_size: int = 64
    # Runs under torchrun / accelerate launch (HF Trainer DDP); only rank 0 writes results (kdexp/distributed.py).
    distributed: bool = False


@dataclass
class StageSpec:
    """One stage of ``stage.stages``; null fields inherit the top-level ``train`` / ``optim`` values."""

    name: str = ""
    epochs: float | None = None
    lr: float | None = None
    param_groups: list[ParamGroupRule] | None = None
    # The method's own loss weights for this stage (each method module's LOSS_WEIGHTS, e.g. alpha for kd1).
    loss: dict[str, float] = field(default_factory=dict)


@dataclass
class StageConfig:
    name: str = MISSING
    # Empty for stage=single (one stage from `train`); any other preset must list its stages (kdexp/stages.py).
    stages: list[StageSpec] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Experiment tracking on top of the local results.json (always written). ``none`` or ``wandb``."""

    name: str = "none"
    project: str = "kdexp"
    entity: str | None = None
    # online | offline | disabled; null = online when WANDB_API_KEY is set, else offline (sync later).
    mode: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    task: TaskConfig = MISSING
    # Each method's own dataclass (kdexp/methods/<name>.py ``Config``), attached by conf/method/<name>.yaml.
    method: Any = MISSING
    hardware: HardwareConfig = MISSING
    stage: StageConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Not part of the run key (registry.IGNORED_KEYS): where results are mirrored, not what is computed.
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: str | None = None
    seed: int = 42
    force: bool = False
    # Where content-addressed artefacts (prepared teachers, caches, run registry) live; shared across runs.
    cache_dir: str = "~/.cache/kdexp"  # conf/config.yaml resolves $KDEXP_CACHE_DIR / $XDG_CACHE_HOME first
    eval_teacher: bool = True
    save_student: bool = True
    num_samples: int = 8
    output_dir: str = "."
