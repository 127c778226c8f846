"""LoRA students (peft): merged == adapter outputs, a standalone merged student on disk, KD3 projections outside the
adapter, and one-line errors for bad adapters and for quantization this platform cannot load."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdexp.core.lora import merged_student, wrap_student
from kdexp.core.models import build_model, collate, encode, load_tokenizer
from kdexp.core.tasks import load_task
from kdexp.main import run
from kdexp.methods import validate
from tests.conftest import SMOKE, compose_cfg, results

LORA = ["student.lora.enabled=true", "student.lora.r=4", "student.lora.alpha=8"]



def _batch(cfg, n=8):
    tok = load_tokenizer(cfg.student)
    data = load_task(cfg.task)
    return tok, collate(encode(data.eval[:n], tok, cfg.task), tok.pad_token_id)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits


def test_merged_student_matches_adapter_outputs(make_cfg, tmp_path):
    cfg = make_cfg(*SMOKE, *LORA, "student.lora.target_modules=[q_proj,v_proj,down_proj]")
    tok, batch = _batch(cfg)
    student = wrap_student(build_model(cfg.student, len(tok), seed=0, hw_cfg=cfg.hardware, for_training=True), cfg)
    with torch.no_grad():  # a trained adapter: lora_B starts at zero, which would make the test vacuous
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    adapter_out = _logits(student.eval(), batch)
    n_adapter = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    ctx = SimpleNamespace(cfg=cfg, out_dir=tmp_path, extra={})
    merged = merged_student(ctx, student)
    merged_out = _logits(merged, batch)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diff = (adapter_out - merged_out).abs().max().item()
    print(f"merged vs adapter max |diff| = {diff:.2e}")
    base_out = _logits(build_model(cfg.student, len(tok), seed=0, hw_cfg=cfg.hardware), batch)
    assert diff <= 1e-5 and (adapter_out - base_out).abs().max() > 1e-2  # the adapter does change the outputs
    assert ctx.extra["lora"]["adapter_params"] == n_adapter > 0
    assert (tmp_path / "lora_adapter" / "adapter_model.safetensors").exists()


def test_lora_kd1_run_saves_a_standalone_merged_student(make_cfg):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(*SMOKE, "method=kd1", *LORA, "train.lr=1e-2")
    run(cfg)
    res, out = results(cfg), Path(cfg.output_dir)
    assert res["lora"]["merged"] and res["lora"]["adapter_params"] > 0
    # Only the adapter trained: the param-group table counts exactly its parameters.
    assert sum(r["params"] for r in res["param_groups"]) == res["lora"]["adapter_params"]
    # No peft needed to load it. Eager attention like the built model: pad rows (fully masked) differ under SDPA.
    saved = AutoModelForCausalLM.from_pretrained(out / "student", attn_implementation="eager")
    assert not any("lora" in n for n, _ in saved.named_parameters())
    assert res["efficiency"]["student"]["total_params"] == sum(p.numel() for p in saved.parameters())
    _, batch = _batch(cfg)
    from peft import PeftModel

    base = build_model(cfg.student, saved.config.vocab_size, seed=cfg.seed, hw_cfg=cfg.hardware, for_training=True)
    adapter = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    assert (_logits(adapter, batch) - _logits(saved, batch)).abs().max() <= 1e-5


def test_lora_kd3_projections_train_outside_the_adapter(make_cfg):
    cfg = make_cfg(*SMOKE, "method=kd3", *LORA, "teacher.arch.hidden_size=64", "teacher.arch.num_heads=2")
    run(cfg)
    res = results(cfg)
    assert res["kd3"]["projection_params"] > 0
    trained = sum(r["params"] for r in res["param_groups"])
    assert trained == res["lora"]["adapter_params"] + res["kd3"]["projection_params"]


@pytest.mark.parametrize("overrides,message", [
    (["student.lora.target_modules=[q_proj,qkv_fused]"],
     "student.lora.target_modules: 'qkv_fused' matches no module of student=tiny"),
    (["student.lora.r=0"], "student.lora.r=0 must be > 0"),
    (["student.lora.r=-4"], "student.lora.r=-4 must be > 0"),
    (["method=eval"], "student.lora.enabled=true needs a method that trains the student"),
])
def test_bad_lora_settings_are_one_line_errors(overrides, message, tmp_path):
    cfg = compose_cfg(["student.lora.enabled=true", *overrides], tmp_path)
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_without_cuda_fails_before_loading(role, mode, make_cfg):
    cfg = make_cfg(*SMOKE, f"{role}.quantization={mode}", "student.lora.enabled=true")
    with pytest.raises(SystemExit) as err:
        run(cfg)
    message = str(err.value.code)
    assert message.startswith(f"kdexp: config error: {role}.quantization={mode} needs a CUDA GPU (bitsandbytes)")
    assert "\n" not in message and not Path(cfg.output_dir, "results.json").exists()
    assert not (Path(cfg.cache_dir) / "teachers").exists()  # nothing was prepared or loaded


def test_unknown_quantization_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"^student.quantization='3bit' must be one of none, 4bit, 8bit$"):
        validate(compose_cfg(["student.quantization=3bit"], tmp_path))
