"""End to end with a real vLLM engine (CPU build, SmolLM2-135M-Instruct as a Hugging Face
checkpoint) and kvtier's connector, each engine in its own process (tests/vllm/driver.py):

- a prompt with a 2,000-token prefix run by one vLLM process is stored in kvtier; a second
  process finds the prefix (vLLM reports the tokens as cached; its own prefix cache is off)
  for the same prompt and for one sharing only the prefix, and the Rust CLI finds it too;
- every greedy output equals a run without kvtier;
- kvtier stopped between requests: vLLM recomputes, answers identically, and the connector
  logs the outage once.

Needs $KVTIER_VLLM_MODEL (the checkpoint; scripts/test-vllm.sh makes it) and vllm importable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
import kvtier  # noqa: E402

MODEL = os.environ.get("KVTIER_VLLM_MODEL", "")
DRIVER = Path(__file__).with_name("driver.py")
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def layout_in(log: str) -> kvtier.Layout:
    """The layout the connector announced: vLLM's cache (30 layers, 3 KV heads, head size 64) in
    the dtype vLLM chose for the CPU (bf16 for this fp32 checkpoint)."""
    m = re.search(r'kvtier connector \(WORKER\): Layout\("([^"]+)", num_layers=(\d+), '
                  r'kv_heads=(\d+), head_dim=(\d+), dtype="([^"]+)"\), fingerprint (0x[0-9a-f]+)',
                  log)
    assert m, "the connector did not announce its layout"
    layout = kvtier.Layout(m[1], int(m[2]), int(m[3]), int(m[4]), m[5])
    assert (layout.model_id, layout.num_layers, layout.kv_heads, layout.head_dim) == (
        MODEL_ID, 30, 3, 64)
    assert layout.fingerprint == int(m[6], 16)
    return layout

PREFIX = " ".join(
    f"Section {i}: the archive lists item {i * 7 % 101} beside record {i * 13 % 97}, "
    f"filed under topic {i % 17}." for i in range(90)
)
PROMPT_A = PREFIX + "\nQuestion: which topic is section 5 filed under? Answer:"
PROMPT_B = PREFIX + "\nContinue the archive with section 90. Section 90:"

pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason="KVTIER_VLLM_MODEL not set")


def engine(prompts: list[str], address: str | None, pause_after: int | None = None,
           on_pause=None) -> tuple[list[dict], str]:
    cfg = {"model": MODEL, "prompts": prompts, "max_tokens": 16, "pause_after": pause_after,
           "kvtier": None if address is None else {"address": address, "model_id": MODEL_ID}}
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    p = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(cfg)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    results, lines = [], []
    assert p.stdout is not None and p.stdin is not None
    for line in p.stdout:
        lines.append(line)
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
        elif line.startswith("PAUSED"):
            on_pause()
            p.stdin.write("go\n")
            p.stdin.flush()
    assert p.wait(timeout=600) == 0, "".join(lines[-40:])
    return results, "".join(lines)


def test_prefix_shared_across_vllm_processes(server):
    base, _ = engine([PROMPT_A, PROMPT_B], None)
    assert [r["num_cached_tokens"] for r in base] == [0, 0]

    first, log = engine([PROMPT_A], server.address)
    layout = layout_in(log)
    assert first[0]["num_cached_tokens"] == 0
    assert first[0]["token_ids"] == base[0]["token_ids"]
    prompt_tokens = first[0]["prompt_token_ids"]
    assert len(prompt_tokens) >= 1500
    # The stored prefix, as the Rust CLI sees it: every full 128-token chunk but the one
    # holding the last token.
    full = (len(prompt_tokens) - 1) // 128 * 128
    out = json.loads(server.cli(
        "lookup", "--json", "--layout-fingerprint", str(layout.fingerprint),
        "--chunk-tokens", "128", "--tokens", ",".join(map(str, prompt_tokens[:full]))))
    assert out["hit_tokens"] == full

    def stop_kvtier():
        server.stop()

    second, log = engine([PROMPT_A, PROMPT_B, PROMPT_A, PROMPT_B], server.address,
                         pause_after=2, on_pause=stop_kvtier)
    assert second[0]["num_cached_tokens"] == full
    # B shares only the prefix: its hit ends with the last whole chunk the two prompts share.
    common = next(i for i, (a, b) in enumerate(zip(base[0]["prompt_token_ids"],
                                                    base[1]["prompt_token_ids"])) if a != b)
    assert common >= 1500
    assert second[1]["num_cached_tokens"] == common // 128 * 128
    for i, (r, want) in enumerate(zip(second, [base[0], base[1], base[0], base[1]])):
        assert r["token_ids"] == want["token_ids"], (i, r["text"], want["text"])
    # After kvtier stopped: recomputed (nothing cached), same answers, one warning.
    assert [r["num_cached_tokens"] for r in second[2:]] == [0, 0]
    assert log.count("recomputing until it is back") == 1, log[-4000:]
