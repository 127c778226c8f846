"""Sampled sparse teacher targets: unbiasedness over sampling seeds, exact limits, bit-packed ids, stored layout."""

import h5py
import numpy as np
import pytest
import torch

from kdexp.core.bitpack import id_bits, pack_ids, packed_width, unpack_ids
from kdexp.core.cache_fidelity import sparse_target_report
from kdexp.core.losses import forward_kl
from kdexp.core.sparse_target import cached_forward_kl_estimate, sampled_forward_kl
from kdexp.core.teacher_cache import (
    FORMAT_VERSION,
    CacheInvalid,
    build_teacher_cache,
    open_teacher_cache,
    rows_from_logits,
    teacher_log_partition,
)
from kdexp.experiments.compose import compose
from kdexp.methods import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, TOKENS = 400, 3


def fp16_exact_logits(n, vocab, seed):
    """Zipf-like logits on a 1/64 grid in (-32, 0]: fp16 stores them exactly, so the cache's only approximation
    left is the tail summary, and the sampled estimator can be checked for bias at the precision of float32."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=g).float() + 1
    z = -1.6 * ranks.log() + 0.7 * torch.randn(n, vocab, generator=g)
    z[:, 0] += 3.0
    z = torch.round((z - z.max(-1, keepdim=True).values) * 64) / 64
    return z.clamp_min(-31.0)


def student_logits(teacher, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(teacher.shape, generator=g)
    return teacher + noise if kind == "imitating" else noise


def estimate(rows, student, t, log_partition=None):
    """(loss, gradient w.r.t. the student logits) of the sampled estimator over all tokens."""
    student = student.clone().requires_grad_(True)
    mask = torch.ones(student.shape[0], dtype=torch.bool)
    F = teacher_log_partition(rows, t) if log_partition is None else log_partition
    loss = sampled_forward_kl(student, rows["topk_logits"], rows["topk_ids"], rows["sample_ids"],
                              rows["sample_logits"], rows["sample_logw"], F, temperature=t, mask=mask)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def full(teacher, student, t):
    student = student.clone().requires_grad_(True)
    loss = forward_kl(student, teacher, temperature=t, reduction="sum")
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def exact_log_partition(teacher, t):
    return torch.logsumexp(teacher.double() / t, -1).float()


@pytest.mark.parametrize(("top_k", "samples"), [(8, 12), (0, 16)], ids=["head_sampled", "sampled"])
@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["untrained", "imitating"])
def test_mean_over_sampling_seeds_is_the_full_vocabulary_loss_and_gradient(top_k, samples, t, kind):
    """Over independent draws (seeds), mean estimate = full-vocab forward KL within 4 standard errors, for the loss
    and for 3 random projections of the gradient; the log-partition is the exact one (unbiased given F)."""
    teacher = fp16_exact_logits(TOKENS, VOCAB, seed=0)
    student = student_logits(teacher, kind)
    F = exact_log_partition(teacher, t)
    draws = [estimate(rows_from_logits(teacher, top_k, samples=samples, seed=s), student, t, F) for s in range(300)]
    losses = torch.stack([d[0] for d in draws]).double()
    directions = torch.randn(3, *teacher.shape, generator=torch.Generator().manual_seed(7)).double()
    projections = torch.stack([(directions * d[1].double()).sum((1, 2)) for d in draws])  # (draws, 3)
    ref_loss, ref_grad = full(teacher, student, t)
    ref_proj = (directions * ref_grad.double()).sum((1, 2))
    se = losses.std() / len(draws) ** 0.5
    assert losses.std() > 0  # really random: the check below could not pass by construction
    assert (losses.mean() - ref_loss).abs() <= 4 * se + 1e-5
    proj_se = projections.std(0) / len(draws) ** 0.5
    assert ((projections.mean(0) - ref_proj).abs() <= 4 * proj_se + 1e-6).all()


def test_biased_reference_is_detected():
    """The check above has power: the head + uniform-tail target's error on an imitating student is many SEs."""
    teacher = fp16_exact_logits(TOKENS, VOCAB, seed=0)
    student = student_logits(teacher, "imitating")
    report = sparse_target_report(teacher, student, top_k=8, temperatures=(2,))
    draws = torch.stack([estimate(rows_from_logits(teacher, 8, samples=12, seed=s), student, 2.0,
                                  exact_log_partition(teacher, 2.0))[0] for s in range(100)]).double()
    assert abs(report["2"]["mean_error"]) * TOKENS > 10 * draws.std() / 10


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_samples_covering_the_whole_tail_or_a_full_head_are_exact(t):
    teacher = fp16_exact_logits(TOKENS, VOCAB, seed=2)
    student = student_logits(teacher, "imitating")
    ref_loss, ref_grad = full(teacher, student, t)
    for top_k, samples in [(8, VOCAB - 8), (8, VOCAB), (VOCAB, 4), (0, VOCAB)]:
        rows = rows_from_logits(teacher, top_k, samples=samples, seed=0)
        loss, grad = estimate(rows, student, t, exact_log_partition(teacher, t))
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-5), (top_k, samples)
        assert torch.allclose(grad, ref_grad, atol=1e-6), (top_k, samples)


def test_cache_log_partition_is_exact_at_the_sampling_temperature_and_close_elsewhere():
    teacher = fp16_exact_logits(TOKENS, 5000, seed=3)
    for t_s in (1.0, 2.0):
        rows = rows_from_logits(teacher, 16, samples=32, sample_temperature=t_s)
        for t in (0.5, 1.0, 2.0, 4.0):
            err = (teacher_log_partition(rows, t) - exact_log_partition(teacher, t)).abs().max().item()
            assert err <= (2e-6 if t == t_s else 5e-3), (t_s, t, err)


