#!/usr/bin/env bash
# Benchmarks kiln on real-shaped synthetic models, on the GPU machine, in one device call:
# measures the two ceilings (device-to-device copy bandwidth counting bytes read plus
# written, and the bf16 matrix-product rate, both through the PyTorch there), then for
# each preset and type writes the model with `kiln synth`, runs `kiln bench` on it
# (JSON), deletes it, and finally prints docs/perf.md rows (scripts/perf_table.py).
#
#   here:   ../shared/tools/stage-for-device
#   device: bash scripts/bench_presets.sh "llama-3.1-8b qwen3-8b" "q4_0 q8_0"
#
# A call may run 10 minutes: split the presets and types over several calls; each call
# appends to $OUT/bench.jsonl (fetch it before the next call empties $OUT).
set -euo pipefail
presets=${1:-"llama-3.2-1b qwen2.5-0.5b llama-3.1-8b qwen3-8b"}
types=${2:-"q4_0 q4_k q8_0"}
kiln=${KILN:-.device/bin/kiln}
out=${OUT:-/tmp/kiln-bench}
work=${WORK:-/tmp/kiln-models}
mkdir -p "$out" "$work"
python3 - > "$out/ceilings.json" <<'PY'
import json, torch
def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
n = 1 << 30
src = torch.randn(n // 4, device="cuda"); dst = torch.empty_like(src)
copy = 2 * n / timed(lambda: dst.copy_(src))
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
mm = 2 * 8192**3 / timed(lambda: a @ b)
print(json.dumps({"copy_bytes_per_s": copy, "bf16_flops_per_s": mm, "device": torch.cuda.get_device_name()}))
PY
cat "$out/ceilings.json"
for preset in $presets; do
  for type in $types; do
    file="$work/$preset-$type.gguf"
    "$kiln" synth --preset "$preset" --type "$type" -o "$file"
    "$kiln" bench -m "$file" -p 512 -n 128 -r 5 --device cuda --json \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r.update(preset='$preset', type='$type'); print(json.dumps(r))" \
      >> "$out/bench.jsonl"
    rm -f "$file"
  done
done
python3 scripts/perf_table.py "$out/ceilings.json" "$out/bench.jsonl"
