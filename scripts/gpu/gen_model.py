"""Random-init model of a given config.json, saved as an HF folder (safetensors, f32)."""
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig.from_json_file(f"{src}/config.json")
model = LlamaForCausalLM(cfg).to(torch.float32)
model.save_pretrained(dst, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(f"{src}/{f}", f"{dst}/{f}")
print("model:", sum(p.numel() for p in model.parameters()), "parameters")
