#!/usr/bin/env bash
# On the GPU machine, from the repository root with .device staged and carried: every
# staged test executable, GPU tests included, up to JOBS (default 6) at a time, each
# into its own log under $OUT/tests/; prints each executable's result line, each
# failed test's panic message, and "N passed, M failed" last. The GPU is shared
# by the running executables: use it for the suite, not for timings.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/kiln-out}/tests
mkdir -p "$out"
bash .device/unpack || exit 1
export KILN_REQUIRE_GPU=1 KILN_CACHE_DIR=${KILN_CACHE_DIR:-$PWD/.device/kcache}
# The CLI tests run target/release/kiln; tests may read files through the checkout's
# path at build time (the first line of .device/run-tests.sh's link).
mkdir -p target/release target/tmp && ln -sf "$PWD/.device/bin/kiln" target/release/kiln
root=$(grep -o 'ln -s "\$PWD" "[^"]*"' .device/run-tests.sh | sed 's/.*"\$PWD" "\(.*\)"/\1/')
if [ -n "$root" ] && [ "$PWD" != "$root" ] && [ ! -e "$root" ]; then
  mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
fi
ls .device/tests/* | xargs -P "${JOBS:-6}" -I{} sh -c \
  '"$1" --include-ignored > "$2/$(basename "$1").log" 2>&1; echo $? > "$2/$(basename "$1").rc"' _ {} "$out"
pass=0; fail=0
for log in "$out"/*.log; do
  name=$(basename "$log" .log)
  grep -E "^test result" "$log" | sed "s|^|$name: |"
  p=$(grep -Eo "[0-9]+ passed" "$log" | awk '{s+=$1} END {print s+0}')
  f=$(grep -Eo "[0-9]+ failed" "$log" | awk '{s+=$1} END {print s+0}')
  if [ "$(cat "$out/$name.rc")" != 0 ]; then
    [ "$f" = 0 ] && f=1
    echo "== $name failed:"; grep -A8 "panicked at" "$log" | head -60
  fi
  pass=$((pass+p)); fail=$((fail+f))
done
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
