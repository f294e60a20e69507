#!/usr/bin/env python3
"""Tiny random-weight Qwen3-MoE and Qwen2-MoE checkpoints and their reference outputs
from transformers (an implementation independent of kiln), for kiln's
mixture-of-experts fidelity tests (crates/kiln-models/tests/moe_fixtures.rs).

Each model is built from a fixed seed with transformers' Qwen3MoeForCausalLM or
Qwen2MoeForCausalLM (hidden 64, 4 layers, 8 experts of which 2 per token, expert width
16; Qwen2-MoE with a shared expert of width 32), its weights drawn so that activations
and routing are decisive: every matrix N(0, 1/fan_in), norms 1 + N(0, 0.1^2), the
embedding N(0, 1), the routers N(0, 4/fan_in). It is saved in float32 with
save_pretrained, with a byte-level BPE tokenizer.json of the 256 byte tokens and no
merges (kiln's converter needs one; the tests feed token ids).

Every computation runs in float32 on the CPU. Output per model, in OUT_DIR/NAME/:
config.json, model.safetensors, tokenizer.json, and fixtures.json:
  {"model", "implementation", "dtype", "vocab_size", "n_greedy", "prompts": [
     {"input_ids", "last_logits", "top20_ids", "greedy_ids", "greedy_min_margin",
      "router_min_margin"}]}
- last_logits: the float32 logits at the last input position (shortest decimals
  that read back as the same float32);
- greedy_ids: n_greedy ids, each the argmax after the input and the ids before it
  (full recomputation, no cache);
- greedy_min_margin: the smallest gap between the best and second-best logit over
  those steps;
- router_min_margin: over every layer, token and forward pass above, the smallest
  gap between the k-th and (k+1)-th largest router logit (a small one would let
  another implementation choose another expert honestly).

Usage:
    python3 scripts/make_moe_fixtures.py crates/kiln-models/tests/fixtures
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import (
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from fixture_checkpoints import RouterMargins, f32_list, save_checkpoint, write_fixtures

N_GREEDY = 16
N_TOP = 20
VOCAB = 256
PROMPTS = [
    [1, 17, 200, 45, 45, 9, 130, 77, 255, 3, 64, 88],
    [250, 5],
]

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
)

MODELS = {
    "qwen3moe-tiny": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(**COMMON, head_dim=16, norm_topk_prob=True),
    ),
    "qwen2moe-tiny": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(**COMMON, shared_expert_intermediate_size=32, norm_topk_prob=False),
    ),
}


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        else:
            fan_in = p.shape[-1]
            scale = 2.0 if name.endswith("mlp.gate.weight") else 1.0
            p.copy_(torch.randn_like(p) * scale / math.sqrt(fan_in))


@torch.no_grad()
def reference(model, margins: RouterMargins, input_ids: list[int]) -> dict:
    margins.min = math.inf
    ids = torch.tensor([input_ids])
    last_logits = model(input_ids=ids).logits[0, -1].float()
    top = torch.topk(last_logits, N_TOP).indices.tolist()
    greedy, gaps = [], []
    for _ in range(N_GREEDY):
        logits = model(input_ids=ids).logits[0, -1].float()
        best2 = torch.topk(logits, 2).values
        gaps.append((best2[0] - best2[1]).item())
        next_id = int(logits.argmax())
        greedy.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return {
        "input_ids": input_ids,
        "last_logits": f32_list(last_logits),
        "top20_ids": top,
        "greedy_ids": greedy,
        "greedy_min_margin": min(gaps),
        "router_min_margin": margins.min,
    }


def make(name: str, out_dir: Path, seed: int) -> None:
    cls, config = MODELS[name]
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    init_weights(model)
    margins = RouterMargins(model, config.num_experts_per_tok)
    prompts = [reference(model, margins, p) for p in PROMPTS]
    target = out_dir / name
    save_checkpoint(model, target)
    write_fixtures(target, name, cls, seed, config.vocab_size,
                   {"n_greedy": N_GREEDY, "prompts": prompts})
    for p in prompts:
        print(f"{name}: {len(p['input_ids'])} ids -> {p['greedy_ids']}, greedy margin "
              f"{p['greedy_min_margin']:.3f}, router margin {p['router_min_margin']:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in MODELS:
        make(name, args.out_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
