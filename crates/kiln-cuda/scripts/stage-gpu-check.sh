#!/usr/bin/env bash
# Builds, here, what gpu-check.sh runs on the GPU machine: the release `kiln` binary
# and the test executables of kiln-cuda and kiln-cli, staged in .device/ (ignored by
# git). Smaller than the whole workspace's tests, so that it travels with the tree
# under the device tool's 64 MiB. Then call the device tool's run with
# carry [".device"] and the command `bash .device/gpu-check.sh`.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/bin .device/tests
cargo build --release -p kiln-cli
cargo test --release -p kiln-cuda -p kiln-cli --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])
' | grep -vE '/(convert_cli|gguf_commands)-' | while read -r exe; do cp "$exe" .device/tests/; done
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/kiln" .device/bin/
strip .device/tests/* .device/bin/*
cp crates/kiln-cuda/scripts/gpu-check.sh .device/
du -sh .device | awk '{print "staged " $1 " in .device/"}'
