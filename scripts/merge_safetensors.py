#!/usr/bin/env python3
"""Merge a sharded Hugging Face checkpoint (model.safetensors.index.json and its
shards) into one model.safetensors, tensors unchanged (same names, dtypes, bytes),
sorted by name.

Usage:
    python3 scripts/merge_safetensors.py SHARDED_DIR OUT/model.safetensors
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sharded_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    index = json.loads((args.sharded_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(args.sharded_dir / shard))
    if set(tensors) != set(index["weight_map"]):
        missing = set(index["weight_map"]) ^ set(tensors)
        print(f"shards and index disagree on {sorted(missing)}", file=sys.stderr)
        return 1
    save_file(dict(sorted(tensors.items())), args.out, metadata={"format": "pt"})
    print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values())} parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
