"""Knowledge-distillation losses as pure tensor functions (in the style of TRL's GKD losses).

Shapes, shared by every divergence ``fn(student_logits, teacher_logits, *, temperature=1.0, mask=None,
reduction="mean", chunk_size=None)``:

- ``student_logits``, ``teacher_logits``: ``(batch, seq, vocab)`` or ``(N, vocab)``, any float dtype.
- ``mask``: ``(batch, seq)`` (or ``(N,)``) bool / 0-1, True where the token counts; ``None`` counts all tokens.

Both distributions are tempered softmaxes ``p_T = softmax(teacher / T)``, ``p_S = softmax(student / T)``,
computed in float32 with ``log_softmax``. Divergences return a float32 scalar: the sum over counted tokens
(``reduction="sum"``) or that sum divided by the number of counted tokens (``"mean"``); ``"none"`` returns the
``(N,)`` per-token values of the counted tokens. The ``T**2`` factor is *not* applied here; :func:`blend` applies it,
and every trainer builds its loss through :func:`blend`.

``chunk_size`` bounds memory: counted tokens are processed ``chunk_size`` rows at a time and, when autograd
is recording, each chunk runs under non-reentrant activation checkpointing, so at most one chunk's float32
``(chunk, vocab)`` intermediates are alive in forward *and* backward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def _select_tokens(student_logits, teacher_logits, mask):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is None:
        return student, teacher
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
    # Select before any float32 work so padded / prompt tokens cost neither memory nor compute.
    keep = mask.reshape(-1).to(device=student.device, dtype=torch.bool)
    return student[keep], teacher[keep]


def _chunk_values(token_fn, temperature, student, teacher):
    # Upcast before dividing by T: bf16 logits / T and a bf16 log_softmax lose too much precision.
    student_logp = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher.float() / temperature, dim=-1)
    return token_fn(student_logp, teacher_logp)


def _chunk_sum(token_fn, temperature, student, teacher):
    return _chunk_values(token_fn, temperature, student, teacher).sum()


def _divergence(token_fn, student_logits, teacher_logits, temperature, mask, reduction, chunk_size):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    student, teacher = _select_tokens(student_logits, teacher_logits, mask)
    n_tokens = student.shape[0]
    if reduction == "none":  # analysis (e.g. the cache's error report); per-token values, not for training
        return _chunk_values(token_fn, temperature, student, teacher)
    fn = partial(_chunk_sum, token_fn, temperature)
    if chunk_size is None or n_tokens == 0:
        # An empty selection still goes through fn: the sum is 0 and keeps the autograd graph.
        total = fn(student, teacher)
    else:
        recording = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
        total = None
        for start in range(0, n_tokens, chunk_size):
            args = (student[start : start + chunk_size], teacher[start : start + chunk_size])
            # Checkpointing stores only the chunk views; the float32 blocks are rebuilt one chunk at a
            # time during backward instead of all being kept alive until then.
            part = checkpoint(fn, *args, use_reentrant=False) if recording else fn(*args)
            total = part if total is None else total + part
    return total / max(n_tokens, 1) if reduction == "mean" else total


def _forward_kl_tokens(student_logp, teacher_logp):
    # F.kl_div(input, target) is KL(target || input).
    return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)


def _reverse_kl_tokens(student_logp, teacher_logp):
    return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)


def _jsd_tokens(student_logp, teacher_logp, beta):
    # The endpoints are special-cased exactly like TRL: the mixture formula would tend to 0, not to a KL.
    if beta == 0:
        return _forward_kl_tokens(student_logp, teacher_logp)
    if beta == 1:
        return _reverse_kl_tokens(student_logp, teacher_logp)
    # logaddexp rather than logsumexp(stack(...)) avoids materialising a (2, chunk, vocab) block.
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    kl_teacher = F.kl_div(mixture_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture_logp, student_logp, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def _tvd_tokens(student_logp, teacher_logp):
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def _prob_mse_tokens(student_logp, teacher_logp):
    return (teacher_logp.exp() - student_logp.exp()).square().sum(-1)


def _prob_cosine_tokens(student_logp, teacher_logp):
    # Probability vectors have L2 norm >= 1/sqrt(vocab) > 0, so the cosine is always well defined.
    return 1.0 - F.cosine_similarity(teacher_logp.exp(), student_logp.exp(), dim=-1)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """Forward KL, mass-covering: ``KL(p_T‖p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))`` per token.

    See the module docstring for shapes, ``mask``, ``reduction`` and ``chunk_size``. Returns a float32 scalar.
    """
    return _divergence(_forward_kl_tokens, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """Reverse KL, mode-seeking: ``KL(p_S‖p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))`` per token."""
    return _divergence(_reverse_kl_tokens, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def generalized_jsd(
    student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None
):
    """Generalized JSD exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` (Agarwal et al. 2023, Eq. 1).

    ``m = beta·p_T + (1 − beta)·p_S`` and ``JSD_beta = beta·KL(p_T‖m) + (1 − beta)·KL(p_S‖m)`` for
    ``0 < beta < 1``; ``beta == 0`` is exactly ``KL(p_T‖p_S)`` (forward) and ``beta == 1`` exactly
    ``KL(p_S‖p_T)`` (reverse). ``beta = 0.5`` is the symmetric Jensen-Shannon divergence.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    token_fn = partial(_jsd_tokens, beta=float(beta))
    return _divergence(token_fn, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def _skew_tokens(student_logp, teacher_logp, skew_alpha, reverse):
    # p is the distribution the KL is taken from (teacher for skew KL, student for skew reverse KL), q the other.
    p, q = (student_logp, teacher_logp) if reverse else (teacher_logp, student_logp)
    if skew_alpha == 0:  # the mixture is q itself: exactly the plain KL, without log(0) terms
        mixture_logp = q
    elif skew_alpha == 1:  # the mixture is p itself: exactly 0
        mixture_logp = p
    else:
        mixture_logp = torch.logaddexp(p + math.log(skew_alpha), q + math.log(1 - skew_alpha))
    return F.kl_div(mixture_logp, p, reduction="none", log_target=True).sum(-1)


def _skew(reverse, student_logits, teacher_logits, skew_alpha, temperature, mask, reduction, chunk_size):
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")
    token_fn = partial(_skew_tokens, skew_alpha=float(skew_alpha), reverse=reverse)
    return _divergence(token_fn, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def skew_kl(student_logits, teacher_logits, *, skew_alpha=0.1, temperature=1.0, mask=None, reduction="mean",
            chunk_size=None):
    """Skew KL (DistiLLM, Ko et al. 2024): ``KL(p_T ‖ α·p_T + (1 − α)·p_S)`` per token, forward direction.

    ``α = skew_alpha``: 0 is exactly forward ``KL(p_T‖p_S)``, 1 is exactly 0. Mixing the teacher into the
    student side bounds the log-ratio by ``−log α``, so a student that puts ~0 mass on a teacher token cannot blow
    the loss (and its gradient) up. The gradient flows through ``p_S`` inside the mixture.
    """
    return _skew(False, student_logits, teacher_logits, skew_alpha, temperature, mask, reduction, chunk_size)


def skew_reverse_kl(student_logits, teacher_logits, *, skew_alpha=0.1, temperature=1.0, mask=None, reduction="mean",
                    chunk_size=None):
    """Skew reverse KL (DistiLLM): ``KL(p_S ‖ α·p_S + (1 − α)·p_T)`` per token, mode-seeking direction.

    ``α = skew_alpha``: 0 is exactly reverse ``KL(p_S‖p_T)``, 1 is exactly 0.
    """
    return _skew(True, student_logits, teacher_logits, skew_alpha, temperature, mask, reduction, chunk_size)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """Total variation distance ``½ Σ_v |p_T(v) − p_S(v)|`` per token, in [0, 1]."""
    return _divergence(_tvd_tokens, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def prob_mse(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """Squared L2 distance of probabilities ``Σ_v (p_T(v) − p_S(v))²`` per token, in [0, 2].

    Summed (not averaged) over the vocabulary: a mean would shrink the loss by ``1/vocab`` (~1e-5 for LLM
    vocabularies) and make its scale depend on the tokenizer.
    """
    return _divergence(_prob_mse_tokens, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def prob_cosine(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """Cosine distance of probability vectors ``1 − <p_T, p_S> / (‖p_T‖ ‖p_S‖)`` per token, in [0, 1]."""
    return _divergence(_prob_cosine_tokens, student_logits, teacher_logits, temperature, mask, reduction, chunk_size)


def masked_cross_entropy(student_logits, labels, reduction="mean"):
    """Cross-entropy to gold tokens at temperature 1, in float32, ignoring ``labels == -100``.

    ``student_logits``: ``(batch, seq, vocab)`` or ``(N, vocab)``; ``labels``: ``(batch, seq)`` / ``(N,)``,
    already aligned with the logits (shifted by the caller). ``"mean"`` divides the sum by the number of
    labelled tokens; zero labelled tokens gives 0, not NaN.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1).to(logits.device)
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    total = F.cross_entropy(logits.float(), labels, reduction="sum")
    return total / max(labels.shape[0], 1) if reduction == "mean" else total


def distillation_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha,
    temperature,
    divergence=forward_kl,
    kd_mask=None,
    mask=None,
    reduction="mean",
    chunk_size=None,
    **divergence_kwargs,
):
    """Blended KD loss ``L = (1 − alpha)·CE(p_S^1, gold) + alpha·T²·D(p_T^T‖p_S^T)``; returns ``(loss, ce, kd)``.

    ``alpha`` weights the *KD* term (some guides weight CE by alpha instead). ``T²`` keeps the KD gradient
    scale independent of T (Hinton et al. 2015). ``labels``: ``(batch, seq)`` gold ids aligned with the logits,
    -100 where CE does not count. ``kd_mask`` (alias ``mask``): ``(batch, seq)`` tokens counted by the KD term,
    default ``labels != -100``; it may include unlabelled tokens. With ``"mean"`` CE is divided by the number of
    CE tokens and KD by the number of KD tokens. ``kd`` is ``D`` before the ``alpha·T²`` factor.

    ``alpha == 0``: no KD work at all (``teacher_logits`` may be None), ``loss is ce`` and ``kd`` is None.
    ``alpha == 1``: ``loss = T²·kd``; ``ce`` is still computed (without autograd) for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mask is not None:
        if kd_mask is not None:
            raise ValueError("pass kd_mask or its alias mask, not both")
        kd_mask = mask
    if alpha == 0:
        ce = masked_cross_entropy(student_logits, labels, reduction=reduction)
        return ce, ce, None
    if teacher_logits is None:
        raise ValueError(f"teacher_logits is None but alpha={alpha} needs the KD term")
    if kd_mask is None:
        kd_mask = labels != IGNORE_INDEX
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):
        ce = masked_cross_entropy(student_logits, labels, reduction=reduction)
    kd = divergence(
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=kd_mask,
        reduction=reduction,
        chunk_size=chunk_size,
        **divergence_kwargs,
    )
    return blend(ce, kd, ce_weight=1 - alpha, kd_weight=alpha, temperature=temperature), ce, kd


def blend(ce, kd, *, ce_weight: float, kd_weight: float, temperature: float):
    """``L = ce_weight·CE + kd_weight·T²·D``: the one place a KD loss is assembled (KD1 and KD3 trainers too).

    ``T²`` keeps the KD gradient scale independent of T (Hinton et al. 2015). ``kd`` None: the KD term was never
    computed (weight 0) and ``L = ce_weight·CE``. ``ce_weight == 0``: CE stays out of the graph entirely, so an
    infinite CE on a batch cannot turn a pure-KD loss into NaN.
    """
    if kd is None:
        return ce_weight * ce
    kd_term = kd_weight * temperature**2 * kd
    return kd_term if ce_weight == 0 else ce_weight * ce + kd_term


def cached_forward_kl(student_logits, topk_logits, topk_ids, tail_logit, *, temperature: float, mask,
                      vocab_size: int) -> torch.Tensor:
    """Σ over masked tokens of forward ``KL(p̂_T‖p_S)`` against a cached teacher, without a (B, A, V) teacher tensor.

    Shapes: ``student_logits`` (B, A, V); ``topk_logits`` / ``topk_ids`` (B, A, k) the teacher's cached head;
    ``tail_logit`` (B, A) the one logit every other id gets (``teacher_cache.shared_tail_logit``: the uniform-tail
    reconstruction p̂_T); ``mask`` (B, A). Both sides tempered by T, no T² factor. With q = p_S:
    ``KL = Σ_top p̂ (log p̂ − log q) + m_tail · log p̂_c − p̂_c · (Σ_all log q − Σ_top log q)``; only the student's own
    log-softmax is vocabulary-sized. Equal to :func:`forward_kl` on the reconstructed teacher logits.
    """
    keep = mask.bool()
    vals, ids = topk_logits[keep].float() / temperature, topk_ids[keep].long()
    tail = tail_logit[keep] / temperature
    n_tail = vocab_size - vals.shape[-1]
    lse = torch.logsumexp(torch.cat([vals, (tail + math.log(n_tail)).unsqueeze(-1)], -1), -1, keepdim=True)
    logp_top, logp_tail = vals - lse, tail.unsqueeze(-1) - lse
    logq = torch.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    logq_top = logq.gather(-1, ids)
    tail_logq = logq.sum(-1, keepdim=True) - logq_top.sum(-1, keepdim=True)
    kl = (logp_top.exp() * (logp_top - logq_top)).sum(-1, keepdim=True)
    kl = kl + n_tail * logp_tail.exp() * logp_tail - logp_tail.exp() * tail_logq
    return kl.sum()


DIVERGENCES: dict[str, Callable] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": tvd,
    "prob_mse": prob_mse,
    "prob_cosine": prob_cosine,
    "skew_kl": skew_kl,  # skew_alpha=0.1 by default (DistiLLM's); KD4 sets it with method.skew_alpha
    "skew_reverse_kl": skew_reverse_kl,
}


def _split_path(value: str) -> tuple[str, str]:
    """``package.module:function`` or ``package.module.function`` → (module, function); ValueError otherwise."""
    module, sep, attr = value.partition(":") if ":" in value else value.rpartition(".")
    if not (module and attr and attr.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        raise ValueError(f"method.divergence: unknown divergence {value!r}; choose one of {', '.join(DIVERGENCES)} "
                         "or a dotted path to a function")
    return module, attr


def check_divergence(value: str) -> None:
    """Pre-flight check of ``method.divergence`` that runs no user code: a known name, or a path whose module can
    be found (``importlib.util.find_spec``; only its parent packages are imported). The function itself is imported
    when the run starts (:func:`resolve_divergence`): a config file that names one is code, and runs as code."""
    if value in DIVERGENCES:
        return
    module, _ = _split_path(str(value))
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"method.divergence={value!r}: no module {module!r} to import it from")


def resolve_divergence(name_or_path):
    """Map a config value (``method.divergence``) to a divergence function.

    Accepts a name from ``DIVERGENCES`` or a path ``package.module:function`` / ``package.module.function`` to a
    callable with the divergence signature ``fn(student_logits, teacher_logits, *, temperature, mask, reduction,
    chunk_size)``. A callable is returned unchanged.
    """
    if callable(name_or_path):
        return name_or_path
    if name_or_path in DIVERGENCES:
        return DIVERGENCES[name_or_path]
    module_name, attr = _split_path(str(name_or_path))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method.divergence: cannot import divergence {name_or_path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"method.divergence: {name_or_path!r} is not callable")
    return fn
