"""The bench package: its CLI, its override helpers, and the kd1 bench's JSON keys on the smoke config."""

import os
import subprocess
import sys

import pytest

from kdexp.bench.common import merged, with_method
from kdexp.bench.kd1 import bench_kd1
from kdexp.bench.overhead import fixed_overhead
from kdexp.bench.sweep import summed_timings

KD1_KEYS = {
    "vocab_size", "torch_threads", "teacher", "train_examples",
    "cache_bytes_per_token", "cache_tokens", "cache_build_tokens_per_s", "cache_read_tokens_per_s", "cache_top_k",
    "cache_compression", "kd_loss_abs_error", "kd_loss_abs_error_imitating_student", "teacher_top_k_mass",
    "loss_error_tokens", "step_s", "kd1_cached_over_b0_step", "kd1_online_over_b0_step", "peak_rss_mb",
    "peak_rss_kd1_over_b0", "peak_rss_kd1_online_over_b0", "load_average_1m", "self_cpu_s",
    "peak_rss_kd1_run_over_b0_run", "peak_rss_run_mb", "peak_rss_run_params", "peak_rss_run_teacher_loaded",
    "peak_rss_run_kind", "peak_rss_run_overrides",
    "kd_loss_abs_error_by_mode", "kd_loss_mean_error_by_mode", "kd_grad_cosine_by_mode", "cache_mode_layouts",
    "cache_bytes_per_token_by_mode",
    "b0_fixed_overhead_frac", "b0_fixed_overhead_incl_eval_frac", "b0_overhead_wall_s", "b0_overhead_cpu_s",
    "b0_overhead_timings_s",
    "b0_overhead_first_round", "b0_overhead_overrides", "load_average_1m_by_part",
    "sweep_cached_s", "sweep_online_s", "sweep_online_over_cached", "sweep_cached_cpu_s", "sweep_online_cpu_s",
    "sweep_online_over_cached_cpu", "sweep_jobs", "sweep_phase_s", "sweep_params",
    "sweep_overrides",
}
VARIANTS = {"b0", "kd1_cached", "kd1_online"}


def test_cli_help_explains_every_option():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdexp.bench", "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for option in ("--steps", "--warmup", "--rounds", "--rss-steps", "--sweep", "--no-sweep", "--sweep-overrides",
                   "--prompts",
                   "--strategies", "kd1", "kd2", "kd3", "OVERRIDES"):
        assert option in proc.stdout
    assert "``" not in proc.stdout


def test_override_helpers():
    assert merged(["method=kd1", "task=squad"], ["task=sst2", "seed=1"]) == ["method=kd1", "task=sst2", "seed=1"]
    base = ["method=kd1", "method.alpha=0.3", "experiment=smoke", "+method.top_k=8"]
    assert with_method(base, "b0") == ["experiment=smoke", "method=b0"]  # B0 has no alpha: its schema rejects it
    assert with_method(base, "kd1", "method.teacher_signal=online") == [
        "method.alpha=0.3", "experiment=smoke", "+method.top_k=8", "method=kd1", "method.teacher_signal=online"]


@pytest.mark.slow
def test_bench_kd1_returns_documented_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("KDEXP_CACHE_DIR", str(tmp_path / "cache"))  # the smoke teacher is prepared here, not in ./
    out = bench_kd1(["experiment=smoke", "hardware.torch_threads=1"], steps=1, warmup=1, rounds=1, rss_steps=1,
                    sweep_grid=["method.temperature=1", "method.alpha=0.5", "seed=1"], overhead_rounds=1)
    assert set(out) == KD1_KEYS
    assert out["torch_threads"] == 1 and out["train_examples"] == 64 and out["cache_top_k"] == 64
    assert set(out["step_s"]) == VARIANTS and all(v > 0 for v in out["step_s"].values())
    for figures in out["peak_rss_mb"].values():
        assert {"train_peak_mb", "before_train_mb", "process_peak_mb"} <= set(figures)
        assert figures["train_peak_mb"] >= figures["before_train_mb"] > 0
    assert set(out["peak_rss_mb"]) == VARIANTS and out["peak_rss_kd1_over_b0"] > 0
    modes = {"head_uniform", "head_sampled", "sampled"}
    for key in ("kd_loss_abs_error_by_mode", "kd_grad_cosine_by_mode"):
        assert set(out[key]) == modes and all(set(out[key][m]) == {"untrained", "imitating"} for m in modes)
        assert all(set(by_t) == {"1", "2", "4"} for m in modes for by_t in out[key][m].values())
    assert all(set(out["cache_bytes_per_token_by_mode"][m]) == {"64", "128"} for m in modes)
    assert out["peak_rss_run_teacher_loaded"] == {"kd1_cold": True, "b0": False, "kd1_warm": False}
    assert out["peak_rss_run_params"]["teacher_over_student"] >= 4 and out["peak_rss_kd1_run_over_b0_run"] > 0
    assert out["sweep_jobs"] == {"cached": 1, "online": 1} and out["sweep_params"]["teacher_over_student"] >= 4
    assert 0 < out["b0_fixed_overhead_frac"] < out["b0_fixed_overhead_incl_eval_frac"] < 1


def test_fixed_overhead_fractions():
    timings = {"train_s": 10.0, "evaluate_student_s": 2.0, "validation_s": 1.5, "diagnostics_s": 0.5,
               "evaluate_s": 5.0, "startup_s": 6.0}
    out = fixed_overhead(timings, 20.0)
    assert out["student_eval_s"] == 4.0
    assert out["b0_fixed_overhead_frac"] == pytest.approx(6.0 / 20.0)
    assert out["b0_fixed_overhead_incl_eval_frac"] == pytest.approx(10.0 / 20.0)
    assert fixed_overhead({}, 4.0)["b0_fixed_overhead_frac"] == 1.0  # nothing trained or evaluated: all overhead
    with pytest.raises(ValueError):
        fixed_overhead(timings, 0.0)


def test_summed_timings():
    jobs = [{"timings_s": {"train_s": 1.0, "setup_s": 0.5}}, {"timings_s": {"train_s": 2.0}}, {}]
    assert summed_timings(jobs) == {"train_s": 3.0, "setup_s": 0.5}
