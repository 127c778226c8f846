"""Identities and golden numbers for the skew divergences (DistiLLM) in kdexp.core.losses."""

import math

import pytest
import torch

from kdexp.core.losses import (
    DIVERGENCES,
    distillation_loss,
    forward_kl,
    resolve_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)

B, S, V = 3, 4, 13
PAIRS = [(skew_kl, forward_kl), (skew_reverse_kl, reverse_kl)]


def _logits(seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn((B, S, V), generator=gen)


def _mask():
    mask = torch.ones((B, S), dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 3] = False
    return mask


def test_registered_by_name():
    assert DIVERGENCES["skew_kl"] is skew_kl and resolve_divergence("skew_reverse_kl") is skew_reverse_kl


@pytest.mark.parametrize("skew,plain", PAIRS)
def test_alpha_one_is_zero(skew, plain):
    s, t = _logits(0), _logits(1)
    assert skew(s, t, skew_alpha=1.0, temperature=2.0, mask=_mask()).item() == 0.0
    assert plain(s, t).item() > 0.1  # the pair is far apart: the 0 above is the identity, not a tiny divergence


@pytest.mark.parametrize("skew,plain", PAIRS)
def test_alpha_zero_is_plain_kl(skew, plain):
    s, t, mask = _logits(2), _logits(3), _mask()
    exact = skew(s, t, skew_alpha=0.0, temperature=1.5, mask=mask)
    assert torch.equal(exact, plain(s, t, temperature=1.5, mask=mask))
    # The mixture formula (not the special case) converges to the plain KL as alpha -> 0.
    near = skew(s, t, skew_alpha=1e-7, temperature=1.5, mask=mask)
    assert near.item() == pytest.approx(exact.item(), rel=1e-4)


@pytest.mark.parametrize("skew,plain", PAIRS)
def test_between_zero_and_plain_and_bounded(skew, plain):
    s, t = _logits(4), _logits(5)
    full = plain(s, t).item()
    values = [skew(s, t, skew_alpha=a).item() for a in (0.9, 0.5, 0.1, 0.01)]
    # Less skew, more divergence (convexity of KL in its second argument); never above the plain KL, and the
    # log-ratio bound −log(alpha) caps every token.
    assert values == sorted(values) and 0 < values[0] and values[-1] < full
    per_token = skew(s, t, skew_alpha=0.1, reduction="none")
    assert per_token.max().item() <= -math.log(0.1) + 1e-6


def test_golden_two_token_example():
    # p_T = (0.5, 0.5), p_S = (0.8, 0.2), alpha = 0.25, T = 1, one token.
    teacher = torch.tensor([[0.0, 0.0]])
    student = torch.tensor([[math.log(4.0), 0.0]])
    m_fwd = (0.25 * 0.5 + 0.75 * 0.8, 0.25 * 0.5 + 0.75 * 0.2)  # (0.725, 0.275)
    golden_fwd = 0.5 * math.log(0.5 / m_fwd[0]) + 0.5 * math.log(0.5 / m_fwd[1])
    m_rev = (0.25 * 0.8 + 0.75 * 0.5, 0.25 * 0.2 + 0.75 * 0.5)  # (0.575, 0.425)
    golden_rev = 0.8 * math.log(0.8 / m_rev[0]) + 0.2 * math.log(0.2 / m_rev[1])
    assert skew_kl(student, teacher, skew_alpha=0.25).item() == pytest.approx(golden_fwd, rel=1e-5)
    assert skew_reverse_kl(student, teacher, skew_alpha=0.25).item() == pytest.approx(golden_rev, rel=1e-5)
    assert golden_fwd == pytest.approx(0.1131367, abs=1e-6) and golden_rev == pytest.approx(0.1134390, abs=1e-6)


@pytest.mark.parametrize("skew", [skew_kl, skew_reverse_kl])
def test_gradient_finite_where_plain_kl_explodes(skew):
    # The student gives the teacher's favourite token ~e^-60 of its mass: forward KL's gradient is huge there;
    # the skewed mixture keeps every log-ratio bounded.
    teacher = torch.tensor([[0.0, 0.0, 0.0]])
    student = torch.tensor([[-60.0, 0.0, 0.0]], requires_grad=True)
    loss = skew(student, teacher, skew_alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("skew", [skew_kl, skew_reverse_kl])
def test_chunking_and_blend(skew):
    s, t, mask = _logits(6), _logits(7), _mask()
    assert skew(s, t, mask=mask, chunk_size=2).item() == pytest.approx(skew(s, t, mask=mask).item(), rel=1e-6)
    labels = torch.where(mask, torch.zeros((B, S), dtype=torch.long), -100)
    # Divergence kwargs reach the skew through the blended loss (what a logit method calls).
    _, _, kd = distillation_loss(s, t, labels, alpha=0.5, temperature=2.0, divergence=skew, skew_alpha=0.3)
    assert kd.item() == pytest.approx(skew(s, t, skew_alpha=0.3, temperature=2.0, mask=mask).item(), rel=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_alpha_out_of_range(bad):
    with pytest.raises(ValueError, match="skew_alpha"):
        skew_kl(_logits(0), _logits(1), skew_alpha=bad)
