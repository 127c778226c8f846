"""The embedded 8k byte-level BPE (``tokenizer: embedded:bpe8k``): a real tokenizer that is NOT GPT-2's.

It exists so that cross-tokenizer distillation (docs/cross_tokenizer.md) can be tested and demonstrated offline: the
tiny teacher speaks GPT-2 BPE (50,257 tokens), ``student=tiny_bpe8k`` speaks this one (8,192). It is trained with
the ``tokenizers`` library on embedded training text only, and the training is deterministic (same input order, one
fixed trainer config): ``python -m kdexp.core.bpe8k [out_dir]`` rebuilds ``kdexp/assets/bpe8k`` byte for byte
(checked by tests/test_cross_tokenizer.py against the shipped ``tokenizer.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kdexp.core.tasks import load_squad, load_sst2

VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "bpe8k"


def training_text() -> list[str]:
    """SST-2 train sentences, then the SQuAD train-article contexts (deduplicated, file order) and questions.

    Only the train pools: the eval splits (GLUE dev, the last 10 SQuAD articles) never shape the vocabulary.
    """
    sst2_train, _ = load_sst2()
    squad_train, _ = load_squad()
    contexts = list(dict.fromkeys(r["context"] for r in squad_train))
    return [r["sentence"] for r in sst2_train] + contexts + [r["question"] for r in squad_train]


def train_bpe8k(texts: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE like GPT-2's (same pre-tokenizer regex, no prefix space), ``VOCAB_SIZE`` tokens, EOS last."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's character span keeps its leading space, so spans of two tokenizations compare.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOS])
    tok.train_from_iterator(texts if texts is not None else training_text(), trainer=trainer)
    return tok


def write_asset(out_dir: Path = ASSET) -> Path:
    """tokenizer.json + the tokenizer_config.json that lets ``AutoTokenizer.from_pretrained(out_dir)`` load it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_bpe8k().save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None, "unk_token": None,
              "pad_token": None, "model_max_length": 1024, "add_prefix_space": False, "clean_up_tokenization_spaces":
              False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


if __name__ == "__main__":
    print(write_asset(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSET))
