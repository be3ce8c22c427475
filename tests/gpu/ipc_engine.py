#!/usr/bin/env python3
"""Test engine for kvtier's CUDA IPC path (run on a GPU machine by scripts/gpu-device.sh).

Allocates a paged KV buffer shaped like vLLM's (layers x {K,V} x blocks x 16 tokens x 8 heads
x 128 dims, bf16), fills it with random values, exports it by CUDA IPC (PyTorch's
storage._share_cuda_()), and runs kvtier_ipc_probe, which maps it, saves 8 pages of every plane
into a kvtier host tier with one gather launch, and after this script has overwritten both the
saved pages and the restore targets ("evicted"), restores them into 8 fresh pages with one
scatter launch. Checks the restored pages bit-exact against a copy taken before the save, and
that no other page changed. Exit 0 on success.
"""
import os
import subprocess
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")

import torch  # noqa: E402

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 4, 64, 16, 8, 128
PAGE_ELEMS = BLOCK * HEADS * DIM
PAGE_BYTES = PAGE_ELEMS * 2
SAVE = [3, 17, 5, 40, 41, 42, 9, 63]
RESTORE = [0, 1, 2, 20, 21, 30, 50, 60]


def main() -> int:
    probe = os.environ.get("KVTIER_IPC_PROBE") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "kvtier_ipc_probe")
    torch.manual_seed(0)
    kv = torch.randn(LAYERS * 2, BLOCKS, PAGE_ELEMS, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    before = kv.clone()
    storage = kv.untyped_storage()
    share = storage._share_cuda_()
    handle, offset = share[1], share[3]
    # PyTorch 2.x prefixes the 64-byte cudaIpcMemHandle_t with a format version byte and a kind
    # byte ('c': a plain cudaMalloc block; 'e': an expandable segment, which has no such handle).
    if len(handle) == 66 and handle[1:2] == b"c":
        handle = handle[2:]
    elif len(handle) == 65 and handle[:1] == b"c":
        handle = handle[1:]
    if len(handle) != 64:
        print(f"unexpected IPC handle of {len(share[1])} bytes, prefix {share[1][:2]!r}",
              file=sys.stderr)
        return 1
    offset += kv.storage_offset() * kv.element_size()
    args = [probe, handle.hex(), str(offset), str(LAYERS * 2), str(BLOCKS), str(PAGE_BYTES),
            ",".join(map(str, SAVE)), ",".join(map(str, RESTORE))]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("saved"):
        print("probe did not save:", line, file=sys.stderr)
        return 1
    # Evict: the engine reuses the saved pages and scribbles over the restore targets.
    kv[:, SAVE] = 0
    kv[:, RESTORE] = 7
    torch.cuda.synchronize()
    p.stdin.write("restore\n")
    p.stdin.flush()
    line = p.stdout.readline().strip()
    rc = p.wait()
    if line != "restored" or rc != 0:
        print("probe did not restore:", line, "rc", rc, file=sys.stderr)
        return 1
    torch.cuda.synchronize()
    ok = torch.equal(kv[:, RESTORE].view(torch.int16), before[:, SAVE].view(torch.int16))
    others = [b for b in range(BLOCKS) if b not in SAVE and b not in RESTORE]
    untouched = torch.equal(kv[:, others].view(torch.int16), before[:, others].view(torch.int16))
    print(f"ipc engine: {len(SAVE)} pages x {LAYERS * 2} planes of {PAGE_BYTES} bytes saved and "
          f"restored by IPC: bit-exact {ok}, other pages untouched {untouched}")
    return 0 if ok and untouched else 1


if __name__ == "__main__":
    sys.exit(main())
