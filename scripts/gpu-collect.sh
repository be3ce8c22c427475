#!/usr/bin/env bash
# Run HERE (the build machine), from anywhere in the repo, after
#   cargo test --release --no-run && cargo build --release -p kvtier-bench
# Copies the GPU test binaries, the bench binary and the IPC probe (with tests/gpu/ipc_engine.py), stripped, into .gpu-carry/ for
# scripts/gpu-device.sh on the GPU machine. Test binaries are found from cargo's JSON messages
# (the executables of the named test targets), never by guessing hashed file names.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
rm -rf "$carry"
mkdir -p "$carry/tests"

# Test targets that exercise the GPU: kvtier-offload's unit tests (slot book, CRC, budgets),
# its `gpu` integration test (conformance on the device, corruption, pinned arenas, gather),
# and kvtier's `http` test (stats with the gpus list).
cargo test --release --no-run --message-format=json -p kvtier-offload -p kvtier 2>/dev/null |
  python3 -c '
import json, sys
want = {("kvtier-offload", "lib"), ("kvtier-offload", "gpu"), ("kvtier", "http")}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    # Local package ids read "path+file:///...#name@version".
    pkg = m["package_id"].split("#")[-1].split("@")[0]
    t = m["target"]
    if "lib" in t["kind"]:
        kind = "lib"
    elif "test" in t["kind"]:
        kind = t["name"]
    else:
        continue
    if (pkg, kind) in want:
        print(pkg + "-" + kind, m["executable"])
' | while read -r name exe; do
    cp "$exe" "$carry/tests/$name"
    echo "test binary $name <- $exe"
  done

bench=$(cargo build --release -p kvtier-bench --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kvtier-bench" and m.get("executable"):
        print(m["executable"])
')
[ -n "$bench" ] || { echo "error: kvtier-bench executable not found in cargo output" >&2; exit 1; }
cp "$bench" "$carry/kvtier-bench"
# The CUDA IPC test engine and the helper that maps its buffer.
probe=$(cargo build --release -p kvtier-tests --bin kvtier_ipc_probe --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kvtier_ipc_probe" and m.get("executable"):
        print(m["executable"])
')
[ -n "$probe" ] || { echo "error: kvtier_ipc_probe executable not found in cargo output" >&2; exit 1; }
cp "$probe" "$carry/kvtier_ipc_probe"
cp tests/gpu/ipc_engine.py "$carry/"

n=$(ls "$carry/tests" | wc -l)
[ "$n" -eq 3 ] || { echo "error: expected 3 test binaries, found $n" >&2; exit 1; }
strip "$carry"/tests/* "$carry/kvtier-bench" "$carry/kvtier_ipc_probe"
du -sh "$carry"
total=$(du -sb "$carry" | cut -f1)
[ "$total" -lt $((60 << 20)) ] || { echo "error: $carry is $total bytes, over 60 MiB" >&2; exit 1; }
