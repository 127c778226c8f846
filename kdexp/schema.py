"""Typed schema of the Hydra config tree, and the range checks Hydra cannot express.

Hydra merges every group YAML onto these dataclasses (registered as ``base_config``), so a typo'd key or a wrong
type fails at compose time. Range checks live in :func:`validate`, which names the full key path in its one-line
``ValueError`` — the same dataclass serves ``teacher`` and ``student``, so it cannot know its own path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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
    # Tokenizer hub id / directory; "embedded:gpt2-bpe" is the GPT-2 BPE shipped in kdexp/assets.
    tokenizer: str | None = None
    revision: str | None = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    # Seed for building ``arch`` weights; None uses the run seed (students), fixed for teachers so the teacher's
    # content address does not change with the run seed.
    init_seed: int | None = None
    # Layer / hidden sizes used by presets for documentation and checks of hub models; informational.
    family: str = "llama"
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
    name: str = MISSING
    source: str = "embedded"  # embedded | hub
    hub_id: str = ""
    hub_config: str | None = None
    prompt_template: str = MISSING
    # Classification tasks: the answer is one of these words, scored by log-probability. Empty = generative task.
    label_words: list[str] = field(default_factory=list)
    main_metric: str = MISSING
    append_eos: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_samples: int = 500
    subset_seed: int = 0
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 32
    max_new_tokens: int = 32
    # Default size of the KD transfer set (method.unlabeled_samples) for this task.
    unlabeled_samples: int = 0
    # How many train examples a tiny teacher is prepared on (teacher.prepare.max_train_samples); null = all.
    teacher_train_samples: int | None = None


@dataclass
class DecodingConfig:
    """How the KD2 teacher answers generative prompts (classification tasks always take the best label word)."""

    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 4  # beam only
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only (nucleus; top-k filtering is off)
    # null = task.max_new_tokens
    max_new_tokens: int | None = None
    seed: int = 0  # sample only: sampled generations are reproducible, so they can be cached


@dataclass
class MethodConfig:
    name: str = MISSING
    # Whether the method needs teacher and student to share a vocabulary (logit / feature KD).
    needs_shared_vocab: bool = False
    train_student: bool = True
    # KD1 (logit distillation): L = (1 - alpha) CE + alpha T^2 D(p_T || p_S); alpha weights the KD term.
    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd | tvd | prob_mse | prob_cosine | dotted.path
    teacher_signal: str = "cached"  # cached | online
    top_k: int = 64
    cache_compression: str = "lzf"  # lzf | gzip | none
    # A prebuilt cache (python -m kdexp.cache); null = content-addressed under cache_dir.
    cache_path: str | None = None
    # Divergence over chunks of this many answer tokens (bounds memory at large vocab); null = all at once.
    chunk_size: int | None = None
    # Extra training prompts without gold labels, on which only the KD term applies (a transfer set).
    unlabeled_samples: int = 0
    # KD2 (sequence-level KD, docs/methods.md): L = gold_mix CE(gold) + (1 - gold_mix) CE(teacher output).
    gold_mix: float = 0.0
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # KD3 (feature KD, docs/methods.md): L = w_ce CE + w_kl T^2 D(p_T || p_S) + w_feat feature_loss.
    w_ce: float = 0.5
    w_kl: float = 0.5
    w_feat: float = 1.0
    # "auto" or [[student_layer, teacher_layer], ...]; hidden_states index, 0 = embeddings, i = output of layer i.
    layer_map: Any = "auto"
    include_embeddings: bool = False  # auto only: also pair the embeddings [0, 0]
    feature_loss: str = "mse"  # mse | cosine
    feature_tokens: str = "all"  # all (non-pad prompt + answer tokens) | answer (positions that predict the answer)
    feature_norm: str = "none"  # none | layernorm (parameter-free standardisation of each token vector)


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
    # Loss weights of the method for this stage: alpha (kd1), gold_mix (kd2), w_ce / w_kl / w_feat (kd3).
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
    method: MethodConfig = MISSING
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
    cache_dir: str = ".kdexp_cache"
    eval_teacher: bool = True
    save_student: bool = True
    num_samples: int = 8
    output_dir: str = "."


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


CHOICES = {
    "task.source": ("embedded", "hub"),
    "task.main_metric": ("accuracy", "f1", "exact_match"),
    "hardware.device": ("cpu", "cuda", "mps"),
    "hardware.dtype": ("float32", "bfloat16", "float16"),
    "train.lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
    "method.teacher_signal": ("cached", "online"),
    "logger.name": ("none", "wandb"),
    "method.cache_compression": ("lzf", "gzip", "none"),
    "method.decoding.strategy": ("greedy", "beam", "sample"),
    "method.feature_loss": ("mse", "cosine"),
    "method.feature_tokens": ("all", "answer"),
    "method.feature_norm": ("none", "layernorm"),
}


def _fail(key: str, value: Any, rule: str) -> None:
    raise ValueError(f"{key}={value!r} {rule}")


def _positive(cfg: DictConfig, keys: list[str], strict: bool = True) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if (strict and value <= 0) or (not strict and value < 0):
            _fail(key, value, "must be > 0" if strict else "must be >= 0")


def _fraction(cfg: DictConfig, keys: list[str]) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            _fail(key, value, "must be in [0, 1]")


def validate(cfg: DictConfig) -> None:
    """Range and choice checks; raise a one-line ``ValueError`` naming the key. Runs before any model loads."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            _fail(key, value, f"must be one of {', '.join(allowed)}")
    _positive(cfg, ["train.lr", "train.epochs", "train.batch_size", "train.grad_accum", "train.logging_steps",
                    "hardware.eval_batch_size", "task.max_prompt_tokens", "task.max_answer_tokens",
                    "task.max_new_tokens", "task.max_train_samples", "task.max_eval_samples"])
    _positive(cfg, ["train.weight_decay", "task.validation_samples", "hardware.dataloader_num_workers",
                    "num_samples"], strict=False)
    _fraction(cfg, ["train.warmup_ratio", "teacher.prepare.warmup_ratio", "method.alpha"])
    _positive(cfg, ["method.temperature", "method.top_k", "method.chunk_size"])
    _positive(cfg, ["method.unlabeled_samples"], strict=False)
    _positive(cfg, ["method.decoding.num_beams", "method.decoding.temperature", "method.decoding.top_p",
                    "method.decoding.max_new_tokens"])
    _fraction(cfg, ["method.gold_mix", "method.decoding.top_p"])
    _positive(cfg, ["method.w_ce", "method.w_kl", "method.w_feat"], strict=False)
    from kdexp.losses import resolve_divergence  # torch import: only once the cheap checks passed

    resolve_divergence(cfg.method.divergence)
    for role in ("teacher", "student"):
        _positive(cfg, [f"{role}.arch.{k}" for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                     "max_position_embeddings")])
        arch = cfg[role].arch
        if cfg[role].path is None and arch.hidden_size % arch.num_heads:
            _fail(f"{role}.arch.num_heads", arch.num_heads, f"must divide {role}.arch.hidden_size={arch.hidden_size}")
    if cfg.teacher.prepare.enabled:
        _positive(cfg, ["teacher.prepare.epochs", "teacher.prepare.lr", "teacher.prepare.batch_size",
                        "teacher.prepare.max_train_samples"])
    if cfg.hardware.torch_threads is not None:
        _positive(cfg, ["hardware.torch_threads"])
    if cfg.logger.mode not in (None, "online", "offline", "disabled"):
        _fail("logger.mode", cfg.logger.mode, "must be one of online, offline, disabled, null")
    if cfg.logger.name == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            _fail("logger.name", "wandb", "needs the wandb package: pip install -e '.[wandb]'")
    if cfg.task.max_answer_tokens + cfg.task.max_prompt_tokens > min(
        cfg.student.arch.max_position_embeddings, cfg.teacher.arch.max_position_embeddings
    ) and cfg.student.path is None:
        _fail("task.max_prompt_tokens", cfg.task.max_prompt_tokens,
              "plus task.max_answer_tokens must fit in the tiny models' arch.max_position_embeddings")
    if cfg.method.name == "kd3":
        from kdexp.kd3 import check_kd3_config  # layer map against the architectures, weights, teacher signal

        check_kd3_config(cfg)
    from kdexp.controls import check_training_controls  # param groups, stages, LoRA, quantization, fallback

    check_training_controls(cfg)
