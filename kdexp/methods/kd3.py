"""KD3 feature (hidden-state) distillation, FitNets-style, on top of the KD1 logit loss (docs/methods.md).

Loss per accumulated optimizer step:

    L = w_ce · Σ CE / N_ce  +  w_kl · T² · Σ D(p_T^T ‖ p_S^T) / N_kd  +  w_feat · feature_loss
    feature_loss = (1 / |M|) Σ_{(s, t) ∈ M} Σ_tokens d(P_st h_S[s], h_T[t]) / N_feat

M is the layer map, P_st a learned linear projection (identity when the hidden sizes agree) and N_feat the number of
counted tokens (``method.feature_tokens``) in the whole accumulated batch, like N_ce and N_kd. The teacher runs
online: its forward is needed for the hidden states anyway, so its answer-slot logits come at no extra cost and no
logit cache is read. A weight of 0 skips its term entirely, so ``w_feat=0, w_ce=1−alpha, w_kl=alpha`` is bitwise KD1
with ``teacher_signal=online``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import II, DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from kdexp.config.checks import choice, finite, positive
from kdexp.core.losses import blend, check_divergence, masked_cross_entropy, resolve_divergence
from kdexp.core.models import answer_logits
from kdexp.core.runner import build_student, finish, setup, student_args
from kdexp.core.training import train_model
from kdexp.methods import artefacts
from kdexp.methods.kd1 import DistillationTrainer, kd_features

log = logging.getLogger(__name__)
KEY = "method.layer_map"
NAME = "kd3"
NEEDS_SHARED_VOCAB = True
TRAINS_STUDENT = True
BASELINE = False
LOSS_WEIGHTS = ("w_ce", "w_kl", "w_feat")
LABEL_KNOBS = {"w_feat": "w_feat"}


@dataclass
class Config:
    name: str = NAME
    w_ce: float = 0.5
    w_kl: float = 0.5
    w_feat: float = 1.0
    temperature: float = 2.0
    divergence: str = "forward_kl"  # of the logit term; any divergence of the loss library
    chunk_size: int | None = None
    # auto: student layer i (1..S) <-> teacher layer round(i*T/S); or an explicit list [[student, teacher], ...] of
    # hidden-state indices (0 = embeddings, i = output of decoder layer i).
    layer_map: Any = "auto"
    include_embeddings: bool = False  # auto only: also pair the embeddings [0, 0]
    feature_loss: str = "mse"  # mse | cosine
    # all: every non-pad prompt+answer token | answer: the positions that predict the answer
    feature_tokens: str = "all"
    # layernorm | none. layernorm standardises each token vector of both sides (no learned scale) first, so the term is
    # ~2 at step 0 whatever the teacher's activation scale; raw MSE on the default pair was 32 at step 0 (vs CE 10.8,
    # T²·KL 11.9) and collapsed every run to the majority class (docs/methods.md, KD3 defaults).
    feature_norm: str = "layernorm"
    unlabeled_samples: int = II("task.unlabeled_samples")


# ---- layer map -----------------------------------------------------------------------------------------------------

def auto_layer_map(student_layers: int, teacher_layers: int, include_embeddings: bool = False) -> list[tuple]:
    """Student layer i (1..S) ↔ teacher layer round_half_up(i·T/S), at least 1: S=4, T=12 → 3, 6, 9, 12."""
    pairs = [(i, max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers)))
             for i in range(1, student_layers + 1)]
    return [(0, 0)] + pairs if include_embeddings else pairs


def explicit_layer_map(value, student_layers: int | None, teacher_layers: int | None) -> list[tuple]:
    """Check a ``[[s, t], ...]`` list; a depth of None (hub model, config not read yet) skips that bound."""
    pairs = []
    for pair in value if isinstance(value, list) else [None]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is int and x >= 0 for x in pair)):
            raise ValueError(f"{KEY}={value!r} must be auto or a list of [student_layer, teacher_layer] pairs of "
                             "hidden-state indices >= 0")
        pairs.append(tuple(pair))
    if not pairs:
        raise ValueError(f"{KEY}=[] is empty: map at least one [student_layer, teacher_layer] pair (or use auto)")
    for role, depth, index in (("student", student_layers, 0), ("teacher", teacher_layers, 1)):
        beyond = [p[index] for p in pairs if depth is not None and p[index] > depth]
        if beyond:
            raise ValueError(f"{KEY}={value!r} uses {role} layer {beyond[0]} but the {role} has {depth} layers "
                             f"(hidden-state indices 0..{depth})")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{KEY}={value!r} lists a pair twice")
    return pairs


def resolve_layer_map(value, student_layers: int | None, teacher_layers: int | None,
                      include_embeddings: bool) -> list[tuple] | None:
    """The (student, teacher) hidden-state index pairs; unknown depths (None) leave auto unresolved (None)."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if value == "auto":
        if student_layers is None or teacher_layers is None:
            return None
        return auto_layer_map(student_layers, teacher_layers, include_embeddings)
    if include_embeddings:
        raise ValueError("method.include_embeddings=True applies to layer_map=auto only; add [0, 0] to the list")
    return explicit_layer_map(value, student_layers, teacher_layers)


