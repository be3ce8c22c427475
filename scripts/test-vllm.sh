#!/usr/bin/env bash
# End-to-end tests of kvtier's vLLM connector with a real vLLM engine (CPU build) and model:
# installs vLLM once into .cache/vllm-venv (scripts/install-vllm.sh), converts the SmolLM2 GGUF
# (scripts/fetch-model.sh) into a Hugging Face checkpoint once (.cache/smollm2-hf), builds and
# installs the kvtier wheel there, and runs api/python/tests/vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${KVTIER_VLLM_VENV:-$ROOT/.cache/vllm-venv}"
export KVTIER_VLLM_VENV="$VENV"
scripts/install-vllm.sh
export KVTIER_MODEL_CACHE="${KVTIER_MODEL_CACHE:-$ROOT/.cache/model}"
scripts/fetch-model.sh "$KVTIER_MODEL_CACHE"
export KVTIER_VLLM_MODEL="${KVTIER_VLLM_MODEL:-$ROOT/.cache/smollm2-hf}"
HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/convert-smollm2.py "$KVTIER_MODEL_CACHE" "$KVTIER_VLLM_MODEL"
if [ -z "${KVTIER_BIN:-}" ]; then
  cargo build --release -q -p kvtier --bin kvtier
  export KVTIER_BIN="$ROOT/target/release/kvtier"
fi
WHEELS="$ROOT/target/wheels-vllm"
rm -f "$WHEELS"/kvtier-*.whl
(cd api/python && "$VENV/bin/maturin" build --release -q -o "$WHEELS" \
  --interpreter "$VENV/bin/python" >/dev/null)
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEELS"/kvtier-*.whl
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider api/python/tests "$@"
