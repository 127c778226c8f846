"""KD4 on-policy distillation (GKD, Agarwal et al. 2024; MiniLLM; "on-policy distillation" with a sampled reverse KL).

Each optimizer step draws a coin with probability ``lmbda`` from a seeded generator (its state goes into every
checkpoint). Heads: the answers of every micro-batch of the step are replaced by the current student's own samples
(``generation``: temperature, top_p, max_new_tokens; the task's stop rule), cut after the first stop token, which is
kept so the teacher also scores the decision to stop. Tails: the batch keeps its gold / teacher answers, exactly as
KD1. The online teacher scores the answer tokens; the loss, assembled by :func:`kdexp.core.losses.blend`, is

    L = (1 − alpha) · Σ_gold CE / N_gold  +  alpha · T² · Σ_answer D / N_answer

over the accumulated batch. Sampled answers carry no gold, so on an on-policy step only the KD term applies.
``loss``: ``jsd`` (generalized JSD with ``beta``: 0 forward KL, 1 reverse KL), ``skew_kl`` / ``skew_reverse_kl``
(DistiLLM, ``skew_alpha``), or ``sampled_rkl``: on on-policy steps the per-token estimate
``log p_S(y_t) − log p_T(y_t)`` of the reverse KL on the student's own tokens y_t, its gradient the score-function
(REINFORCE) estimate with the sample held fixed; off-policy steps use the exact reverse KL on the fixed answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import II

from kdexp.config.checks import choice, fail, finite, fraction, positive
from kdexp.core.artefacts import content_hash
from kdexp.core.evaluate import stop_token_ids
from kdexp.core.losses import generalized_jsd, reverse_kl, skew_kl, skew_reverse_kl
from kdexp.core.models import Encoded, collate
from kdexp.core.runner import build_student, finish, setup, student_args
from kdexp.core.stages import stage_losses
from kdexp.core.training import train_model
from kdexp.methods import artefacts
from kdexp.methods.kd1 import DistillationTrainer, kd_features

log = logging.getLogger(__name__)
NAME = "kd4"
NEEDS_SHARED_VOCAB = True  # the teacher scores the student's token ids
TRAINS_STUDENT = True
BASELINE = False
LOSS_WEIGHTS = ("alpha",)
LABEL_KNOBS = {"lmbda": "λ", "loss": "loss"}
LOSSES = ("jsd", "sampled_rkl", "skew_kl", "skew_reverse_kl")
SAMPLER_FILE = "kd4_sampler.pt"
# A step's samples shorter than this fraction of the batch's gold / teacher answers count as collapsed.
COLLAPSE_RATIO = 0.5


@dataclass
class GenerationConfig:
    """How the student samples its own answers on on-policy steps (always sampling; top-k filtering is off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = II("task.max_new_tokens")


@dataclass
class Config:
    name: str = NAME
    # Probability that an optimizer step trains on the student's own samples (GKD's lambda); 0 = KD1 online.
    lmbda: float = 0.5
    # jsd | sampled_rkl | skew_kl | skew_reverse_kl
    loss: str = "jsd"
    # Generalized JSD mixture (loss=jsd): 0 = forward KL(p_T‖p_S), 1 = reverse KL(p_S‖p_T).
    beta: float = 0.5
    # DistiLLM skew (loss=skew_kl / skew_reverse_kl), in (0, 1].
    skew_alpha: float = 0.1
    temperature: float = 1.0
    # Weight of the KD term; 1 - alpha weights CE on gold answers (off-policy steps only: samples have no gold).
    alpha: float = 1.0
    # Only online: student samples are new every step, so no cache can hold the teacher's view of them.
    teacher_signal: str = "online"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    unlabeled_samples: int = II("task.unlabeled_samples")


def check(cfg) -> None:
    """KD4's knobs, before any model loads; one-line ValueErrors naming the key."""
    m = cfg.method
    keys = ["method.lmbda", "method.beta", "method.skew_alpha", "method.alpha", "method.temperature",
            "method.generation.temperature", "method.generation.top_p"]
    finite(cfg, keys)
    fraction(cfg, ["method.lmbda", "method.beta", "method.alpha", "method.generation.top_p"])
    if not 0 < m.skew_alpha <= 1:
        fail("method.skew_alpha", m.skew_alpha, "must be in (0, 1]")
    positive(cfg, ["method.temperature", "method.generation.temperature", "method.generation.top_p",
                   "method.generation.max_new_tokens"])
    positive(cfg, ["method.unlabeled_samples"], strict=False)
    choice(cfg, "method.loss", LOSSES)
    if m.teacher_signal != "online":
        fail("method.teacher_signal", m.teacher_signal, f"must be online: KD4 (method.loss={m.loss}) scores the "
             "student's own samples, new every step, which no teacher cache holds")
    for key, value in stage_losses(cfg, "alpha"):
        if not 0 <= value <= 1:
            fail(key, value, "must be in [0, 1]")


def divergence(m):
    """The full-distribution divergence of ``method.loss`` (sampled_rkl: the exact reverse KL of off-policy steps)."""
    if m.loss == "jsd":
        return partial(generalized_jsd, beta=float(m.beta))
    if m.loss in ("skew_kl", "skew_reverse_kl"):
        return partial(skew_kl if m.loss == "skew_kl" else skew_reverse_kl, skew_alpha=float(m.skew_alpha))
    return reverse_kl


def sampled_reverse_kl(student_logits, teacher_logits, sampled_ids, mask, *, temperature: float = 1.0):
    """Σ over masked tokens of ``log p_S(y_t) − log p_T(y_t)`` on sampled tokens ``y_t ~ p_S``; float32 scalar.

    Shapes: logits (B, A, V), ``sampled_ids`` / ``mask`` (B, A). Only the teacher's log-prob of each sampled token is
    read. The value is the unbiased per-token estimate of reverse KL(p_S‖p_T); the gradient is the score-function
    estimate ``Σ (log p_S − log p_T)·∇log p_S(y_t)`` with the sample and the advantage held fixed (the direct
    derivative of the estimate would be ``∇log p_S(y_t)``, whose expectation is 0).
    """
    keep = mask.bool()
    ids = sampled_ids[keep].long().unsqueeze(-1)
    logp_s = torch.log_softmax(student_logits[keep].float() / temperature, -1).gather(-1, ids).squeeze(-1)
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher_logits[keep].float() / temperature, -1).gather(-1, ids).squeeze(-1)
    estimate = (logp_s - logp_t).detach()
    return (estimate + estimate * (logp_s - logp_s.detach())).sum()


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], *, pad_id: int, stop_ids: list[int], generation,
                   seed: int) -> list[list[int]]:
    """Sample one answer per prompt from ``model`` (left-padded batch), each cut after its first stop token.

    The global RNG is forked and seeded with ``seed``: samples depend on the seed alone, and the Trainer's own random
    stream (data order, dropout) is left exactly as it was.
    """
    device = next(model.parameters()).device
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=generation.temperature, top_p=generation.top_p, top_k=0,
                                 max_new_tokens=generation.max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=pad_id)
    finally:
        model.train(was_training)
    stops = set(stop_ids)
    answers = []
    for row in out[:, length:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        answers.append(row[:cut])
    return answers


@dataclass
class Policy:
    """What KD4 carries across steps, stages and resumes: the sampler's generator and the run's totals."""

    lmbda: float
    generation: object
    pad_id: int
    stop_ids: list[int]
    generator: torch.Generator
    totals: dict = field(default_factory=lambda: {"steps": 0, "on_policy_steps": 0, "sampled_tokens": 0,
                                                  "sampled_rows": 0, "reference_tokens": 0, "reference_rows": 0,
                                                  "generate_s": 0.0, "collapsed_steps": 0, "sample_hashes": []})

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "totals": self.totals}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.totals = state["totals"]