def model_depth(model_cfg) -> int:
    """Number of decoder layers, from the preset's arch or the model's config (no weights loaded)."""
    if model_cfg.path is None:
        return model_cfg.arch.num_layers
    return AutoConfig.from_pretrained(model_cfg.path, revision=model_cfg.revision).num_hidden_layers


def check(cfg) -> None:
    """KD3's knobs before any model loads: weights, losses, and the layer map against the arch depths."""
    m = cfg.method
    finite(cfg, ["method.w_ce", "method.w_kl", "method.w_feat", "method.temperature"])
    positive(cfg, ["method.w_ce", "method.w_kl", "method.w_feat", "method.unlabeled_samples"], strict=False)
    positive(cfg, ["method.temperature", "method.chunk_size"])
    choice(cfg, "method.feature_loss", ("mse", "cosine"))
    choice(cfg, "method.feature_tokens", ("all", "answer"))
    choice(cfg, "method.feature_norm", ("none", "layernorm"))
    check_divergence(m.divergence)
    if not (m.w_ce or m.w_kl or m.w_feat):
        raise ValueError(f"method.w_feat={m.w_feat!r} and method.w_ce, method.w_kl are all 0: at least one KD3 "
                         "weight must be > 0")
    if cfg.train.save_steps and cfg.student.lora.enabled:
        raise ValueError(f"train.save_steps={cfg.train.save_steps} cannot resume method=kd3 with "
                         "student.lora.enabled=true (peft checkpoints hold the adapter, not the KD3 projections); "
                         "use save_steps=0")
    # Hub models' depths are only known from their configs: run_kd3 checks again with them.
    depths = [None if c.path else c.arch.num_layers for c in (cfg.student, cfg.teacher)]
    resolve_layer_map(m.layer_map, *depths, m.include_embeddings)


# ---- hidden states, token mask, feature distance -------------------------------------------------------------------

def _decoder_layers(model) -> nn.ModuleList:
    n = model.config.num_hidden_layers
    # The first ModuleList of that length, found through any wrapper (a LoRA student nests the HF model in peft's).
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__} for feature distillation")


@contextlib.contextmanager
def capture_hidden_states(model, indices) -> Iterator[dict[int, torch.Tensor]]:
    """Record hidden states ``{index: (B, L, D)}`` of the forwards run inside the block, for ``indices`` only.

    Index 0 is the input of the first decoder layer (the embeddings), i the residual stream output of decoder layer
    i — for i = depth that is before the final norm (HF's ``hidden_states[-1]`` is after it). Forward hooks keep just
    these tensors: ``output_hidden_states=True`` would hold every layer's states until the forward returns.
    """
    layers, captured, handles = _decoder_layers(model), {}, []
    if 0 in indices:
        def _embeddings(module, args, kwargs):
            captured[0] = args[0] if args else kwargs["hidden_states"]

        handles.append(layers[0].register_forward_pre_hook(_embeddings, with_kwargs=True))
    for i in sorted(set(indices) - {0}):
        def _output(module, args, output, i=i):
            captured[i] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[i - 1].register_forward_hook(_output))
    try:
        yield captured
    finally:  # removed before backward, so gradient-checkpointing recomputation does not re-record
        for handle in handles:
            handle.remove()


