#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of models/shakespeare-tiny.

GPT-2's scheme, trained with the `tokenizers` library on the training split that
scripts/prepare_shakespeare.py writes: a ByteLevel pre-tokenizer (GPT-2's split regex,
no prefix space), BPE over the 256 byte symbols, a ByteLevel decoder, and a
post-processor that puts <|begin_of_text|> before every encoded text.

Vocabulary: VOCAB_SIZE ids; id 0 is <|begin_of_text|> (BOS), id 1 is <|end_of_text|>
(EOS, also written between works in training), then the 256 byte symbols, then merges.

Writes OUT_DIR/tokenizer.json and OUT_DIR/tokenizer_config.json.

Usage:
    python3 scripts/train_tokenizer.py .data/shakespeare models/shakespeare-tiny
"""

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


def train(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="folder with train.jsonl")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()

    with open(args.data_dir / "train.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = train(texts)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    assert (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)) == (0, 1)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
    }
    with open(args.out_dir / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    n_tokens = sum(len(tokenizer.encode(t).ids) for t in texts)
    n_chars = sum(len(t) for t in texts)
    print(f"vocab {VOCAB_SIZE}: {n_tokens} training tokens, {n_chars / n_tokens:.2f} chars/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