def _prompts_and_lengths(batch: dict) -> tuple[list[list[int]], list[int]]:
    """Each row's prompt ids (its tokens before the answer slots) and its answer length, from a collated batch."""
    n_answer = batch["answer_mask"].sum(-1).tolist()
    prompts = [row[keep.bool()].tolist()[: int(keep.sum()) - n]
               for row, keep, n in zip(batch["input_ids"], batch["attention_mask"], n_answer, strict=True)]
    return prompts, [int(n) for n in n_answer]


class OnPolicyTrainer(DistillationTrainer):
    """KD1's trainer whose batches become the student's own samples on a seeded λ fraction of optimizer steps."""

    def __init__(self, *args, policy: Policy, sampled: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy, self.sampled = policy, sampled
        self._window = {"steps": 0, "on": 0, "sampled": 0, "rows": 0, "reference": 0, "ref_rows": 0, "gen_s": 0.0}
        self._window_start = time.perf_counter()
        self._warned = False

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / SAMPLER_FILE
            if not path.is_file():
                raise ValueError(f"resume: {resume_from_checkpoint} has no {SAMPLER_FILE}; the remaining on-policy "
                                 "samples could not be reproduced (delete the checkpoints to start over)")
            self.policy.load(torch.load(path, weights_only=False))
        self._window_start = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        torch.save(self.policy.state(), Path(output_dir) / SAMPLER_FILE)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        policy, totals = self.policy, self.policy.totals
        on = bool(torch.rand((), generator=policy.generator) < policy.lmbda)
        totals["steps"] += 1
        self._window["steps"] += 1
        if not on or not batches:
            return batches, n_items
        # Every rank draws the same coin and seed (one generator, seeded alike); the rank offset gives each
        # process's different prompts their own sampling noise instead of the same uniform draws.
        seed = int(torch.randint(2**62, (), generator=policy.generator)) + 1_000_003 * self.args.process_index
        start = time.perf_counter()
        new_batches, sampled, reference = [], [], []
        for i, batch in enumerate(batches):
            prompts, lengths = _prompts_and_lengths(batch)
            answers = sample_answers(self.model, prompts, pad_id=policy.pad_id, stop_ids=policy.stop_ids,
                                     generation=policy.generation, seed=seed + i)
            feats = [Encoded(prompt_ids=p, answer_ids=a, index=j, labelled=False)
                     for j, (p, a) in enumerate(zip(prompts, answers, strict=True))]
            new_batches.append({**collate(feats, policy.pad_id), "on_policy": torch.tensor(True)})
            sampled += [len(a) for a in answers]
            reference += lengths
            totals["sample_hashes"].append(content_hash(answers))
        elapsed = time.perf_counter() - start
        self._record(sampled, reference, elapsed)
        # Sampled answers have no gold: the CE count is 0, the KD count every sampled token.
        self._ce_count = 0
        self._kd_count = sum(int(b["answer_mask"].sum()) for b in new_batches)
        return new_batches, n_items  # Trainer only hands n_items to compute_loss, which counts for itself

    def _record(self, sampled: list[int], reference: list[int], seconds: float) -> None:
        totals, w = self.policy.totals, self._window
        for key, value in (("on_policy_steps", 1), ("sampled_tokens", sum(sampled)), ("sampled_rows", len(sampled)),
                           ("reference_tokens", sum(reference)), ("reference_rows", len(reference)),
                           ("generate_s", seconds)):
            totals[key] += value
        for key, value in (("on", 1), ("sampled", sum(sampled)), ("rows", len(sampled)),
                           ("reference", sum(reference)), ("ref_rows", len(reference)), ("gen_s", seconds)):
            w[key] += value
        mean_sampled, mean_reference = sum(sampled) / len(sampled), sum(reference) / len(reference)
        if mean_sampled < COLLAPSE_RATIO * mean_reference:
            totals["collapsed_steps"] += 1
            if not self._warned:  # once per stage: the summary in results.json counts every such step
                self._warned = True
                log.warning("kd4: the student's samples collapse in length (mean %.1f tokens vs %.1f in the "
                            "gold/teacher answers) at step %d: check that EOS / the task's stop strings match what "
                            "the student learned to emit (the known failure of on-policy KD)",
                            mean_sampled, mean_reference, self.state.global_step + 1)

    def kd_term(self, logits, inputs) -> torch.Tensor:
        if self.sampled and bool(inputs.get("on_policy", False)):
            return sampled_reverse_kl(logits, self.teacher_logits(inputs), inputs["answer_ids"],
                                      inputs["answer_mask"], temperature=self.temperature)
        return super().kd_term(logits, inputs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        w = self._window
        if "loss" in logs and w["steps"]:
            now = time.perf_counter()
            logs["kd4_on_policy_frac"] = round(w["on"] / w["steps"], 4)
            if w["rows"]:  # lengths only where the window had an on-policy step
                logs["kd4_sampled_len"] = round(w["sampled"] / w["rows"], 3)
                logs["kd4_reference_len"] = round(w["reference"] / w["ref_rows"], 3)
            logs["kd4_generate_share"] = round(w["gen_s"] / max(now - self._window_start, 1e-9), 4)
            self._window = dict.fromkeys(w, 0)
            self._window["gen_s"] = 0.0
            self._window_start = now
        super().log(logs, *args, **kwargs)


def summary(policy: Policy) -> dict:
    t = policy.totals
    return {"lmbda": policy.lmbda, "steps": t["steps"], "on_policy_steps": t["on_policy_steps"],
            "on_policy_fraction": t["on_policy_steps"] / max(t["steps"], 1),
            "sampled_tokens": t["sampled_tokens"], "sampled_rows": t["sampled_rows"],
            "mean_sampled_len": t["sampled_tokens"] / t["sampled_rows"] if t["sampled_rows"] else None,
            "mean_reference_len": t["reference_tokens"] / t["reference_rows"] if t["reference_rows"] else None,
            "generate_s": round(t["generate_s"], 3),
            "generate_tokens_per_s": t["sampled_tokens"] / t["generate_s"] if t["generate_s"] else None,
            "collapsed_steps": t["collapsed_steps"], "sample_hashes": list(t["sample_hashes"])}


def run(cfg, out_dir: Path, run_key: str) -> dict:
    m = cfg.method
    ctx = setup(cfg, out_dir, run_key, need_teacher=True, shared_vocab=NEEDS_SHARED_VOCAB,
                unlabeled_samples=m.unlabeled_samples)
    # Off-policy steps train on gold and (transfer set) teacher answers exactly as KD1; those answers are
    # content-addressed, so a lambda sweep pays for them once.
    feats = kd_features(ctx)
    tok = ctx.tokenizer
    policy = Policy(lmbda=float(m.lmbda), generation=m.generation, pad_id=tok.pad_token_id,
                    stop_ids=stop_token_ids(tok, list(cfg.task.stop_strings)),
                    generator=torch.Generator().manual_seed(int(cfg.seed)))
    student = build_student(ctx)
    start = time.perf_counter()
    history = train_model(student, feats, student_args(ctx), tok.pad_token_id, trainer_cls=OnPolicyTrainer,
                          alpha=m.alpha, temperature=m.temperature, divergence=divergence(m), teacher=ctx.teacher,
                          vocab_size=len(tok), policy=policy, sampled=m.loss == "sampled_rkl")
    ctx.timings["train_s"] = time.perf_counter() - start
    ctx.extra["kd4"] = summary(policy)
    return finish(ctx, student, history)


# ---- what its runs need from the teacher (python -m kdexp.cache build) ---------------------------------------------

teacher_artefacts = artefacts.for_online_kd