def feature_token_mask(batch: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    """(B, L) bool over a left-padded :func:`kdexp.core.models.collate` batch.

    ``all``: every non-pad token of prompt + answer. ``answer``: the positions whose next-token logits predict an
    answer token (last prompt token .. second-to-last answer token) — exactly the positions CE and KL train.
    """
    attention = batch["attention_mask"].bool()
    if which == "all":
        return attention
    window, length = batch["answer_mask"].shape[1], attention.shape[1]
    mask = torch.zeros_like(attention)
    mask[:, length - window - 1:length - 1] = batch["answer_mask"]
    return mask


def feature_distance(student_h, teacher_h, mask=None, *, kind="mse", norm="none", reduction="mean", eps=1e-5):
    """Distance between hidden states, per token, summed (``"sum"``) or averaged (``"mean"``) over counted tokens.

    ``student_h``: (B, L, D) student states already projected to the teacher width D; ``teacher_h``: (B, L, D);
    ``mask``: (B, L) bool, None counts all. Computed in float32. ``norm="layernorm"`` first standardises each token
    vector of both, x̂ = (x − mean_d x) / sqrt(var_d x + eps), with no learned scale or shift, so the loss ignores the
    teacher's activation scale (LLM residual streams have a few huge dimensions). Per token:
    ``mse``: (1/D) Σ_d (ŝ_d − t̂_d)²;  ``cosine``: 1 − ŝ·t̂ / (‖ŝ‖ ‖t̂‖). No counted tokens → 0 (with a graph).
    """
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"hidden-state shapes differ: {tuple(student_h.shape)} vs {tuple(teacher_h.shape)}")
    dim = student_h.shape[-1]
    s, t = student_h.reshape(-1, dim), teacher_h.reshape(-1, dim)
    if mask is not None:
        keep = mask.reshape(-1).to(device=s.device, dtype=torch.bool)
        s, t = s[keep], t[keep]
    s, t = s.float(), t.float()
    if norm == "layernorm":
        s, t = F.layer_norm(s, (dim,), eps=eps), F.layer_norm(t, (dim,), eps=eps)
    if kind == "mse":
        per_token = (s - t).square().mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps)
    else:
        raise ValueError(f"method.feature_loss={kind!r} must be one of mse, cosine")
    total = per_token.sum()
    return total / max(per_token.shape[0], 1) if reduction == "mean" else total


# ---- projections ---------------------------------------------------------------------------------------------------

def projection_name(pair: tuple) -> str:
    return f"s{pair[0]}_t{pair[1]}"


def build_projections(pairs: list[tuple], student_dim: int, teacher_dim: int, seed: int) -> nn.ModuleDict | None:
    """One nn.Linear(student_dim → teacher_dim) per mapped pair, or None when the widths agree (identity)."""
    if student_dim == teacher_dim:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleDict({projection_name(p): nn.Linear(student_dim, teacher_dim) for p in pairs})


@contextlib.contextmanager
def attached(student, projections: nn.ModuleDict | None):
    """Make the projections a student submodule while it trains, removed before it is evaluated or saved.

    Trainer then gives them the same optimizer, weight-decay grouping, gradient clipping and device placement as the
    student's own weights, and the deployable student never contains them.
    """
    if projections is None:
        yield
        return
    student.kd3_projections = projections
    try:
        yield
    finally:
        del student.kd3_projections


