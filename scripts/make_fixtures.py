#!/usr/bin/env python3
"""Reference outputs of models/shakespeare-tiny from transformers' LlamaForCausalLM,
an implementation independent of kiln, for kiln's fidelity tests.

The checkpoint is loaded as stored (float16 weights) and upcast to float32; every
computation runs in float32 (on the CPU by default, so no TF32 or reduced-precision
kernel is involved).

Output: one JSON file (see models/shakespeare-tiny/README.md, "Fixtures"):
  {"model", "implementation", "dtype", "bos_id", "eos_id", "vocab_size", "n_greedy",
   "prompts": [{"text", "input_ids", "last_logits", "top20_ids",
                "greedy_ids", "greedy_text", "greedy_min_margin"}, ...]}
- input_ids: the Hugging Face tokenizer's encoding of text, which starts with
  <|begin_of_text|> (id 0), as the model was trained;
- last_logits: the float32 logits at the last input position (vocab_size values,
  each written as the shortest decimal that reads back as the same float32);
- top20_ids: the ids of the 20 largest last_logits, largest first;
- greedy_ids: n_greedy ids, each the argmax of the logits after the input and the ids
  before it (full recomputation, no cache; generation does not stop at EOS);
- greedy_min_margin: the smallest gap between the largest and second-largest logit
  over those greedy steps (a small one means another implementation may diverge
  there honestly).

Usage:
    python3 scripts/make_fixtures.py models/shakespeare-tiny models/shakespeare-tiny/fixtures.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

from fixture_checkpoints import f32_list

N_GREEDY = 64
N_TOP = 20

PROMPTS = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "HAM:\nTo be, or not to be,",
    "GLOSTER:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;",
    # Outside the corpus's alphabet: digits, non-ASCII letters and punctuation.
    "Caf\u00e9 \u2014 3.14159 \u00bfd\u00f3nde? \u201cquoted\u201d \u20ac42 \u2603",
]


@torch.no_grad()
def reference(model, tokenizer, text: str, device: str) -> dict:
    input_ids = tokenizer(text)["input_ids"]
    ids = torch.tensor([input_ids], device=device)
    last_logits = model(input_ids=ids).logits[0, -1].float().cpu()
    top = torch.topk(last_logits, N_TOP).indices.tolist()

    greedy, margins = [], []
    for _ in range(N_GREEDY):
        logits = model(input_ids=ids).logits[0, -1].float()
        best2 = torch.topk(logits, 2).values
        margins.append((best2[0] - best2[1]).item())
        next_id = int(logits.argmax())
        greedy.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return {
        "text": text,
        "input_ids": input_ids,
        "last_logits": f32_list(last_logits),
        "top20_ids": top,
        "greedy_ids": greedy,
        "greedy_text": tokenizer.decode(greedy),
        "greedy_min_margin": min(margins),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device).eval()
    if model.dtype != torch.float32:
        raise SystemExit(f"model loaded as {model.dtype}, expected float32")
    fixtures = {
        "model": "models/shakespeare-tiny",
        "implementation": f"transformers {transformers.__version__} LlamaForCausalLM, "
        f"torch {torch.__version__}, device {args.device}",
        "dtype": "float32",
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "vocab_size": model.config.vocab_size,
        "n_greedy": N_GREEDY,
        "prompts": [reference(model, tokenizer, text, args.device) for text in PROMPTS],
    }
    for p in fixtures["prompts"]:
        if p["input_ids"][0] != fixtures["bos_id"]:
            raise SystemExit(f"tokenizer did not prepend BOS to {p['text']!r}: {p['input_ids'][:4]}")
        print(f"{p['text']!r} -> {len(p['input_ids'])} ids, margin {p['greedy_min_margin']:.3f}:"
              f" {p['greedy_text']!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(fixtures, f, separators=(",", ":"))
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
