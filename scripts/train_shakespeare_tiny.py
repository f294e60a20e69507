#!/usr/bin/env python3
"""Train models/shakespeare-tiny: a small Llama (transformers' LlamaForCausalLM) on the
works of Shakespeare.

Inputs: the splits that scripts/prepare_shakespeare.py writes (train.jsonl, val.jsonl)
and the tokenizer that scripts/train_tokenizer.py writes (tokenizer.json).

Data: each work is encoded without special tokens and followed by <|end_of_text|>;
the works are concatenated into one stream per split. Every training sequence is
<|begin_of_text|> followed by SEQ_LEN-1 tokens from a random offset of the stream, so
a prompt encoded with BOS (as the tokenizer's post-processor does) is what the model
saw in training. The validation loss is the mean next-token cross-entropy (nats per
token) over the whole validation stream, cut into consecutive windows of SEQ_LEN-1
tokens, each prefixed with BOS.

Training: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then
cosine decay to 10% of the peak rate over --max-steps, gradient clipping at 1.0, bf16
autocast on CUDA (float32 on the CPU). It stops at --max-steps, at --minutes of
wall-clock, or when the validation loss has not improved for --patience evaluations,
and keeps the weights of the best evaluation.

Output (OUT_DIR): the checkpoint in Hugging Face form (config.json,
generation_config.json, safetensors in float16, sharded by --max-shard-size), plus
train_log.json with the settings, the loss curve, the best validation loss and a
greedy sample from "ROMEO:".

Usage (the command that trained the checked-in model is in models/shakespeare-tiny/README.md):
    python3 scripts/train_shakespeare_tiny.py .data/shakespeare models/shakespeare-tiny OUT_DIR
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

BOS_ID = 0
EOS_ID = 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path, help="folder with train.jsonl and val.jsonl")
    p.add_argument("tokenizer_dir", type=Path, help="folder with tokenizer.json")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock limit of the training loop")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    p.add_argument("--max-shard-size", default="12MB")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def encode_split(tokenizer: Tokenizer, path: Path) -> torch.Tensor:
    ids = []
    with open(path) as f:
        for line in f:
            ids.extend(tokenizer.encode(json.loads(line)["text"], add_special_tokens=False).ids)
            ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def training_batch(stream: torch.Tensor, args, gen: torch.Generator) -> torch.Tensor:
    body = args.seq_len - 1
    starts = torch.randint(0, len(stream) - body, (args.batch_size,), generator=gen)
    rows = torch.stack([stream[s : s + body] for s in starts])
    bos = torch.full((args.batch_size, 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def validation_windows(stream: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    body = seq_len - 1
    return [torch.cat([torch.tensor([BOS_ID]), stream[s : s + body]]) for s in range(0, len(stream) - 1, body)]


def autocast(args):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda"))


@torch.no_grad()
def validation_loss(model, windows: list[torch.Tensor], args) -> float:
    model.eval()
    total, count = 0.0, 0
    batch = args.batch_size
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), EOS_ID, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, : len(w)] = w
            labels[row, : len(w)] = w
        with autocast(args):
            logits = model(input_ids=ids.to(args.device)).logits.float()
        targets = labels[:, 1:].to(args.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += (targets != -100).sum().item()
    model.train()
    return total / count


@torch.no_grad()
def greedy_sample(model, tokenizer: Tokenizer, prompt: str, n_tokens: int, device: str) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    for _ in range(n_tokens):
        next_id = model(input_ids=ids).logits[0, -1].float().argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    model.train()
    return tokenizer.decode(ids[0].tolist())


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def optimizer_for(model, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=args.device.startswith("cuda"))


def train(model, train_stream, val_windows, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = optimizer_for(model, args)
    curve, best = [], {"val_loss": math.inf, "step": -1, "state": None}
    start = time.monotonic()
    stale = 0
    step = 0
    for step in range(args.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = training_batch(train_stream, args, gen).to(args.device)
        with autocast(args):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        elapsed = time.monotonic() - start
        last = step + 1 == args.max_steps or elapsed > args.minutes * 60
        if (step + 1) % args.eval_every == 0 or last:
            val = validation_loss(model, val_windows, args)
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val, "seconds": elapsed})
            print(f"step {step + 1}: train {loss.item():.4f} val {val:.4f} ({elapsed:.0f} s)", flush=True)
            if val < best["val_loss"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best, stale = {"val_loss": val, "step": step + 1, "state": state}, 0
            else:
                stale += 1
            if stale >= args.patience:
                print(f"stopping: no improvement in {stale} evaluations", flush=True)
                break
        if last:
            break
    model.load_state_dict(best["state"])
    return {
        "curve": curve,
        "best_step": best["step"],
        "val_loss": best["val_loss"],
        "steps_run": step + 1,
        "train_seconds": time.monotonic() - start,
    }


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_file(str(args.tokenizer_dir / "tokenizer.json"))
    assert tokenizer.token_to_id("<|begin_of_text|>") == BOS_ID and tokenizer.token_to_id("<|end_of_text|>") == EOS_ID
    train_stream = encode_split(tokenizer, args.data_dir / "train.jsonl")
    val_windows = validation_windows(encode_split(tokenizer, args.data_dir / "val.jsonl"), args.seq_len)
    print(f"train {len(train_stream)} tokens, validation {sum(len(w) - 1 for w in val_windows)} tokens", flush=True)

    model = build_model(args, tokenizer.get_vocab_size()).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters on {args.device}", flush=True)
    result = train(model, train_stream, val_windows, args)
    sample = greedy_sample(model, tokenizer, "ROMEO:", 128, args.device)
    print(f"best validation loss {result['val_loss']:.4f} at step {result['best_step']}\n{sample}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.float16
    model.to(torch.float16).save_pretrained(args.out_dir, max_shard_size=args.max_shard_size)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=False).save_pretrained(args.out_dir)
    log = {
        "command": " ".join(sys.argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params,
        "train_tokens": len(train_stream),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "greedy_from_ROMEO": sample,
        **result,
    }
    with open(args.out_dir / "train_log.json", "w") as f:
        json.dump(log, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
