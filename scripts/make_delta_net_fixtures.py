#!/usr/bin/env python3
"""Reference outputs of the Gated DeltaNet ops from transformers' Qwen3-Next module
(an implementation independent of kiln), for kiln-cpu's tests/delta_net_fixtures.rs.

transformers' own functions run on small random inputs (fixed seed, float32, CPU):
- `torch_recurrent_gated_delta_rule` and `torch_chunk_gated_delta_rule` (q/k L2 norm
  on, grouped heads), with g and beta computed from a, b, A_log and dt_bias as
  `Qwen3NextGatedDeltaNet.forward` computes them;
- `causal_conv1d_fn` (a prompt from a zero state) and `causal_conv1d_update` (decode
  steps continuing from the prompt's state), with SiLU;
- `Qwen3NextRMSNormGated` and `l2norm`.

Output: one safetensors file of float32 tensors, named `<case>.<tensor>`:
- `conv.{x, weight, out, state}`: x [T, C], weight [C, K], out [T, C] (the first
  T_PROMPT tokens through causal_conv1d_fn, the rest one by one through
  causal_conv1d_update), state [C, K - 1] after the last token;
- `<form>_<T>.{qkv, a, b, ssm_a, dt_bias, state_in, out, state_out}` for the delta
  rule: qkv [T, 2 Hk Dk + Hv Dv] (queries, keys, values of each token, as kiln's op
  reads them), a and b [T, Hv], ssm_a = -exp(A_log) and dt_bias [Hv], state_in and
  state_out [Hv, Dk, Dv], out [T, Hv, Dv];
- `gated_norm.{x, z, weight, out}` and `l2.{x, out}`.

Usage:
    python3 scripts/make_delta_net_fixtures.py crates/kiln-cpu/tests/fixtures/delta_net.safetensors
"""

import argparse

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.qwen3_next import modeling_qwen3_next as qn

SEED = 25
HK, HV, DK, DV = 2, 4, 16, 12
K = 4
T_PROMPT, T_DECODE = 7, 3
# (form, tokens, from a random initial state)
DELTA_CASES = [
    ("recurrent", 1, True),
    ("recurrent", 7, True),
    ("chunk", 65, True),
    ("chunk", 130, False),
]


def conv_case(gen: torch.Generator) -> dict:
    channels = 2 * HK * DK + HV * DV
    x = torch.randn(T_PROMPT + T_DECODE, channels, generator=gen)
    weight = torch.randn(channels, K, generator=gen) * 0.5
    # [batch, channels, time], as the layer calls them.
    prompt = x[:T_PROMPT].T.unsqueeze(0)
    out = [qn.causal_conv1d_fn(prompt, weight, None, activation="silu")[0].T]
    # kiln's state: the last K - 1 inputs (T_PROMPT >= K - 1).
    state = prompt[:, :, -(K - 1) :].clone()
    for t in range(T_PROMPT, T_PROMPT + T_DECODE):
        step = x[t : t + 1].T.unsqueeze(0)
        out.append(qn.causal_conv1d_update(step, state, weight, None, activation="silu")[0].T)
    return {"x": x, "weight": weight, "out": torch.cat(out), "state": state[0]}


def delta_case(gen: torch.Generator, form: str, n: int, with_state: bool) -> dict:
    q = torch.randn(1, n, HK, DK, generator=gen)
    k = torch.randn(1, n, HK, DK, generator=gen)
    v = torch.randn(1, n, HV, DV, generator=gen)
    a = torch.randn(1, n, HV, generator=gen)
    b = torch.randn(1, n, HV, generator=gen) * 1.5
    a_log = torch.log(torch.rand(HV, generator=gen) * 4.0 + 0.05)
    dt_bias = torch.rand(HV, generator=gen)
    state = torch.randn(1, HV, DK, DV, generator=gen) * 0.5 if with_state else torch.zeros(1, HV, DK, DV)
    # As Qwen3NextGatedDeltaNet.forward computes them.
    beta = b.sigmoid()
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
    args = dict(initial_state=state.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True)
    if form == "recurrent":
        out, final = qn.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **args)
    else:
        out, final = qn.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, chunk_size=64, **args)
    qkv = torch.cat([q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)], dim=1)
    return {
        "qkv": qkv,
        "a": a[0],
        "b": b[0],
        # As GGUF's ssm_a stores it (llama.cpp's converter writes -exp(A_log)).
        "ssm_a": -torch.exp(a_log),
        "dt_bias": dt_bias,
        "state_in": state[0],
        "out": out[0],
        "state_out": final[0],
    }


def norm_cases(gen: torch.Generator) -> dict:
    rows, dim = 10, DV
    norm = qn.Qwen3NextRMSNormGated(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    x = torch.randn(rows, dim, generator=gen) * 2.0
    z = torch.randn(rows, dim, generator=gen) * 2.0
    lx = torch.randn(5, DK, generator=gen) * 3.0
    return {
        "gated_norm.x": x,
        "gated_norm.z": z,
        "gated_norm.weight": norm.weight.detach().clone(),
        "gated_norm.out": norm(x, z).detach(),
        "l2.x": lx,
        "l2.out": qn.l2norm(lx, dim=-1, eps=1e-6),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the safetensors file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)
    tensors = {f"conv.{k}": v for k, v in conv_case(gen).items()}
    for form, n, with_state in DELTA_CASES:
        case = delta_case(gen, form, n, with_state)
        tensors.update({f"{form}_{n}.{k}": v for k, v in case.items()})
    tensors.update(norm_cases(gen))
    tensors = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
    metadata = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": str(SEED),
        "shape": f"Hk={HK} Hv={HV} Dk={DK} Dv={DV} K={K}",
    }
    save_file(tensors, args.out, metadata=metadata)


if __name__ == "__main__":
    main()