def test_training_path_is_unbiased_at_the_sampling_temperature():
    """cached_forward_kl_estimate with the cache's own log-partition: unbiased at T = T_s with no exact input."""
    teacher = fp16_exact_logits(TOKENS, VOCAB, seed=4)
    student = student_logits(teacher, "imitating")[None]
    mask = torch.ones(1, TOKENS, dtype=torch.bool)
    values = torch.stack([cached_forward_kl_estimate(
        student, {k: v[None] for k, v in rows_from_logits(teacher, 8, samples=12, seed=s).items()},
        vocab_size=VOCAB, temperature=1.0, mask=mask) for s in range(300)]).double()
    ref = forward_kl(student[0], teacher, temperature=1.0, reduction="sum")
    assert (values.mean() - ref).abs() <= 4 * values.std() / 300**0.5 + 1e-5


@pytest.mark.parametrize("vocab", [2, 3, 255, 256, 257, 50257, 70000, 128256])
def test_bit_packing_round_trips_at_ceil_log2_v_bits(vocab):
    bits = id_bits(vocab)
    assert bits == max(1, int(np.ceil(np.log2(vocab))))
    ids = np.random.default_rng(vocab).integers(0, vocab, size=(5, 13))
    ids[0, :2] = [0, vocab - 1]
    packed = pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, packed_width(13, bits)) == (5, -(-13 * bits // 8))
    assert np.array_equal(unpack_ids(packed, 13, bits), ids)
    with pytest.raises(ValueError, match="ids must be in"):
        pack_ids(np.array([[2**bits]]), bits)


def _rows(n_examples=12, vocab=VOCAB):
    return {i: fp16_exact_logits(1 + i % 3, vocab, seed=100 + i) for i in range(n_examples)}


def _build(path, rows, order, **kw):
    kw = {"top_k": 8, "samples": 16, "sample_temperature": 1.0, "sample_seed": 5, "meta": {"t": 1}, **kw}
    return build_teacher_cache(path, [(i, rows[i]) for i in order], n_examples=len(rows), vocab_size=VOCAB,
                               progress=False, **kw)


def test_sampled_cache_round_trips_and_is_reproducible_in_any_build_order(tmp_path):
    rows = _rows()
    a = open_teacher_cache(_build(tmp_path / "a.h5", rows, range(12)))
    b = open_teacher_cache(_build(tmp_path / "b.h5", rows, reversed(range(12))))
    c = open_teacher_cache(_build(tmp_path / "c.h5", rows, range(12), sample_seed=6))
    with h5py.File(tmp_path / "a.h5", "r", locking=False) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 3 and f.attrs["id_bits"] == 9
        assert f["sample_ids"].dtype == np.uint8 and f["sample_ids"].shape[1] == packed_width(16, 9) == 18
        assert all(f[name].fletcher32 for name in ("topk_ids", "sample_ids", "sample_logits", "sample_lse"))
    for i, logits in rows.items():
        got = a[i]
        expected = rows_from_logits(logits, 8, samples=16, sample_temperature=1.0, seed=5, index=i)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), i
        assert all(torch.equal(got[k], b[i][k]) for k in got)
    assert any(not torch.equal(a[i]["sample_ids"], c[i]["sample_ids"]) for i in rows)


def test_sampled_only_cache_has_no_head_datasets(tmp_path):
    rows = _rows(4)
    cache = open_teacher_cache(_build(tmp_path / "s.h5", rows, range(4), top_k=0, samples=24))
    with h5py.File(tmp_path / "s.h5", "r", locking=False) as f:
        assert "topk_logits" not in f and "sample_ids" in f
    got = cache[2]
    assert got["topk_ids"].shape == (len(rows[2]), 0) and got["sample_ids"].shape == (len(rows[2]), 24)


def test_older_format_is_refused_and_rebuilt(tmp_path):
    path = _build(tmp_path / "old.h5", _rows(3), range(3))
    with h5py.File(path, "r+", locking=False) as f:
        f.attrs["format_version"] = 2
    with pytest.raises(CacheInvalid, match="format 2, expected 3"):
        open_teacher_cache(path)
    with pytest.warns(UserWarning, match="rebuilding"):
        _build(path, _rows(3), range(3))
    assert open_teacher_cache(path).samples == 16


def test_bad_layouts_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="method.cache_samples=0"):
        _build(tmp_path / "x.h5", _rows(2), range(2), top_k=0, samples=0)
    with pytest.raises(ValueError, match="method.cache_sample_temperature"):
        _build(tmp_path / "x.h5", _rows(2), range(2), sample_temperature=0.0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.cache_mode=topk"], r"method.cache_mode='topk' must be one of"),
    (["method.cache_mode=head_sampled", "method.divergence=reverse_kl"],
     r"method.cache_mode='head_sampled' needs method.divergence=forward_kl"),
    (["method.cache_mode=sampled", "method.cache_samples=0"], r"method.cache_samples=0 must be"),
    (["method.cache_sample_temperature=0"], r"method.cache_sample_temperature=0.0 must be"),
    (["method.cache_seed=-1"], r"method.cache_seed=-1 must be"),
])
def test_kd1_cache_knobs_fail_one_line_before_any_model(overrides, message):
    cfg = compose(["method=kd1", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(cfg)
    validate(compose(["method=kd1", "method.cache_mode=head_sampled", "method.divergence=reverse_kl",
                      "method.teacher_signal=online"]))  # online: no cache, the knob is inert