class FeatureDistillationTrainer(DistillationTrainer):
    """KD3: KD1's CE + KL plus the feature term; one online teacher forward gives logits and mapped hidden states."""

    def __init__(self, *args, w_ce: float, w_kl: float, w_feat: float, pairs: list[tuple], projections,
                 feature_loss: str, feature_tokens: str, feature_norm: str, **kwargs):
        super().__init__(*args, alpha=w_kl, **kwargs)
        self.w_ce, self.w_kl, self.w_feat, self.pairs, self.projections = w_ce, w_kl, w_feat, pairs, projections
        self.feature_loss, self.feature_tokens, self.feature_norm = feature_loss, feature_tokens, feature_norm

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._feat_count = sum(int(feature_token_mask(b, self.feature_tokens).sum()) for b in batches)
        return batches, n_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Hooks go on the bare model (DDP / accelerate wrappers have no .config); they fire through the wrapper.
        bare = self.accelerator.unwrap_model(model)
        with capture_hidden_states(bare, [s for s, _ in self.pairs] if self.w_feat else []) as student_h:
            logits, outputs = answer_logits(model, inputs)
        n_ce, n_kd = self._counts()
        ce = masked_cross_entropy(logits, inputs["labels"], reduction="sum") / max(n_ce, 1)
        terms, kd = {"ce": ce}, None
        if self.w_kl or self.w_feat:
            with torch.no_grad(), capture_hidden_states(self.teacher, self._teacher_layers()) as teacher_h:
                teacher_logits = answer_logits(self.teacher, inputs)[0]
        if self.w_kl:
            kd = terms["kd"] = self.divergence(logits, teacher_logits, temperature=self.temperature,
                                               mask=inputs["answer_mask"], reduction="sum",
                                               chunk_size=self.chunk_size) / max(n_kd, 1)
        # The same blend as KD1's trainer, so w_feat=0 with w_ce=1-alpha, w_kl=alpha reproduces KD1 bit for bit.
        loss = blend(ce, kd, ce_weight=self.w_ce, kd_weight=self.w_kl, temperature=self.temperature)
        if self.w_feat:
            terms["feat"] = self._feature_term(inputs, student_h, teacher_h)
            loss = loss + self.w_feat * terms["feat"]
        self._log_terms(terms)
        return (loss, outputs) if return_outputs else loss

    def _teacher_layers(self) -> list[int]:
        return [t for _, t in self.pairs] if self.w_feat else []

    def _feature_term(self, inputs, student_h, teacher_h) -> torch.Tensor:
        mask = feature_token_mask(inputs, self.feature_tokens)
        total = 0.0
        for pair in self.pairs:
            hidden = student_h[pair[0]]
            if self.projections is not None:
                hidden = self.projections[projection_name(pair)](hidden)
            total = total + feature_distance(hidden, teacher_h[pair[1]], mask, kind=self.feature_loss,
                                             norm=self.feature_norm, reduction="sum")
        return total / (len(self.pairs) * max(getattr(self, "_feat_count", None) or 1, 1))


# ---- the KD3 runner ------------------------------------------------------------------------------------------------

def save_projections(projections: nn.ModuleDict, pairs: list[tuple], path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()}
    save_file(tensors, str(path), metadata={"layer_map": json.dumps(pairs)})


def run(cfg, out_dir: Path, run_key: str) -> dict:
    m = cfg.method
    divergence = resolve_divergence(m.divergence)  # a user's function is imported here, before any model loads
    # Real depths before the teacher is prepared or loaded, so a bad map fails in seconds.
    pairs = resolve_layer_map(m.layer_map, model_depth(cfg.student), model_depth(cfg.teacher), m.include_embeddings)
    ctx = setup(cfg, out_dir, run_key, need_teacher=True, shared_vocab=NEEDS_SHARED_VOCAB,
                unlabeled_samples=m.unlabeled_samples)
    ctx.loss_weights = {"ce": m.w_ce, "kd": m.w_kl * m.temperature**2, "feat": m.w_feat}
    feats = kd_features(ctx)
    student = build_student(ctx)
    s_dim, t_dim = student.config.hidden_size, ctx.teacher.config.hidden_size
    projections = build_projections(pairs, s_dim, t_dim, seed=cfg.seed)
    if projections is not None:
        projections.to(device=student.device, dtype=student.dtype)
    log.info("kd3: layer map %s, hidden %d -> %d (%s)", pairs, s_dim, t_dim,
             "learned projections" if projections is not None else "no projection")
    start = time.perf_counter()
    with attached(student, projections):
        history = train_model(
            student, feats, student_args(ctx), ctx.tokenizer.pad_token_id,
            trainer_cls=FeatureDistillationTrainer, teacher=ctx.teacher, vocab_size=len(ctx.tokenizer),
            temperature=m.temperature, divergence=divergence, chunk_size=m.chunk_size,
            w_ce=m.w_ce, w_kl=m.w_kl, w_feat=m.w_feat, pairs=pairs, projections=projections,
            feature_loss=m.feature_loss, feature_tokens=m.feature_tokens, feature_norm=m.feature_norm)
    ctx.timings["train_s"] = time.perf_counter() - start
    saved = None
    if projections is not None:
        saved = out_dir / "projections.safetensors"
        save_projections(projections, pairs, saved)
    ctx.extra["kd3"] = {"layer_map": [list(p) for p in pairs], "student_hidden": s_dim, "teacher_hidden": t_dim,
                        "projections": str(saved) if saved else None,
                        "projection_params": sum(p.numel() for p in projections.parameters()) if saved else 0}
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

teacher_artefacts = artefacts.for_online_kd
