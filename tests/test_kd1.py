"""KD1 end to end: B0 equivalence at alpha=0, cached vs online teacher, cache reuse, bad input."""

from pathlib import Path

import pytest
import torch

from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, assert_same_student, compose_cfg, results


def test_alpha_zero_trains_exactly_like_b0(make_cfg):
    b0 = make_cfg(*SMOKE, "method=b0", "seed=3", out="b0")
    kd = make_cfg(*SMOKE, "method=kd1", "method.alpha=0", "method.unlabeled_samples=0", "seed=3", out="kd")
    run(b0)
    run(kd)
    assert_same_student(b0, kd)


def test_cached_and_online_teacher_agree(make_cfg):
    cached = make_cfg(*SMOKE, "method=kd1", "method.alpha=1", "method.temperature=2", out="cached")
    online = make_cfg(*SMOKE, "method=kd1", "method.alpha=1", "method.temperature=2",
                      "method.teacher_signal=online", out="online")
    run(cached)
    run(online)
    kd_c = [h["loss_kd"] for h in results(cached)["train_log"] if "loss_kd" in h]
    kd_o = [h["loss_kd"] for h in results(online)["train_log"] if "loss_kd" in h]
    assert kd_c and len(kd_c) == len(kd_o)
    # Same batches and init; the cache keeps top-64 exactly and summarises the tail, so values nearly coincide.
    assert kd_c == pytest.approx(kd_o, abs=2e-3, rel=0.02)
    assert results(cached)["teacher_cache"]["tokens"] > 0 and "teacher_cache" not in results(online)


def test_cache_built_once_for_a_sweep(make_cfg, caplog):
    with caplog.at_level("INFO"):
        for i, (t, a) in enumerate([(1, 0.5), (4, 0.9)]):
            run(make_cfg(*SMOKE, "method=kd1", f"method.temperature={t}", f"method.alpha={a}", out=f"r{i}"))
    assert caplog.text.count("building teacher cache") == 1
    assert caplog.text.count("teacher: answering") == 1  # the transfer set is answered by the teacher once, too


def test_unlabeled_transfer_set_only_feeds_kd(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd1", "method.unlabeled_samples=32", out="u")
    run(cfg)
    res = results(cfg)
    assert res["data"]["unlabeled"] == 32 and res["data"]["student_labelled"] == 32
    assert all("loss_kd" in h for h in res["train_log"] if "loss" in h)


@pytest.mark.parametrize("override,key", [
    ("method.alpha=1.5", "method.alpha"),
    ("method.alpha=-0.1", "method.alpha"),
    ("method.temperature=0", "method.temperature"),
    ("method.top_k=0", "method.top_k"),
    ("method.divergence=klx", "method.divergence"),
    ("method.teacher_signal=psychic", "method.teacher_signal"),
])
def test_kd1_bad_values(override, key, tmp_path):
    cfg = compose_cfg(["method=kd1", override], tmp_path)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_top_k_larger_than_vocab_fails_before_training(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd1", "method.top_k=60000", out="bad")
    with pytest.raises(SystemExit, match="method.top_k=60000 exceeds"):
        run(cfg)
    assert not (Path(cfg.output_dir) / "results.json").exists()


@pytest.mark.parametrize("method", ["kd1", "kd3"])  # kd2 accepts a different tokenizer: tests/test_kd2.py
def test_vocabulary_mismatch_rejected(method, make_cfg, tmp_path):
    from kdexp.core.models import load_tokenizer

    tok = load_tokenizer(compose_cfg([], tmp_path).student)
    tok.add_tokens(["<extra_student_token>"])
    tok.save_pretrained(tmp_path / "other_tok")
    cfg = make_cfg(*SMOKE, f"method={method}", f"student.tokenizer={tmp_path / 'other_tok'}", out="mm")
    with pytest.raises(SystemExit, match=f"method={method} needs teacher and student to share a vocabulary"):
        run(cfg)
    assert not (Path(cfg.output_dir) / "results.json").exists()


def test_cached_forward_kl_fast_path_equals_dense_reconstruction():
    from kdexp.core.losses import cached_forward_kl, forward_kl
    from kdexp.core.teacher_cache import rows_from_logits, shared_tail_logit, teacher_logits_from_cache

    torch.manual_seed(0)
    vocab = 3000
    rows = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in rows_from_logits(torch.randn(6, vocab) * 3, 64).items()}
    student = torch.randn(2, 3, vocab, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]]).bool()
    for t in (1.0, 2.0, 4.0):
        fast = cached_forward_kl(student, rows["topk_logits"], rows["topk_ids"], shared_tail_logit(rows, vocab, t),
                                 temperature=t, mask=mask, vocab_size=vocab)
        dense = forward_kl(student, teacher_logits_from_cache(rows, vocab, t), temperature=t, mask=mask,
                           reduction="sum")
        (g_fast,), (g_dense,) = torch.autograd.grad(fast, student), torch.autograd.grad(dense, student)
        assert fast.item() == pytest.approx(dense.item(), rel=1e-4)  # float32 sums over the vocab
        assert torch.allclose(g_fast, g_dense, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_trainer_loss_is_the_tested_distillation_loss(alpha):
    """One loss path: DistillationTrainer's loss on a batch equals kdexp.core.losses.distillation_loss (the function
    the golden-number tests pin) with CE over gold tokens and KD over every answer slot."""
    from types import SimpleNamespace

    from kdexp.core.losses import distillation_loss, forward_kl
    from kdexp.core.models import Encoded, answer_logits, collate
    from kdexp.methods.kd1 import DistillationTrainer

    torch.manual_seed(0)
    vocab = 64
    teacher = torch.nn.Linear(1, 1)  # stands in: teacher_logits is replaced below
    batch = collate([Encoded([5, 6, 7], [8, 9], 0), Encoded([5], [8, 9, 10], 1, labelled=False)], pad_id=0)
    student_logits = torch.randn(2, batch["labels"].shape[1], vocab)
    teacher_logits = torch.randn_like(student_logits)
    trainer = DistillationTrainer.__new__(DistillationTrainer)  # the loss needs no model, optimizer or data
    trainer.alpha, trainer.temperature, trainer.divergence, trainer.teacher = alpha, 2.0, forward_kl, teacher
    trainer.vocab_size, trainer.chunk_size = vocab, None
    trainer._ce_count, trainer._kd_count = int(batch["labels"].ne(-100).sum()), int(batch["answer_mask"].sum())
    trainer.teacher_logits = lambda inputs: teacher_logits
    trainer._log_terms = lambda terms: None
    model = lambda **kw: SimpleNamespace(logits=torch.cat([student_logits, student_logits[:, -1:]], 1))  # noqa: E731
    assert torch.equal(answer_logits(model, batch)[0], student_logits)
    got = trainer.compute_loss(model, batch)
    want, _, _ = distillation_loss(student_logits, teacher_logits, batch["labels"], alpha=alpha, temperature=2.0,
                                   kd_mask=batch["answer_mask"])
    assert torch.equal(got, want)
