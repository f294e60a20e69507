"""What the fixture scripts share: tiny transformers checkpoints saved as kiln's
converter reads them, with a byte-level tokenizer, and their reference outputs written
as fixtures.json (make_fixtures.py, make_moe_fixtures.py, make_qwen3next_fixtures.py,
make_qwen35_fixtures.py import it; it is not run on its own).
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_json() -> dict:
    """A byte-level BPE tokenizer.json of the 256 byte tokens and no merges (kiln's
    converter needs one; the tests feed token ids)."""
    return {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False,
                  "vocab": {c: i for i, c in enumerate(byte_chars())}, "merges": []},
    }


def f32_list(values: torch.Tensor) -> list[float]:
    """Each float32 as the shortest decimal that reads back as the same float32."""
    return [float(np.format_float_positional(v, unique=True, trim="-")) for v in values.numpy()]


class RouterMargins:
    """Records the smallest gap between the k-th and (k+1)-th router logit."""

    def __init__(self, model: torch.nn.Module, k: int):
        self.k, self.min = k, math.inf
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = torch.nn.functional.linear(x, module.weight)
        top = torch.topk(logits, self.k + 1, dim=-1).values
        self.min = min(self.min, (top[:, self.k - 1] - top[:, self.k]).min().item())


def save_checkpoint(model: torch.nn.Module, target: Path) -> None:
    """The float32 checkpoint in `target` (made if missing) as save_pretrained writes
    it, without generation_config.json."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    (target / "generation_config.json").unlink(missing_ok=True)


def write_fixtures(target: Path, name: str, cls: type, seed: int, vocab_size: int,
                   extra: dict) -> None:
    """tokenizer.json (tokenizer_json) and fixtures.json in `target`: the model's name,
    the implementation that computed the outputs (transformers' class `cls`, versions,
    seed), float32, the vocabulary size, then `extra` (the counts and the prompts)."""
    with open(target / "tokenizer.json", "w") as f:
        json.dump(tokenizer_json(), f, ensure_ascii=False)
    fixtures = {
        "model": name,
        "implementation": f"transformers {transformers.__version__} {cls.__name__}, "
        f"torch {torch.__version__}, cpu, seed {seed}",
        "dtype": "float32",
        "vocab_size": vocab_size,
        **extra,
    }
    with open(target / "fixtures.json", "w") as f:
        json.dump(fixtures, f, separators=(",", ":"))
        f.write("\n")
