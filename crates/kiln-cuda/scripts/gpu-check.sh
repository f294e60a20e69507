#!/usr/bin/env bash
# kiln-cuda on the GPU machine (staged by stage-gpu-check.sh): environment, kiln
# doctor, every staged test with KILN_REQUIRE_GPU=1, cold and warm `kiln precompile`
# in fresh processes, the start-up timings, then compute-sanitizer memcheck over
# the parity tests. Logs go to $OUT (at most 8 files); a summary is printed last.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-gpu-check}; mkdir -p "$OUT"
K=.device/bin/kiln
export KILN_REQUIRE_GPU=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  ldconfig -p | grep -E "libcuda\.so|libnvrtc\.so" || echo "no libcuda/libnvrtc in ldconfig"
} > "$OUT/env.txt" 2>&1
if ! ldconfig -p | grep -q "libnvrtc\.so\.13"; then
  lib=$(find / -xdev -name 'libnvrtc.so.13*' 2>/dev/null | grep -v alt | head -1)
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >> "$OUT/env.txt"
fi
cat "$OUT/env.txt"
echo "== doctor (empty default cache)"; $K doctor 2>&1 | tee "$OUT/doctor.txt"
echo "== tests"
pass=0; fail=0
for t in .device/tests/*; do
  echo "##### $(basename "$t")" >> "$OUT/tests-full.txt"
  if "$t" --include-ignored --test-threads 4 >> "$OUT/tests-full.txt" 2>&1; then s=ok; else s=FAILED; fi
  line=$(tail -n 30 "$OUT/tests-full.txt" | grep -E "^test result" | tail -1)
  echo "$(basename "$t"): $s $line" | tee -a "$OUT/tests.txt"
  p=$(echo "$line" | grep -Eo "[0-9]+ passed" | grep -Eo "[0-9]+"); f=$(echo "$line" | grep -Eo "[0-9]+ failed" | grep -Eo "[0-9]+")
  pass=$((pass + ${p:-0})); fail=$((fail + ${f:-0})); [ "$s" = FAILED ] && [ "${f:-0}" = 0 ] && fail=$((fail + 1))
done
echo "$pass passed, $fail failed" | tee -a "$OUT/tests.txt"
echo "== process cold/warm"
export KILN_CACHE_DIR=$(mktemp -d)
for run in cold warm; do
  s=$(date +%s%N); $K precompile --all 2>&1 | tee -a "$OUT/precompile.txt"; e=$(date +%s%N)
  echo "process $run: $(( (e - s) / 1000000 )) ms" | tee -a "$OUT/precompile.txt"
done
$K convert models/shakespeare-tiny /tmp/tiny.gguf > /dev/null 2>&1 \
  && KILN_CACHE_DIR=$(mktemp -d) $K precompile --model /tmp/tiny.gguf 2>&1 | tee -a "$OUT/precompile.txt"
unset KILN_CACHE_DIR
echo "== timings"; $K precompile --all --timings 2>&1 | tee "$OUT/timings.txt"
echo "== memcheck"
for t in .device/tests/*; do
  if "$t" --list --include-ignored 2>/dev/null | grep -qE "matches_cpu|aliased_transients"; then
    KILN_KERNEL_CACHE=off compute-sanitizer --tool memcheck --error-exitcode 9 "$t" --include-ignored --test-threads 1 > /tmp/mc.txt 2>&1
    rc=$?; { echo "##### $t rc=$rc"; cat /tmp/mc.txt; } >> "$OUT/memcheck-full.txt"
    echo "memcheck $(basename "$t"): rc=$rc $(grep -E 'ERROR SUMMARY|test result' /tmp/mc.txt | tr '\n' ' ')"
  fi
done 2>&1 | tee "$OUT/memcheck.txt"
echo "== summary"
tail -1 "$OUT/tests.txt"
grep -E "^process|kernels ready" "$OUT/precompile.txt"
cat "$OUT/timings.txt" "$OUT/memcheck.txt"
