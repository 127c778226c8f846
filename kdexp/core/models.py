"""Tokenizers and models: hub ids, local paths and tiny models built from config all go through here.

The one forward that every method shares is :func:`answer_logits`: batches are LEFT-padded so every example's answer
sits at the end of its row, and only the last ``window + 1`` hidden states go through the LM head. With a 50k-150k
vocabulary the head dominates compute and memory, and training/KD only ever need the answer positions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from kdexp.core import features
from kdexp.core.tasks import Example

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_source(model_cfg) -> str:
    name = model_cfg.tokenizer or model_cfg.path
    if name is None:
        raise ValueError(f"{model_cfg.name}: set tokenizer (or path) in the model preset")
    if name.startswith("embedded:"):
        return str(resources.files("kdexp").joinpath("assets", name.split(":", 1)[1]))
    return name


def load_tokenizer(model_cfg):
    source = tokenizer_source(model_cfg)
    if os.path.isfile(os.path.join(source, "vocab.json")) and not os.path.isfile(
            os.path.join(source, "tokenizer_config.json")):
        # A bare GPT-2 BPE folder (vocab.json + merges.txt): AutoTokenizer cannot infer its class.
        tok = GPT2TokenizerFast.from_pretrained(source)
    else:
        tok = AutoTokenizer.from_pretrained(source, revision=model_cfg.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def same_vocabulary(tok_a, tok_b) -> bool:
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def build_model(model_cfg, vocab_size: int, seed: int, hw_cfg, for_training: bool = False):
    """Hub id / local path through AutoModelForCausalLM, or a Llama-style model from ``model_cfg.arch``.

    A model that will be trained keeps float32 master weights: Trainer's bf16 flag autocasts the compute, whereas
    bf16 weights would swallow small AdamW updates. Frozen models (teachers, eval) load in the hardware dtype.
    """
    dtype = torch.float32 if for_training else DTYPES[hw_cfg.dtype]
    if model_cfg.path is not None:
        quantized = quantization_kwargs(model_cfg, hw_cfg)  # bitsandbytes (checked at compose time, core/lora.py)
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, revision=model_cfg.revision, dtype=dtype,
                                                     **quantized)
        if quantized:
            return model  # already on hw_cfg.device; bitsandbytes models refuse .to()
    else:
        arch = model_cfg.arch
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
            intermediate_size=arch.intermediate_size, max_position_embeddings=arch.max_position_embeddings,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        # Eager attention: left padding makes fully-masked query rows, which SDPA can turn into NaN gradients.
        config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.init_seed if model_cfg.init_seed is not None else seed)
            model = LlamaForCausalLM(config).to(dtype)
    return model.to(hw_cfg.device)


def quantization_kwargs(model_cfg, hw_cfg) -> dict:
    """Extra ``from_pretrained`` kwargs for ``model_cfg.quantization`` (empty for none)."""
    mode = getattr(model_cfg, "quantization", "none")
    if mode == "none":
        return {}
    if mode == "4bit":
        compute = torch.bfloat16 if hw_cfg.dtype == "bfloat16" else torch.float16
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes places the weights itself; a later .to(device) is refused.
    return {"quantization_config": bnb, "device_map": {"": hw_cfg.device}}


def load_saved(path: str, hw_cfg):
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[hw_cfg.dtype]).to(hw_cfg.device)


# ---- encoding and batching ---------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One tokenised example: prompt ids, answer ids and where it sits in its training list."""

    prompt_ids: list[int]
    answer_ids: list[int]
    index: int  # position in the dataset it came from (teacher caches are aligned on it)
    labelled: bool = True


def encode(examples: list[Example], tokenizer, task_cfg, targets: list[str] | None = None,
           labelled: bool = True) -> list[Encoded]:
    """Tokenise prompt and answer separately (answer text starts with a space, so BPE merges do not cross).

    Prompts longer than ``max_prompt_tokens`` keep their END: for SQuAD that drops the start of the context but
    keeps the question and the "Answer:" cue the model must continue.
    """
    targets = targets if targets is not None else [ex.target for ex in examples]
    # The prompt ends right before the answer ("...Answer:"); the answer's BPE tokens must carry the separating
    # space, as generation produces them (" Denver", not "Denver").
    targets = [t if t[:1].isspace() else " " + t for t in targets]

    def tokenise() -> features.Rows:
        prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
        answers = tokenizer(targets, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if task_cfg.append_eos else []
        return [(p[-task_cfg.max_prompt_tokens:], (a + eos)[: task_cfg.max_answer_tokens])
                for p, a in zip(prompts, answers, strict=True)]

    if len(examples) < features.MIN_CACHED:
        rows = tokenise()
    else:  # content-addressed: sweep jobs and later processes reuse the ids (kdexp/core/features.py)
        key = features.features_key(tokenizer, task_cfg, [(ex.id, ex.prompt) for ex in examples], targets)
        rows = features.cached_rows(key, tokenise)
    # Fresh lists per call: callers renumber ``index`` (kd1) and must not change a shared row.
    return [Encoded(prompt_ids=list(p), answer_ids=list(a), index=i, labelled=labelled)
            for i, (p, a) in enumerate(rows)]


def collate(features: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt+answer; ``labels`` (B, window) holds answer ids right-aligned, -100 elsewhere.

    ``answer_mask`` marks every answer slot (the KD signal needs no gold label); ``labels`` is -100 for unlabelled
    transfer-set examples so that CE ignores them and Trainer's token count is the CE count.
    """
    window = max(len(f.answer_ids) for f in features)
    length = max(len(f.prompt_ids) + len(f.answer_ids) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, window), -100, dtype=torch.long)
    answer_mask = torch.zeros((batch, window), dtype=torch.bool)
    for row, f in enumerate(features):
        ids = f.prompt_ids + f.answer_ids
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention[row, length - len(ids):] = 1
        n = len(f.answer_ids)
        answer_mask[row, window - n:] = True
        if f.labelled:
            labels[row, window - n:] = torch.tensor(f.answer_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "labels": labels,
        "answer_mask": answer_mask,
        "answer_ids": torch.where(answer_mask, _right_aligned_answers(features, window), 0),
    }


def _right_aligned_answers(features: list[Encoded], window: int) -> torch.Tensor:
    out = torch.zeros((len(features), window), dtype=torch.long)
    for row, f in enumerate(features):
        out[row, window - len(f.answer_ids):] = torch.tensor(f.answer_ids)
    return out


def answer_logits(model, batch: dict[str, torch.Tensor], output_hidden_states: bool = False):
    """Logits (B, window, V) that predict the answer slots of a :func:`collate` batch.

    Position t predicts token t+1, so the last ``window + 1`` positions' logits, minus the final one, line up with
    the ``window`` answer slots. Returns the model output too (hidden states for feature KD).
    """
    window = batch["labels"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=window + 1,
                output_hidden_states=output_hidden_states, use_cache=False)
    return out.logits[:, :-1], out


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
