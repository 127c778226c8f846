"""Identities and golden numbers for kdexp.core.losses."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from kdexp.core.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    check_divergence,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    masked_cross_entropy,
    prob_cosine,
    prob_mse,
    resolve_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)

# Every registered divergence (a new one is tested by adding it to DIVERGENCES), plus JSD off its default beta.
ALL_DIVERGENCES = [
    *(pytest.param(fn, id=name) for name, fn in DIVERGENCES.items()),
    pytest.param(lambda s, t, **kw: generalized_jsd(s, t, beta=0.3, **kw), id="jsd_beta0.3"),
]
B, S, V = 3, 5, 11


def my_div(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    """A user-defined divergence, resolved by dotted path in the tests below."""
    return tvd(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)


def _logits(seed, scale=2.0, shape=(B, S, V), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _mask(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand((B, S), generator=gen) > 0.35
    mask[0, 0] = True
    return mask


@pytest.mark.parametrize("div", ALL_DIVERGENCES)
def test_equal_logits_give_zero(div):
    logits = _logits(0)
    assert abs(div(logits, logits.clone(), temperature=2.0).item()) < 1e-6


def test_kl_nonnegative():
    for seed in range(5):
        s, t = _logits(seed), _logits(seed + 100)
        assert forward_kl(s, t).item() >= 0
        assert reverse_kl(s, t).item() >= 0


def test_jsd_endpoints_exact_and_midpoint_symmetric():
    s, t, mask = _logits(1), _logits(2), _mask()
    assert torch.equal(generalized_jsd(s, t, beta=0.0, mask=mask), forward_kl(s, t, mask=mask))
    assert torch.equal(generalized_jsd(s, t, beta=1.0, mask=mask), reverse_kl(s, t, mask=mask))
    a = generalized_jsd(s, t, beta=0.5, temperature=2.0)
    b = generalized_jsd(t, s, beta=0.5, temperature=2.0)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # JSD_0.5 is bounded by log 2.
    assert 0 < a.item() <= math.log(2)


def test_jsd_matches_trl_formula():
    s, t = _logits(3).double(), _logits(4).double()
    beta = 0.3
    s_lp, t_lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    m = beta * t_lp.exp() + (1 - beta) * s_lp.exp()
    ref = beta * (t_lp.exp() * (t_lp - m.log())).sum(-1) + (1 - beta) * (s_lp.exp() * (s_lp - m.log())).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta=beta).double(), ref.mean(), atol=1e-6, rtol=0)


def test_tvd_is_half_l1_and_bounded():
    s, t, mask = _logits(5, scale=4.0), _logits(6, scale=4.0), _mask()
    ref = 0.5 * (F.softmax(t.double() / 2, -1) - F.softmax(s.double() / 2, -1)).abs().sum(-1)
    value = tvd(s, t, temperature=2.0, mask=mask)
    torch.testing.assert_close(value.double(), ref[mask].mean(), atol=1e-6, rtol=0)
    per_token = tvd(s, t, reduction="sum", mask=torch.eye(B, S, dtype=torch.bool))
    assert 0 <= value.item() <= 1 and 0 <= per_token.item() <= B


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_golden_against_kl_div(temperature):
    s, t, mask = _logits(7), _logits(8), _mask()
    s_lp = F.log_softmax(s.double() / temperature, -1)[mask]
    t_lp = F.log_softmax(t.double() / temperature, -1)[mask]
    n_tokens = int(mask.sum())
    fwd_ref = F.kl_div(s_lp, t_lp, log_target=True, reduction="sum") / n_tokens
    rev_ref = F.kl_div(t_lp, s_lp, log_target=True, reduction="sum") / n_tokens
    fwd = forward_kl(s, t, temperature=temperature, mask=mask)
    rev = reverse_kl(s, t, temperature=temperature, mask=mask)
    assert fwd.dtype == torch.float32
    torch.testing.assert_close(fwd.double(), fwd_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(rev.double(), rev_ref, atol=1e-6, rtol=0)


def test_hand_computed_two_token_vocab():
    # p_S = softmax([0, 0]) = (0.5, 0.5); p_T = softmax([0, ln 3]) = (0.25, 0.75).
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, math.log(3.0)]])
    assert forward_kl(s, t).item() == pytest.approx(0.13081203594113697, abs=1e-6)  # .25 ln .5 + .75 ln 1.5
    assert reverse_kl(s, t).item() == pytest.approx(0.14384103622589042, abs=1e-6)  # .5 ln(4/3)
    assert generalized_jsd(s, t).item() == pytest.approx(0.033822075568605205, abs=1e-6)  # m = (.375, .625)
    assert tvd(s, t).item() == pytest.approx(0.25, abs=1e-6)
    assert prob_mse(s, t).item() == pytest.approx(0.125, abs=1e-6)
    assert prob_cosine(s, t).item() == pytest.approx(0.10557280900008414, abs=1e-6)


@pytest.mark.parametrize("div", ALL_DIVERGENCES)
def test_masked_tokens_are_ignored(div):
    mask = _mask()
    s, t = _logits(9), _logits(10)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = 1e4 * torch.sign(_logits(11)[~mask])
    t_bad[~mask] = -1e4 * torch.sign(_logits(12)[~mask])
    values, grads = [], []
    for student, teacher in ((s, t), (s_bad, t_bad)):
        student = student.clone().requires_grad_(True)
        value = div(student, teacher, temperature=2.0, mask=mask)
        value.backward()
        values.append(value)
        grads.append(student.grad)
    assert torch.equal(values[0], values[1])
    assert torch.equal(grads[0], grads[1])
    assert torch.count_nonzero(grads[1][~mask]) == 0


@pytest.mark.parametrize("div", ALL_DIVERGENCES)
def test_gradients_finite_at_extreme_logits(div):
    s = (1e4 * torch.sign(_logits(13))).requires_grad_(True)
    t = (1e4 * torch.sign(_logits(14))).requires_grad_(True)
    value = div(s, t)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("div", ALL_DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_matches_unchunked(div, reduction):
    mask = _mask()  # 15 positions, ~10 counted: chunk sizes 3 and 4 do not divide it
    results = []
    for chunk_size in (None, 3, 4):
        s = _logits(15).requires_grad_(True)
        t = _logits(16).requires_grad_(True)
        value = div(s, t, temperature=2.0, mask=mask, reduction=reduction, chunk_size=chunk_size)
        value.backward()
        results.append((value, s.grad, t.grad))
    for value, s_grad, t_grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(s_grad, results[0][1], atol=1e-6, rtol=0)
        torch.testing.assert_close(t_grad, results[0][2], atol=1e-6, rtol=0)


def test_chunking_keeps_no_float32_vocab_blocks_for_backward():
    s = _logits(17, dtype=torch.bfloat16).requires_grad_(True)
    t = _logits(18, dtype=torch.bfloat16)

    def saved_float32_blocks(chunk_size):
        saved = []

        def pack(x):
            if x.dtype == torch.float32 and x.dim() >= 1 and x.shape[-1] == V:
                saved.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            value = generalized_jsd(s, t, temperature=2.0, chunk_size=chunk_size)
        value.backward()
        assert value.dtype == torch.float32
        return saved

    assert saved_float32_blocks(None)  # sanity: the hook does see the unchunked intermediates
    assert saved_float32_blocks(4) == []


@pytest.mark.parametrize("div", ALL_DIVERGENCES)
def test_no_counted_tokens_gives_zero_with_graph(div):
    s = _logits(19).requires_grad_(True)
    for chunk_size in (None, 4):
        value = div(s, _logits(20), mask=torch.zeros(B, S, dtype=torch.bool), chunk_size=chunk_size)
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
    assert torch.count_nonzero(s.grad) == 0


def _labels(seed=21):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # prompt tokens
    return labels


def test_alpha_zero_is_exactly_cross_entropy_without_teacher():
    s, labels = _logits(22), _labels()
    for reduction in ("mean", "sum"):
        loss, _, kd = distillation_loss(s, None, labels, alpha=0.0, temperature=4.0, reduction=reduction)
        assert torch.equal(loss, masked_cross_entropy(s, labels, reduction=reduction)) and kd is None
    keep = labels != IGNORE_INDEX
    ref = F.cross_entropy(s.double()[keep], labels[keep])
    torch.testing.assert_close(masked_cross_entropy(s, labels).double(), ref, atol=1e-6, rtol=0)
    labels_none = torch.full_like(labels, IGNORE_INDEX)
    assert masked_cross_entropy(s.requires_grad_(True), labels_none).item() == 0.0


def test_alpha_one_is_t2_forward_kl_and_blend():
    s, t, labels = _logits(23).requires_grad_(True), _logits(24), _labels()
    loss, ce, kd = distillation_loss(s, t, labels, alpha=1.0, temperature=2.0)
    expected = 4.0 * forward_kl(s, t, temperature=2.0, mask=labels != IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ce, masked_cross_entropy(s, labels))
    assert not ce.requires_grad  # logged, not trained on
    loss, ce, kd = distillation_loss(s, t, labels, alpha=0.25, temperature=2.0, divergence=generalized_jsd, beta=0.7)
    torch.testing.assert_close(kd, generalized_jsd(s, t, beta=0.7, temperature=2.0, mask=labels != IGNORE_INDEX))
    torch.testing.assert_close(loss, 0.75 * ce + 0.25 * 4.0 * kd)


def test_unlabelled_example_contributes_only_to_kd():
    s, t, labels = _logits(25).requires_grad_(True), _logits(26), _labels()
    labels[1] = IGNORE_INDEX  # example 1 is unlabelled transfer data
    kd_mask = torch.ones(B, S, dtype=torch.bool)
    kd_mask[:, 0] = False
    loss, ce, kd = distillation_loss(s, t, labels, alpha=0.5, temperature=2.0, kd_mask=kd_mask)
    torch.testing.assert_close(ce, masked_cross_entropy(s[[0, 2]], labels[[0, 2]]))
    torch.testing.assert_close(kd, forward_kl(s, t, temperature=2.0, mask=kd_mask))
    (ce_grad,) = torch.autograd.grad(ce, s, retain_graph=True)
    (loss_grad,) = torch.autograd.grad(loss, s)
    assert torch.count_nonzero(ce_grad[1]) == 0 and torch.count_nonzero(loss_grad[1]) > 0


def test_sum_over_count_equals_mean():
    s, t, labels = _logits(27), _logits(28), _labels()
    kd_mask = _mask(3)
    kw = {"alpha": 0.4, "temperature": 3.0, "kd_mask": kd_mask, "chunk_size": 4}
    _, ce_sum, kd_sum = distillation_loss(s, t, labels, reduction="sum", **kw)
    _, ce_mean, kd_mean = distillation_loss(s, t, labels, reduction="mean", **kw)
    torch.testing.assert_close(ce_sum / (labels != IGNORE_INDEX).sum(), ce_mean)
    torch.testing.assert_close(kd_sum / kd_mask.sum(), kd_mean)


def test_resolve_divergence():
    names = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": generalized_jsd,
        "tvd": tvd,
        "prob_mse": prob_mse,
        "prob_cosine": prob_cosine,
        "skew_kl": skew_kl,
        "skew_reverse_kl": skew_reverse_kl,
    }
    assert all(resolve_divergence(name) is fn for name, fn in names.items()) and DIVERGENCES == names
    assert resolve_divergence("kdexp.core.losses.reverse_kl") is reverse_kl
    custom = resolve_divergence(f"{__name__}.my_div")
    s, t = _logits(29), _logits(30)
    assert torch.equal(custom(s, t), tvd(s, t))
    _, _, kd = distillation_loss(s, t, _labels(), alpha=0.5, temperature=2.0, divergence=custom)
    assert torch.equal(kd, tvd(s, t, temperature=2.0, mask=_labels() != IGNORE_INDEX))


def test_resolve_divergence_errors():
    message = (
        "method.divergence: unknown divergence 'xyz'; choose one of forward_kl, reverse_kl, jsd, tvd, "
        "prob_mse, prob_cosine, skew_kl, skew_reverse_kl or a dotted path to a function"
    )
    with pytest.raises(ValueError) as info:
        resolve_divergence("xyz")
    assert str(info.value) == message
    for bad in ("no_such_pkg_kdexp.fn", "kdexp.core.losses.no_such_fn"):
        with pytest.raises(ValueError, match="method.divergence"):
            resolve_divergence(bad)
    with pytest.raises(ValueError, match="method.divergence.*is not callable"):
        resolve_divergence("kdexp.core.losses.IGNORE_INDEX")
    assert resolve_divergence("kdexp.core.losses:reverse_kl") is reverse_kl


def test_divergence_check_runs_no_user_code(capsys):
    """`this.nothing` used to import `this` at validation time, which printed the Zen of Python."""
    check_divergence("kdexp.core.losses:tvd")
    with pytest.raises(ValueError, match="no module 'no_such_pkg_kdexp'"):
        check_divergence("no_such_pkg_kdexp.fn")
    sys.modules.pop("this", None)
    check_divergence("this.nothing")  # the module exists; its attribute is only looked up at run time
    assert "this" not in sys.modules and capsys.readouterr().out == ""
    for bad in ("9bad", "a b.c", "pkg:"):
        with pytest.raises(ValueError, match="method.divergence"):
            check_divergence(bad)
