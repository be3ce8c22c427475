#!/usr/bin/env bash
# Run ON the GPU machine from the repo root, with the binaries of scripts/gpu-collect.sh in
# .gpu-carry/. Runs the GPU test binaries with KVTIER_REQUIRE_GPU=1 (a missing GPU, driver or
# nvrtc fails them instead of skipping), then `kvtier-bench gpu` (full), then the IPC engine
# script if present. Logs go to $OUT (default ./gpu-out). Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
export KVTIER_REQUIRE_GPU=1
# Never touch NVLink multicast on shared hosts (the machine's own rule).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# cudarc looks for libnvrtc.so or libnvrtc.so.12/.11/...; CUDA 13 ships libnvrtc.so.13, so a
# folder with an unversioned link is put first on the library path (plus the real folder, for
# libnvrtc-builtins).
nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda*/lib64/libnvrtc.so.* \
  /usr/lib/x86_64-linux-gnu/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -n1 || true)
if [ -z "$nvrtc" ]; then
  nvrtc=$(python3 -c 'import glob, os, site
for d in site.getsitepackages():
    for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so.*"))):
        if "builtins" not in f:
            print(f); raise SystemExit' 2>/dev/null || true)
fi
if [ -n "$nvrtc" ]; then
  links=$(mktemp -d)
  ln -s "$nvrtc" "$links/libnvrtc.so"
  export LD_LIBRARY_PATH="$links:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "nvrtc: $nvrtc" | tee "$out/env.log"
else
  echo "nvrtc: not found (gather tests and bench rows will fail)" | tee "$out/env.log"
fi
nvidia-smi >>"$out/env.log" 2>&1 || true

status=0
for t in "$carry"/tests/*; do
  name=$(basename "$t")
  echo "== $name"
  "$t" --test-threads=1 2>&1 | tee "$out/test-$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc" | tee -a "$out/summary.log"
  [ "$rc" -eq 0 ] || status=1
done

echo "== kvtier-bench gpu"
"$carry/kvtier-bench" gpu 2>&1 | tee "$out/bench-gpu.log"
rc=${PIPESTATUS[0]}
echo "== kvtier-bench gpu rc=$rc" | tee -a "$out/summary.log"
[ "$rc" -eq 0 ] || status=1

if [ -f "$carry/ipc_engine.py" ]; then
  echo "== ipc_engine.py"
  KVTIER_IPC_PROBE="$PWD/$carry/kvtier_ipc_probe" python3 "$carry/ipc_engine.py" 2>&1 | tee "$out/ipc-engine.log"
  rc=${PIPESTATUS[0]}
  echo "== ipc_engine.py rc=$rc" | tee -a "$out/summary.log"
  [ "$rc" -eq 0 ] || status=1
else
  echo "== ipc_engine.py: not in $carry (run scripts/gpu-collect.sh)" | tee -a "$out/summary.log"
  status=1
fi
exit $status
