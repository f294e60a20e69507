#!/usr/bin/env python3
"""A tiny random-weight Qwen3-Next checkpoint and its reference outputs from
transformers (an implementation independent of kiln), for kiln's qwen3next fidelity
tests (crates/kiln-models/tests/qwen3next_fixtures.rs).

The model is built from a fixed seed with transformers' Qwen3NextForCausalLM (needs
transformers >= 4.57): hidden 64, 4 layers in the real pattern (Gated DeltaNet
linear attention in layers 0-2, gated full attention in layer 3: one in every
`full_attention_interval` = 4), 4 query heads of 16 (2 key-value heads, a quarter of
each head rotated), 2 key heads and 4 value heads of 16 in the linear attention with a
convolution of 4 taps, and a mixture of 8 experts of which 2 per token (width 16) with
a sigmoid-gated shared expert of width 32. Weights are drawn so that activations and
routing are decisive: every matrix N(0, 1/fan_in), the zero-centred norms
N(0, 0.1^2) (the model multiplies by 1 + weight), the gated norm of the linear
attention 1 + N(0, 0.1^2), the embedding N(0, 1), the routers N(0, 16/fan_in), the
decay rates A = exp(A_log) uniform in [1, 8) and dt_bias N(0, 0.5^2). It is saved in
float32 with save_pretrained, with a byte-level BPE tokenizer.json of the 256 byte
tokens and no merges (kiln's converter needs one; the tests feed token ids).

Every computation runs in float32 on the CPU, where transformers runs prompts through
torch_chunk_gated_delta_rule and single tokens through
torch_recurrent_gated_delta_rule. Output in OUT_DIR/qwen3next-tiny/: config.json,
model.safetensors, tokenizer.json, and fixtures.json:
  {"model", "implementation", "dtype", "vocab_size", "n_decode", "prompts": [
     {"input_ids", "logits", "greedy_ids", "greedy_min_margin", "router_min_margin"}]}
- logits: n_decode + 1 rows of float32 logits (shortest decimals that read back as
  the same float32): after the prompt, then after each greedy token fed back one at a
  time through the model's cache (conv and recurrent states, KV cache);
- greedy_ids: the n_decode greedy tokens, each the argmax of the row before it;
- greedy_min_margin: the smallest gap between the best and second-best logit over
  those rows;
- router_min_margin: over every layer, token and step, the smallest gap between the
  k-th and (k+1)-th largest router logit (a small one would let another
  implementation choose another expert honestly).

Usage:
    /work/venv-moe/bin/python scripts/make_qwen3next_fixtures.py crates/kiln-models/tests/fixtures
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

from fixture_checkpoints import RouterMargins, f32_list, save_checkpoint, write_fixtures

NAME = "qwen3next-tiny"
N_DECODE = 16
VOCAB = 256
PROMPT_LENGTHS = [1, 7, 200]


def config() -> Qwen3NextConfig:
    return Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        full_attention_interval=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        norm_topk_prob=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith("linear_attn.norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("norm.weight"):
            p.copy_(0.1 * torch.randn_like(p))
        elif name.endswith("A_log"):
            p.copy_(torch.log(torch.empty_like(p).uniform_(1.0, 8.0)))
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * torch.randn_like(p))
        elif "embed_tokens" in name:
            p.copy_(torch.randn_like(p))
        elif name.endswith("conv1d.weight"):
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
        else:
            fan_in = p.shape[-1]
            scale = 4.0 if name.endswith("mlp.gate.weight") else 1.0
            p.copy_(torch.randn_like(p) * scale / math.sqrt(fan_in))


@torch.no_grad()
def reference(model, margins: RouterMargins, input_ids: list[int]) -> dict:
    margins.min = math.inf
    out = model(input_ids=torch.tensor([input_ids]), use_cache=True)
    cache = out.past_key_values
    rows, greedy, gaps = [], [], []
    logits = out.logits[0, -1].float()
    for step in range(N_DECODE + 1):
        rows.append(f32_list(logits))
        best2 = torch.topk(logits, 2).values
        gaps.append((best2[0] - best2[1]).item())
        if step == N_DECODE:
            break
        next_id = int(logits.argmax())
        greedy.append(next_id)
        out = model(input_ids=torch.tensor([[next_id]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[0, -1].float()
    return {
        "input_ids": input_ids,
        "logits": rows,
        "greedy_ids": greedy,
        "greedy_min_margin": min(gaps),
        "router_min_margin": margins.min,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config()
    torch.manual_seed(args.seed)
    model = Qwen3NextForCausalLM(cfg).float().eval()
    init_weights(model)
    margins = RouterMargins(model, cfg.num_experts_per_tok)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    results = [reference(model, margins, p) for p in prompts]
    target = args.out_dir / NAME
    save_checkpoint(model, target)
    write_fixtures(target, NAME, Qwen3NextForCausalLM, args.seed, cfg.vocab_size,
                   {"n_decode": N_DECODE, "prompts": results})
    for r in results:
        print(f"{NAME}: {len(r['input_ids'])} ids -> {r['greedy_ids']}, greedy margin "
              f"{r['greedy_min_margin']:.4f}, router margin {r['router_min_margin']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
