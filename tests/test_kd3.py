"""KD3 feature KD: layer maps, hidden-state capture, feature loss, projections, w_feat=0 ≡ KD1, bad input."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdexp.core.models import collate
from kdexp.main import run
from kdexp.methods import kd3, validate
from tests.conftest import SMOKE, assert_same_student, compose_cfg, results, student_weights


def _tiny_lm(layers: int, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_auto_layer_map():
    assert kd3.auto_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert kd3.auto_layer_map(4, 12, include_embeddings=True)[0] == (0, 0)
    assert kd3.auto_layer_map(2, 3) == [(1, 2), (2, 3)]  # 1.5 rounds half up
    assert kd3.auto_layer_map(3, 1) == [(1, 1), (2, 1), (3, 1)]  # never the embeddings unless asked
    assert kd3.resolve_layer_map("auto", 2, 6, False) == [(1, 3), (2, 6)]
    assert kd3.resolve_layer_map([[0, 0], [2, 5]], 2, 6, False) == [(0, 0), (2, 5)]
    assert kd3.resolve_layer_map("auto", None, 6, False) is None  # a hub model's depth is read later


@pytest.mark.parametrize("value,match", [
    ([[3, 1]], "uses student layer 3 but the student has 2 layers"),
    ([[1, 7]], "uses teacher layer 7 but the teacher has 6 layers"),
    ([], "is empty"),
    ([[1]], "pairs"),
    ([[1, -1]], "pairs"),
    ([[1, True]], "pairs"),
    ("every", "pairs"),
    ([[1, 2], [1, 2]], "twice"),
])
def test_explicit_layer_map_errors(value, match):
    with pytest.raises(ValueError, match=match) as err:
        kd3.resolve_layer_map(value, 2, 6, False)
    assert str(err.value).startswith("method.layer_map=") and "\n" not in str(err.value)


def test_capture_keeps_only_the_mapped_layers_and_matches_hf():
    model = _tiny_lm(layers=3)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
        hooks = [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in model.model.layers]
        with kd3.capture_hidden_states(model, [0, 2]) as captured:
            model(input_ids=ids)
    assert set(captured) == {0, 2}
    assert torch.equal(captured[0], reference[0]) and torch.equal(captured[2], reference[2])
    with kd3.capture_hidden_states(model, [3]) as last:
        model(input_ids=ids)
    # Index 3 is the last layer's raw output; HF's hidden_states[-1] has the final norm applied.
    assert torch.allclose(model.model.norm(last[3]), reference[3], atol=1e-6)
    assert hooks == [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in model.model.layers]


def test_feature_distance():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:] = True
    mask[1, 4] = True
    expected = ((s - t) ** 2).mean(-1)[mask].sum()
    assert torch.allclose(kd3.feature_distance(s, t, mask, reduction="sum"), expected)
    assert torch.allclose(kd3.feature_distance(s, t, mask), expected / 5)
    assert kd3.feature_distance(s, s, kind="cosine") == pytest.approx(0.0, abs=1e-6)
    assert kd3.feature_distance(s, -s, kind="cosine") == pytest.approx(2.0, abs=1e-6)
    # layernorm: standardised per token, so a per-token affine change of the student does not matter.
    ln = kd3.feature_distance(s, t, norm="layernorm")
    assert torch.allclose(kd3.feature_distance(3 * s + 1, t, norm="layernorm"), ln, atol=1e-4)
    assert not torch.allclose(kd3.feature_distance(3 * s + 1, t), kd3.feature_distance(s, t))
    empty = torch.zeros(2, 5, dtype=torch.bool)
    assert kd3.feature_distance(s.requires_grad_(), t, empty, reduction="sum").item() == 0.0


def test_feature_token_mask_answer_positions_predict_the_answer():
    from kdexp.core.models import Encoded

    batch = collate([Encoded([5, 6, 7], [8, 9], 0), Encoded([5], [8, 9, 10], 1)], pad_id=0)
    # Row 0 is 5 6 7 8 9: positions 2 (7 → 8) and 3 (8 → 9) predict answer tokens; row 1 is pad 5 8 9 10.
    answer = kd3.feature_token_mask(batch, "answer")
    assert answer[0].nonzero().flatten().tolist() == [2, 3] and answer[1].nonzero().flatten().tolist() == [1, 2, 3]
    assert torch.equal(kd3.feature_token_mask(batch, "all"), batch["attention_mask"].bool())
    logits = torch.randn(2, 5, 11)
    # Those positions' logits are exactly the answer_logits slots that CE and KL train.
    assert torch.equal(logits[answer], logits[:, -4:-1][batch["answer_mask"]])


@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_kd3_end_to_end(task, make_cfg):
    cfg = make_cfg(*SMOKE, f"task={task}", "method=kd3", "method.feature_norm=layernorm")
    run(cfg)
    res = results(cfg)
    assert res["status"] == "complete" and res["method"] == "kd3"
    assert res["kd3"]["layer_map"] == [[1, 1]] and res["kd3"]["projections"] is None  # smoke: same widths
    steps = [h for h in res["train_log"] if "loss" in h]
    assert steps and all({"loss_ce", "loss_kd", "loss_feat"} <= h.keys() for h in steps)
    for h in steps:  # logged terms recompose the loss with the configured weights and T^2
        assert h["loss"] == pytest.approx(0.5 * h["loss_ce"] + 0.5 * 4 * h["loss_kd"] + h["loss_feat"], rel=1e-4)
    assert not (Path(cfg.output_dir) / "projections.safetensors").exists()


def test_w_feat_zero_trains_exactly_like_kd1(make_cfg):
    # Different widths, so KD3 carries (unused) projections: the student must still train bit for bit like KD1.
    common = [*SMOKE, "student.arch.hidden_size=16", "seed=5", "method.temperature=3"]
    kd1 = make_cfg(*common, "method=kd1", "method.alpha=0.25", "method.teacher_signal=online", out="kd1")
    feat = make_cfg(*common, "method=kd3", "method.w_ce=0.75", "method.w_kl=0.25", "method.w_feat=0", out="kd3")
    run(kd1)
    run(feat)
    assert_same_student(kd1, feat)
    assert all("loss_feat" not in h for h in results(feat)["train_log"])


def test_projections_trained_saved_and_kept_out_of_the_student(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd3", "student.arch.hidden_size=16", "method.layer_map=[[0,0],[1,1]]",
                   "method.feature_tokens=answer", "method.feature_loss=cosine", out="proj")
    run(cfg)
    info = results(cfg)["kd3"]
    assert info["layer_map"] == [[0, 0], [1, 1]] and (info["student_hidden"], info["teacher_hidden"]) == (16, 32)
    saved = load_file(info["projections"])
    assert set(saved) == {"s0_t0.weight", "s0_t0.bias", "s1_t1.weight", "s1_t1.bias"}
    assert saved["s1_t1.weight"].shape == (32, 16) and info["projection_params"] == 2 * (16 * 32 + 32)
    init = kd3.build_projections([(0, 0), (1, 1)], 16, 32, seed=cfg.seed)
    assert not torch.equal(init["s1_t1"].weight.detach(), saved["s1_t1.weight"])  # trained with the student
    from kdexp.core.models import build_model

    student = student_weights(cfg)
    plain = build_model(cfg.student, student["model.embed_tokens.weight"].shape[0], cfg.seed, cfg.hardware)
    assert set(student) <= set(plain.state_dict()) and not any("kd3" in k for k in student)
    assert sum(v.numel() for v in student.values()) == results(cfg)["efficiency"]["student"]["total_params"]


def test_model_depth_reads_a_local_models_config(tmp_path):
    _tiny_lm(layers=3).save_pretrained(tmp_path / "m")
    cfg = compose_cfg([f"student.path={tmp_path / 'm'}"], tmp_path)
    assert kd3.model_depth(cfg.student) == 3 and kd3.model_depth(cfg.teacher) == cfg.teacher.arch.num_layers


@pytest.mark.parametrize("override,key", [
    ("method.layer_map=[[2,1]]", "method.layer_map"),  # the default tiny student has 1 layer
    ("method.layer_map=[[1,4]]", "method.layer_map"),  # the default tiny teacher has 3
    ("method.layer_map=[]", "method.layer_map"),
    ("method.w_ce=-0.5", "method.w_ce"),
    ("method.w_kl=-1", "method.w_kl"),
    ("method.w_feat=-1", "method.w_feat"),
    ("method.feature_loss=l1", "method.feature_loss"),
    ("method.feature_tokens=prompt", "method.feature_tokens"),
    ("method.feature_norm=batchnorm", "method.feature_norm"),
    ("method.include_embeddings=true method.layer_map=[[1,1]]", "method.include_embeddings"),
])
def test_kd3_bad_values(override, key, tmp_path):
    cfg = compose_cfg(["method=kd3", *override.split()], tmp_path)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


def test_all_zero_weights_rejected(tmp_path):
    cfg = compose_cfg(["method=kd3", "method.w_ce=0", "method.w_kl=0", "method.w_feat=0"], tmp_path)
    with pytest.raises(ValueError, match=r"^method\.w_feat=0\.0 and method\.w_ce, method\.w_kl are all 0"):
        validate(cfg)


def test_layer_beyond_depth_stops_the_run_before_anything_is_recorded(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd3", "method.layer_map=[[1,2]]", out="bad")
    with pytest.raises(SystemExit, match=r"config error: method\.layer_map=\[\[1, 2\]\] uses teacher layer 2"):
        run(cfg)
    assert not (Path(cfg.output_dir) / "results.json").exists() and not (Path(cfg.cache_dir) / "runs").exists()


@pytest.mark.slow
def test_cli_bad_layer_map_and_decoding_exit_nonzero_with_one_line(tmp_path):
    from tests.conftest import run_cli

    deep = run_cli("experiment=smoke", "method=kd3", "method.layer_map=[[1,5]]", cwd=tmp_path)
    assert deep.returncode != 0
    assert deep.stderr.strip().splitlines()[-1].startswith("kdexp: config error: method.layer_map=[[1, 5]] uses")
    beams = run_cli("experiment=smoke", "method=kd2", "task=squad", "method.decoding.num_beams=0", cwd=tmp_path)
    assert beams.returncode != 0
    assert beams.stderr.strip().splitlines()[-1] == "kdexp: config error: method.decoding.num_beams=0 must be > 0"
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.slow
def test_bench_kd3_measures_every_method():
    from kdexp.bench.kd3 import METHODS, bench_kd3

    out = bench_kd3(steps=2, warmup=1, rounds=1, overrides=("task.max_train_samples=48",))
    assert set(out["step_time_s"]) == set(METHODS) and all(v > 0 for v in out["step_time_s"].values())
    assert set(out["peak_rss_mb"]) == {"setup", *METHODS} and all(v > 0 for v in out["peak_rss_mb"].values())
    assert out["peak_rss_ratio"]["kd3/kd1"] > 0 and out["student"] == "1x64" and out["teacher"] == "3x128"
    assert set(out["setup_rss_mb"]) == set(out["train_rss_increment_mb"]) == set(METHODS)


def test_kd3_has_no_teacher_signal_knob(tmp_path):
    """KD3's teacher always runs online (its hidden states are needed), so its schema has no teacher_signal."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="teacher_signal"):
        compose_cfg(["method=kd3", "method.teacher_signal=cached"], tmp_path)
