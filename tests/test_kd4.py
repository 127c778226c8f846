"""KD4 on-policy distillation: bad input, the λ=0 ≡ KD1-online identity, seeded samples, exact resume, sampled RKL."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdexp.core.losses import reverse_kl
from kdexp.core.models import build_model, load_tokenizer
from kdexp.main import run
from kdexp.methods import kd4, validate
from tests.conftest import SMOKE, assert_same_student, compose_cfg, results

HW = OmegaConf.create({"device": "cpu", "dtype": "float32"})


@pytest.mark.parametrize("override,message", [
    ("method.lmbda=1.5", "method.lmbda=1.5 must be in [0, 1]"),
    ("method.lmbda=-0.1", "method.lmbda=-0.1 must be in [0, 1]"),
    ("method.beta=1.01", "method.beta=1.01 must be in [0, 1]"),
    ("method.skew_alpha=0", "method.skew_alpha=0.0 must be in (0, 1]"),
    ("method.skew_alpha=1.2", "method.skew_alpha=1.2 must be in (0, 1]"),
    ("method.generation.max_new_tokens=0", "method.generation.max_new_tokens=0 must be > 0"),
    ("method.generation.top_p=0", "method.generation.top_p=0.0 must be > 0"),
    ("method.loss=forward", "method.loss='forward' must be one of jsd, sampled_rkl"),
    ("method.teacher_signal=cached", "method.teacher_signal='cached' must be online"),
    ("method.lmbda=nan", "method.lmbda=nan must be a finite number"),
])
def test_bad_values_are_one_line(override, message, tmp_path):
    with pytest.raises(ValueError) as info:
        validate(compose_cfg(["method=kd4", override], tmp_path))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_sampled_rkl_with_a_cached_teacher_stops_before_any_model(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, "method=kd4", "method.loss=sampled_rkl", "method.teacher_signal=cached")
    with pytest.raises(SystemExit, match=r"^kdexp: config error: method.teacher_signal='cached' must be online"):
        run(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


def test_vocabulary_mismatch_rejected_before_the_teacher_loads(make_cfg, tmp_path):
    tok = load_tokenizer(compose_cfg([], tmp_path).student)
    tok.add_tokens(["<extra_student_token>"])
    tok.save_pretrained(tmp_path / "other_tok")
    cfg = make_cfg(*SMOKE, "method=kd4", f"student.tokenizer={tmp_path / 'other_tok'}", out="mm")
    with pytest.raises(SystemExit, match="method=kd4 needs teacher and student to share a vocabulary"):
        run(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
def test_lambda_zero_forward_kl_trains_bitwise_like_kd1_online(make_cfg, one_torch_thread):
    common = [*SMOKE, "seed=5", "method.alpha=0.5", "method.temperature=2"]
    kd1 = make_cfg(*common, "method=kd1", "method.teacher_signal=online", out="kd1")
    kd4_ = make_cfg(*common, "method=kd4", "method.lmbda=0", "method.loss=jsd", "method.beta=0", out="kd4")
    run(kd1)
    run(kd4_)
    assert_same_student(kd1, kd4_)
    losses = [[(h["loss"], h["loss_ce"], h["loss_kd"]) for h in results(c)["train_log"] if "loss" in h]
              for c in (kd1, kd4_)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert results(kd4_)["kd4"]["on_policy_steps"] == 0


def _tiny_student(seed=0):
    cfg = compose_cfg(SMOKE)
    tok = load_tokenizer(cfg.student)
    return build_model(cfg.student, len(tok), seed=seed, hw_cfg=HW), tok


def test_samples_depend_on_the_seed_only_and_leave_the_global_rng_alone():
    model, tok = _tiny_student()
    prompts = [tok("Review: a fine film\nSentiment:")["input_ids"], tok("Review: dull\nSentiment:")["input_ids"]]
    gen = OmegaConf.create({"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6})
    stop = [tok.eos_token_id, tok("\n")["input_ids"][0]]
    before = torch.get_rng_state()
    draw = [kd4.sample_answers(model, prompts, pad_id=tok.pad_token_id, stop_ids=stop, generation=gen, seed=s)
            for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), before)
    assert draw[0] == draw[1] and draw[0] != draw[2]
    for answers in draw:
        for a in answers:  # cut right after the first stop token, or at the budget
            assert 1 <= len(a) <= 6 and not any(t in stop for t in a[:-1])
    assert model.training  # generation ran in eval mode and restored the mode


def test_sampled_rkl_value_and_gradient_match_the_exact_reverse_kl():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    teacher = torch.randn(6, generator=gen)
    n = 40000
    samples = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True, generator=gen)
    est = kd4.sampled_reverse_kl(theta.expand(1, n, 6), teacher.expand(1, n, 6), samples[None],
                                 torch.ones(1, n, dtype=torch.bool)) / n
    (grad,) = torch.autograd.grad(est, theta)
    exact = reverse_kl(theta[None], teacher[None])
    (exact_grad,) = torch.autograd.grad(exact, theta)
    assert torch.isfinite(grad).all()
    assert est.item() == pytest.approx(exact.item(), abs=0.05)
    cosine = torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0).item()
    assert cosine > 0.95  # the score-function estimate points where the exact gradient does
    # A descent step along the estimate lowers the true reverse KL.
    assert reverse_kl((theta - 0.1 * grad)[None], teacher[None]).item() < exact.item()


def test_divergence_choice():
    m = OmegaConf.create({"loss": "jsd", "beta": 0.0, "skew_alpha": 0.1})
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    from kdexp.core.losses import forward_kl, skew_reverse_kl

    assert torch.equal(kd4.divergence(m)(s, t), forward_kl(s, t))
    m.loss = "skew_reverse_kl"
    assert torch.equal(kd4.divergence(m)(s, t), skew_reverse_kl(s, t, skew_alpha=0.1))
    m.loss = "sampled_rkl"
    assert kd4.divergence(m) is reverse_kl  # off-policy steps of sampled_rkl: the exact quantity it estimates


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_mid_run_reproduces_the_remaining_samples_and_losses(tmp_path, monkeypatch, one_torch_thread):
    args = [*SMOKE, "method=kd4", "method.lmbda=0.5", "method.loss=sampled_rkl", "method.alpha=0.7",
            "method.generation.max_new_tokens=3", "train.epochs=2", "train.save_steps=2", "num_samples=0"]

    def cfg(name):
        made = compose_cfg(args, tmp_path / name)  # own cache_dir: own checkpoints and registry
        made.output_dir = str(tmp_path / name / "out")
        return made

    reference, interrupted = cfg("reference"), cfg("interrupted")
    run(reference)
    original = kd4.OnPolicyTrainer.get_batch_samples

    def killed_at_step_5(self, *a, **kw):
        if self.state.global_step == 4:
            raise _Killed
        return original(self, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(kd4.OnPolicyTrainer, "get_batch_samples", killed_at_step_5)
        with pytest.raises(_Killed):
            run(interrupted)
    run(interrupted)
    got, want = results(interrupted), results(reference)
    assert got["stages"][0]["resumed_from"].endswith("checkpoint-4")
    assert 0 < want["kd4"]["on_policy_steps"] < want["kd4"]["steps"] == 8  # both kinds of step happened
    assert got["kd4"]["sample_hashes"] == want["kd4"]["sample_hashes"]
    assert got["kd4"]["on_policy_steps"] == want["kd4"]["on_policy_steps"]
    keys = ("loss", "loss_ce", "loss_kd", "kd4_on_policy_frac", "kd4_sampled_len")
    log = [[tuple(h.get(k) for k in keys) for h in r["train_log"] if "loss" in h] for r in (got, want)]
    assert log[0] == log[1]
    assert_same_student(interrupted, reference)
    ckpt = next(Path(interrupted.cache_dir, "checkpoints").glob("*/stage0"), None)
    assert ckpt is None or not list(ckpt.glob("checkpoint-*"))  # cleared after results.json


@pytest.mark.slow
def test_bench_kd4_prints_one_json_object(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDEXP_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kdexp.bench", "kd4", "--steps", "1", "--warmup", "1", "--rounds",
                           "1", "experiment=smoke", "task=sst2"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"task", "batch_size", "steps_timed", "max_new_tokens", "step_time_s", "step_time_ratio",
                        "generate_tokens_per_s", "generate_share", "mean_sampled_len"}
    assert out["task"] == "sst2" and out["max_new_tokens"] == 16  # the bench's own task.max_new_tokens
    assert set(out["step_time_s"]) == {"kd1_online", "kd4"}
    assert 0 < out["generate_share"] < 1 and out["generate_tokens_per_s"] > 0 and 1 <= out["mean_sampled_len"] <= 16
