#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .device staged
# (../shared/tools/stage-for-device) and carried: writes the synth files the decode
# figures use, then runs the benchmarks named by the arguments.
#   bash scripts/device/decode_run.sh tests     # the GPU test suite
#   bash scripts/device/decode_run.sh focus     # sampling, replay and attention GPU tests, whole output
#                                               # (FOCUS="<test executables>" narrows it)
#   bash scripts/device/decode_run.sh bench     # tg128 of the synth files, graphs on and off
#                                               # (GRAPHS="1" for on only; REPS, default 5)
#   bash scripts/device/decode_run.sh profile   # the per-launch profile of the 8B decode step
#   bash scripts/device/decode_run.sh depth     # pp512 and tg128 of the 8B q4_0 at depths 0, 4k, 16k
#   bash scripts/device/decode_run.sh depth16k  # tg128 of the 8B q4_0 at depth 16k, the issue's target
#   bash scripts/device/decode_run.sh sampler   # tg128 of the 8B q4_0 with the default sampler
#   bash scripts/device/decode_run.sh kernels   # bench-kernels for q4_0, q4_k, q8_0
#   bash scripts/device/decode_run.sh generate  # kiln generate -n 128 on the 8B q4_0, greedy and sampled
#   bash scripts/device/decode_run.sh moe       # pp512/tg128 of the qwen3-30b-a3b synth files (TYPES, default
#                                               # "q4_0 q4_k"), bench-kernels' expert-routed mat-vecs,
#                                               # and kiln generate on the first of TYPES
#   bash scripts/device/decode_run.sh deltanet  # bench-kernels' gated delta rule and its GPU tests
#   bash scripts/device/decode_run.sh hybrid    # pp512, pp4096 and tg128 of the qwen3-next-80b-a3b synth
#                                               # file (TYPES, default "q4_k"), and kiln generate on it
#   bash scripts/device/decode_run.sh lowbit    # pp512 and tg128 of the qwen3-8b synth files in the 1- and
#                                               # 2-bit formats (TYPES, default "q1_0 tq2_0 q2_0") and
#                                               # bench-kernels' mat-vecs of those formats beside q4_0
#   bash scripts/device/decode_run.sh switch    # tg128 with the environment variables SWITCH (one or
#                                               # several, space-separated) at 1, 0, 1, 0
#                                               # side by side, on FILES (default "llama-3.2-1b:q4_0
#                                               # llama-3.1-8b:q4_0 llama-3.1-8b:q8_0 qwen3-8b:q1_0"); REPS, default 3
#   bash scripts/device/decode_run.sh fusions   # the fused launches' GPU test executables (fused_matvec,
#                                               # sibling_matvec, router_matvec, moe_epilogue, manifest)
#   bash scripts/device/decode_run.sh same      # kiln generate --temp 0 (64 tokens) with the variables
#                                               # SWITCH at 0 and at 1 on FILES: fused launches compute the
#                                               # unfused bits, so each file's two texts must be the same
#   bash scripts/device/decode_run.sh synth     # only writes the synth files of FILES
#   bash scripts/device/decode_run.sh kernels-vs # bench-kernels --sections SECTIONS (default delta-net) of this
#                                               # build and of OLD (another kiln binary), alternating twice
#   bash scripts/device/decode_run.sh memcheck  # compute-sanitizer memcheck over the GPU test executables
#                                               # (MEMCHECK="<test executables>" narrows it)
# Logs go to $OUT when it is set (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/kiln-out}
mkdir -p "$out"
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-$PWD/.device/kcache}
bash .device/unpack || exit 1
kiln=.device/bin/kiln
models=${MODELS:-/tmp/kiln-models}
files=${FILES:-llama-3.2-1b:q4_0 llama-3.1-8b:q4_0 llama-3.1-8b:q8_0 qwen3-8b:q1_0}
mkdir -p "$models"
synth() { # preset type
  local f="$models/$1-$2.gguf"
  [ -f "$f" ] || "$kiln" synth --preset "$1" --type "$2" --seed 1 -o "$f" >/dev/null || exit 1
  echo "$f"
}
for what in "$@"; do
  case "$what" in
    tests)
      # The CLI tests run the kiln binary and write scratch files where cargo put
      # them when they were built: target/ of this checkout.
      mkdir -p target/release target/tmp && ln -sf "$PWD/$kiln" target/release/kiln
      timeout 420 bash .device/run-tests.sh 2>&1 | tee "$out/tests.log" | grep -E "FAILED|panicked|passed, " ;;
    focus)
      # The GPU tests of sampling, replayed decode and decode attention, whole output.
      mkdir -p target/release target/tmp && ln -sf "$PWD/$kiln" target/release/kiln
      for t in ${FOCUS:-.device/tests/sample-* .device/tests/gpu-* .device/tests/gpu_decode_work-* .device/tests/attention-*}; do
        KILN_REQUIRE_GPU=1 "$t" --include-ignored 2>&1 | grep -E "^test |test result|panicked|NMSE per|assert|left|right" | grep -v "\.\.\. ok$"
      done 2>&1 | tee "$out/focus.log" ;;
    bench)
      for spec in llama-3.1-8b:q4_0 llama-3.2-1b:q4_0 llama-3.1-8b:q4_k llama-3.1-8b:q8_0; do
        f=$(synth "${spec%%:*}" "${spec##*:}")
        for graphs in ${GRAPHS:-1 0}; do
          echo "== $spec KILN_CUDA_GRAPHS=$graphs"
          KILN_CUDA_GRAPHS=$graphs "$kiln" bench -m "$f" -p 0 -n 128 -r "${REPS:-5}" --device cuda 2>/dev/null | grep -E "ceiling|tg128"
        done
      done 2>&1 | tee "$out/bench.log" ;;
    profile)
      f=$(synth llama-3.1-8b q4_0)
      "$kiln" bench -m "$f" -p 0 -n 128 -r 3 --profile --device cuda 2>/dev/null | tee "$out/profile.log" ;;
    depth)
      f=$(synth llama-3.1-8b q4_0)
      "$kiln" bench -m "$f" -p 512 -n 128 -d 0,4096,16384 -r 3 --device cuda 2>/dev/null | tee "$out/depth.log" ;;
    depth16k)
      f=$(synth llama-3.1-8b q4_0)
      "$kiln" bench -m "$f" -p 0 -n 128 -d 16384 -r "${REPS:-5}" --device cuda 2>/dev/null | grep -E "ceiling|tg128" | tee "$out/depth16k.log" ;;
    sampler)
      f=$(synth llama-3.1-8b q4_0)
      for s in greedy default; do
        "$kiln" bench -m "$f" -p 0 -n 128 -r 3 --sampler $s --device cuda 2>/dev/null | grep -E "tg128"
      done 2>&1 | tee "$out/sampler.log" ;;
    generate)
      # Generation as a user runs it, greedy and with the default sampler, twice each
      # in one process is not possible from the CLI: each run loads the model.
      f=$(synth llama-3.1-8b q4_0)
      for sampling in "--temp 0" ""; do
        echo "== kiln generate -n 128 --ignore-eos $sampling"
        "$kiln" generate -m "$f" -p "Once upon a time" -n 128 --ignore-eos --seed 1 $sampling --device cuda 2>&1 >/dev/null | grep "kiln: prompt"
      done 2>&1 | tee "$out/generate.log" ;;
    kernels)
      "$kiln" bench-kernels --formats q4_0,q4_k,q8_0 --device cuda 2>/dev/null | tee "$out/kernels.log" ;;
    moe)
      for t in ${TYPES:-q4_0 q4_k}; do
        f=$(synth qwen3-30b-a3b "$t")
        echo "== qwen3-30b-a3b $t"
        "$kiln" bench -m "$f" -p 512 -n 128 -r "${REPS:-3}" --device cuda 2>/dev/null | grep -E "ceiling|pp512|tg128"
      done 2>&1 | tee "$out/moe.log"
      "$kiln" bench-kernels --sections moe --device cuda 2>/dev/null | tee -a "$out/moe.log"
      types=${TYPES:-q4_0 q4_k}
      f=$(synth qwen3-30b-a3b "${types%% *}")
      "$kiln" generate -m "$f" -p "Once upon a time" -n 64 --ignore-eos --temp 0 --device cuda 2>&1 >/dev/null | grep "kiln: prompt" | tee -a "$out/moe.log" ;;
    deltanet)
      "$kiln" bench-kernels --sections delta-net --reps "${REPS:-5}" --device cuda 2>/dev/null | tee "$out/deltanet.log"
      for t in .device/tests/delta_net-*; do KILN_REQUIRE_GPU=1 "$t" --include-ignored 2>&1 | grep -E "^test |test result|panicked"; done | tee -a "$out/deltanet.log" ;;
    hybrid)
      for t in ${TYPES:-q4_k}; do
        f=$(synth qwen3-next-80b-a3b "$t")
        echo "== qwen3-next-80b-a3b $t"
        "$kiln" bench -m "$f" -p 512,4096 -n 128 -r "${REPS:-2}" --device cuda 2>/dev/null | grep -E "ceiling|model|pp|tg"
        "$kiln" generate -m "$f" -p "Once upon a time" -n 64 --ignore-eos --temp 0 --device cuda 2>&1 >/dev/null | grep "kiln: prompt"
      done 2>&1 | tee "$out/hybrid.log" ;;
    lowbit)
      types=${TYPES:-q1_0 tq2_0 q2_0}
      for t in $types; do
        f=$(synth qwen3-8b "$t")
        echo "== qwen3-8b $t"
        "$kiln" bench -m "$f" -p 512 -n 128 -r "${REPS:-3}" --device cuda 2>/dev/null | grep -E "ceiling|pp512|tg128"
      done 2>&1 | tee "$out/lowbit.log"
      "$kiln" bench-kernels --sections matvec --formats "$(echo $types q4_0 | tr ' ' ',')" --device cuda 2>/dev/null \
        | tee "$out/lowbit-kernels.log" | grep -E "^mat-vec|chained" | tee -a "$out/lowbit.log" ;;
    synth)
      for spec in $files; do
        synth "${spec%%:*}" "${spec##*:}"
      done ;;
    kernels-vs)
      for b in "$kiln" "$OLD" "$kiln" "$OLD"; do
        echo "== $b"
        "$b" bench-kernels --sections "${SECTIONS:-delta-net}" --reps "${REPS:-20}" --device cuda 2>/dev/null
      done 2>&1 | tee "$out/kernels-vs.log" ;;
    switch)
      for spec in $files; do
        f=$(synth "${spec%%:*}" "${spec##*:}")
        for value in 1 0 1 0; do
          echo "== $spec $SWITCH=$value"
          env $(for v in $SWITCH; do printf '%s=%s ' "$v" "$value"; done) "$kiln" bench -m "$f" -p 0 -n 128 -r "${REPS:-3}" --device cuda 2>/dev/null | grep -E "ceiling|tg128"
        done
      done 2>&1 | tee "$out/switch.log" ;;
    fusions)
      for t in fused_matvec sibling_matvec router_matvec moe_epilogue manifest; do
        KILN_REQUIRE_GPU=1 .device/tests/$t-* --include-ignored 2>&1 \
          | grep -E "^test .*(FAILED|ok)$|test result|panicked|left|right" | grep -v " ok$"
      done 2>&1 | tee "$out/fusions.log" ;;
    same)
      for spec in $files; do
        f=$(synth "${spec%%:*}" "${spec##*:}")
        for value in 0 1; do
          env $(for v in $SWITCH; do printf '%s=%s ' "$v" "$value"; done) "$kiln" generate -m "$f" \
            -p "Once upon a time" -n 64 --temp 0 --ignore-eos --device cuda 2>/dev/null \
            > "$out/same-${spec/:/-}-$value.txt"
        done
        if [ ! -s "$out/same-${spec/:/-}-1.txt" ]; then
          echo "== $spec: NO TEXT with $SWITCH at 1"
        elif cmp -s "$out/same-${spec/:/-}-0.txt" "$out/same-${spec/:/-}-1.txt"; then
          echo "== $spec: the same text with $SWITCH at 0 and 1 ($(wc -c < "$out/same-${spec/:/-}-1.txt") bytes)"
        else
          echo "== $spec: DIFFERENT texts with $SWITCH at 0 and 1"
        fi
      done 2>&1 | tee "$out/same.log" ;;
    memcheck)
      # Each GPU test executable under compute-sanitizer, JOBS (default 8) at a time,
      # each bounded by MEMCHECK_TIMEOUT seconds; prints each one's error summary.
      mkdir -p target/release target/tmp "$out/memcheck" && ln -sf "$PWD/$kiln" target/release/kiln
      ls ${MEMCHECK:-.device/tests/*} | xargs -P "${JOBS:-8}" -I{} sh -c \
        'KILN_REQUIRE_GPU=1 timeout "${MEMCHECK_TIMEOUT:-400}" compute-sanitizer --tool memcheck --target-processes application-only --error-exitcode 99 \
           "$1" --include-ignored > "$2/$(basename "$1").log" 2>&1; echo "$(basename "$1") rc=$? $(grep -h "ERROR SUMMARY" "$2/$(basename "$1").log" | tail -1) $(grep -h "^test result" "$2/$(basename "$1").log" | tail -1)"' \
        _ {} "$out/memcheck" | sort | tee "$out/memcheck.log" ;;
    *) echo "unknown: $what"; exit 2 ;;
  esac
done
