"""Converts the SmolLM2-135M-Instruct GGUF (scripts/fetch-model.sh) into a Hugging Face checkpoint
vLLM can load (vLLM 0.32 no longer loads GGUF). Usage: python convert-smollm2.py GGUF_DIR OUT_DIR.
Needs transformers with gguf and accelerate (scripts/install-vllm.sh installs them)."""

import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1], sys.argv[2]
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
if os.path.exists(os.path.join(out, "config.json")):
    sys.exit(0)
tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
# What makes save_pretrained work on a dequantised GGUF (FIELD-NOTES).
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
os.makedirs(out, exist_ok=True)
model.save_pretrained(out)
tok.save_pretrained(out)
print("converted to", out)
