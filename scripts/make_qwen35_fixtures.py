#!/usr/bin/env python3
"""Tiny random-weight Qwen3.5 checkpoints, dense and mixture-of-experts, and their
reference outputs from transformers (an implementation independent of kiln), for
kiln's qwen35 and qwen35moe fidelity tests (crates/kiln-models/tests/qwen35_fixtures.rs).

Both models are built from a fixed seed with transformers' Qwen3_5ForCausalLM and
Qwen3_5MoeForCausalLM (transformers >= 5.2): hidden 64, 4 layers in the real pattern
(Gated DeltaNet linear attention in layers 0-2, gated full attention in layer 3), 4
query heads of 16 (2 key-value heads) with half of each head rotated by a
multi-section rotary embedding (sections [2, 1, 1]: for text every section rotates by
the token's position), a convolution of 4 taps, and 2 key heads of 16 with more value
heads of 16 in the linear attention (whose value heads llama.cpp's files tile, where
the checkpoint groups them by key head):

- qwen35-tiny: 6 value heads (3 per key head), a SwiGLU feed-forward of width 96,
  the output projection tied to the embedding (as the small Qwen3.5 models have it);
  saved as Qwen3_5ForCausalLM saves itself (`model.*`, no `lm_head.weight`).
- qwen35moe-tiny: 4 value heads, a mixture of 8 experts of which 2 per token (width
  16) with a sigmoid-gated shared expert of width 32, an untied output projection;
  saved as the published Qwen3.5-MoE checkpoints are: a
  Qwen3_5MoeForConditionalGeneration config.json with the text model's
  hyperparameters in `text_config`, tensors under `model.language_model.`, each
  layer's experts stacked in `mlp.experts.gate_up_proj` ([experts, 2 x width, hidden],
  each expert's gate rows then its up rows) and `mlp.experts.down_proj`, and a few
  tensors of a vision tower (`model.visual.*`) and a multi-token-prediction layer
  (`mtp.*`) that the text model does not read. The script checks that transformers
  loads this directory back into the same model.

Weights are drawn as make_qwen3next_fixtures.py draws them (the two models' layers
are Qwen3-Next's), except the dense model's tied embedding, N(0, 0.25^2), so that its
layers rather than each token's own row choose the next token; seeds are picked for
decisive greedy tokens and routing (margins above 1e-2 and 1e-3). They are saved in
float32 with a byte-level BPE tokenizer.json of the 256
byte tokens and no merges (the tests feed token ids). Every computation runs in float32
on the CPU, where transformers runs prompts through torch_chunk_gated_delta_rule and
single tokens through torch_recurrent_gated_delta_rule. Each output directory holds
config.json, model.safetensors, tokenizer.json and fixtures.json, as
make_qwen3next_fixtures.py describes it (router_min_margin is null for the dense
model, which has no router).

Usage:
    /work/venv-moe/bin/python scripts/make_qwen35_fixtures.py crates/kiln-models/tests/fixtures
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

from fixture_checkpoints import RouterMargins, save_checkpoint, write_fixtures
from make_qwen3next_fixtures import N_DECODE, PROMPT_LENGTHS, VOCAB, init_weights, reference


def common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
    )


def dense_config() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        **common(),
        linear_num_value_heads=6,
        intermediate_size=96,
        tie_word_embeddings=True,
    )


def moe_config() -> Qwen3_5MoeTextConfig:
    return Qwen3_5MoeTextConfig(
        **common(),
        linear_num_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        tie_word_embeddings=False,
    )


def published_layout(model: torch.nn.Module, target: Path, seed: int) -> None:
    """Rewrites the MoE checkpoint save_pretrained wrote in `target` as the published
    Qwen3.5-MoE checkpoints lay theirs out (see the module's description)."""
    cfg = model.config
    path = target / "model.safetensors"
    saved = load_file(path)
    out = {}
    for name, t in saved.items():
        if name == "lm_head.weight":
            out[name] = t
        elif ".mlp.experts." not in name:
            out[name.replace("model.", "model.language_model.", 1)] = t
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(cfg.num_experts):
            gate_up.append(torch.cat([saved[f"{prefix}.{e}.gate_proj.weight"],
                                      saved[f"{prefix}.{e}.up_proj.weight"]]))
            down.append(saved[f"{prefix}.{e}.down_proj.weight"])
        stacked = f"model.language_model.layers.{layer}.mlp.experts"
        out[f"{stacked}.gate_up_proj"] = torch.stack(gate_up).contiguous()
        out[f"{stacked}.down_proj"] = torch.stack(down).contiguous()
    gen = torch.Generator().manual_seed(seed)
    h = cfg.hidden_size
    for name, shape in [("model.visual.merger.norm.weight", [16]),
                        ("model.visual.blocks.0.attn.qkv.weight", [48, 16]),
                        ("mtp.norm.weight", [h]),
                        ("mtp.pre_fc_norm_hidden.weight", [h])]:
        out[name] = torch.randn(shape, generator=gen)
    save_file(out, path, metadata={"format": "pt"})
    text = json.loads((target / "config.json").read_text())
    text.pop("architectures")
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": text["transformers_version"],
    }
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def check_reload(model: torch.nn.Module, target: Path, prompt: list[int]) -> None:
    """transformers reads `target` back into the same model: equal logits."""
    again = Qwen3_5MoeForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    want, got = model(input_ids=ids).logits, again(input_ids=ids).logits
    if not torch.equal(want, got):
        raise SystemExit(f"{target}: transformers reloads other logits "
                         f"(max difference {(want - got).abs().max().item():.3e})")


def make(name: str, cls, cfg, seed: int, out_dir: Path, published: bool) -> None:
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    init_weights(model)
    if cfg.tie_word_embeddings:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(0.25)
    # The dense model has no router: its margin stays infinite, written as null.
    margins = RouterMargins(model, getattr(cfg, "num_experts_per_tok", 1))
    gen = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    results = [reference(model, margins, p) for p in prompts]
    for r in results:
        if math.isinf(r["router_min_margin"]):
            r["router_min_margin"] = None
    target = out_dir / name
    save_checkpoint(model, target)
    if published:
        published_layout(model, target, seed + 2)
        check_reload(model, target, prompts[1])
    write_fixtures(target, name, cls, seed, cfg.vocab_size,
                   {"n_decode": N_DECODE, "prompts": results})
    for r in results:
        print(f"{name}: {len(r['input_ids'])} ids -> {r['greedy_ids']}, greedy margin "
              f"{r['greedy_min_margin']:.4f}, router margin {r['router_min_margin']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dense-seed", type=int, default=7)
    parser.add_argument("--moe-seed", type=int, default=29)
    args = parser.parse_args()
    torch.set_num_threads(1)
    make("qwen35-tiny", Qwen3_5ForCausalLM, dense_config(), args.dense_seed, args.out_dir,
         False)
    make("qwen35moe-tiny", Qwen3_5MoeForCausalLM, moe_config(), args.moe_seed, args.out_dir,
         True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
