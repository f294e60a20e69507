"""Prints docs/perf.md rows from bench_presets.sh's outputs.

usage: python3 scripts/perf_table.py CEILINGS.json BENCH.jsonl
"""
import datetime
import json
import os
import subprocess
import sys

ceil = json.load(open(sys.argv[1]))
rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
# A copy on the GPU machine may carry stale git metadata: KILN_COMMIT names the build.
commit = os.environ.get("KILN_COMMIT") or subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"device: {ceil['device']}; copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
      f"bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s (PyTorch, same call); "
      f"commit {commit or '?'}; {datetime.date.today()}")
print()
print("| model | type | size | pp512 t/s (median; mean ± std) | tg128 t/s (median; mean ± std) "
      "| tg bandwidth eff. | prefill TFLOP/s (% of bf16) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    pp, tg = r.get("pp") or {}, r.get("tg") or {}
    flops = pp.get("flops_per_s_median", 0.0)
    # kiln bench measured its own copy bandwidth; rescale its efficiency to PyTorch's ceiling.
    eff = tg.get("bandwidth_efficiency_median", 0.0) * r["copy_bytes_per_s"] / ceil["copy_bytes_per_s"]
    print(f"| {r['preset']} | {r['type']} | {r['weight_bytes'] / 2**30:.2f} GiB "
          f"| {pp.get('tokens_per_s_median', 0):.1f}; {pp.get('tokens_per_s_mean', 0):.1f} ± {pp.get('tokens_per_s_std', 0):.1f} "
          f"| {tg.get('tokens_per_s_median', 0):.1f}; {tg.get('tokens_per_s_mean', 0):.1f} ± {tg.get('tokens_per_s_std', 0):.1f} "
          f"| {eff * 100:.1f}% | {flops / 1e12:.1f} ({flops / ceil['bf16_flops_per_s'] * 100:.0f}%) |")
