"""Runs prompts through a real vLLM engine (CPU build) once, optionally with kvtier's connector,
and prints one JSON line per prompt: generated token ids and text, prompt length, the tokens
vLLM reports as cached (``num_cached_tokens``: with vLLM's own prefix cache off, those came
from kvtier), and the wall time of the call (with max_tokens 1: the time to first token).

Usage: python driver.py CONFIG_JSON   (model, prompts, max_tokens: one or per prompt,
settle_s: pause between prompts, kvtier: extra config or null,
pause_after: print PAUSED before that prompt and wait for a line on stdin)
"""

import json
import sys
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if cfg.get("kvtier") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=cfg["kvtier"],
        )
    llm = LLM(
        model=cfg["model"],
        enforce_eager=True,
        # fp32 (the checkpoint's dtype; vLLM's CPU default would be bf16), so that a prompt whose
        # prefix KV is loaded and one computed whole differ only by fp32 rounding.
        dtype=cfg.get("dtype", "float32"),
        max_model_len=4096,
        max_num_batched_tokens=4096,
        enable_prefix_caching=False,
        seed=0,
        **kw,
    )
    max_tokens = cfg.get("max_tokens", 16)
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(cfg["prompts"])
    pause = cfg.get("pause_after")
    for i, p in enumerate(cfg["prompts"]):
        if pause is not None and i == pause:
            # The test stops kvtier here, then answers on stdin.
            print("PAUSED", flush=True)
            sys.stdin.readline()
        # One prompt at a time: what the second one finds is what the first one stored.
        if i > 0 and cfg.get("settle_s"):
            time.sleep(cfg["settle_s"])  # lets the connector's background puts finish
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens[i])
        t0 = time.perf_counter()
        out = llm.generate([p], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - t0
        print("RESULT " + json.dumps({
            "prompt_tokens": len(out.prompt_token_ids),
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
            "num_cached_tokens": out.num_cached_tokens,
            "elapsed_s": elapsed,
        }), flush=True)


if __name__ == "__main__":
    main()
