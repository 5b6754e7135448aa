"""Baseline for benches/serve.sh: transformers `model.generate` on the CPU.

    python hf_generate.py --model DIR [--max-new-tokens 64] [--batches 1,8,32,64] [--prompts 64]

Loads the HF folder in f32, builds chat prompts from benches/serve/prompts.py
with the folder's chat template (add_generation_prompt), left-padded, and for
each batch size B runs ONE greedy `generate` over prompts 0..B-1 with
max_new_tokens = min_new_tokens = M (EOS suppressed until M, so every
sequence generates exactly M tokens). After one untimed warmup call, prints a
JSON line per batch size:
  wall_s       the whole generate call (prefill + M decode steps)
  prefill_s    start -> first token chosen (the prompt forward pass)
  decode_tok_s per-sequence decode rate, (M - 1) / (last token - first token),
               the same definition load.py uses on a streamed request
  total_tok_s  B * M / wall_s (all generated tokens, prefill included)
  others_cpus  CPUs kept busy by other processes meanwhile (/proc/stat minus
               this process): > ~0.2 means the figure is disturbed
Times come from a logits processor that stamps each decode step.
"""

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompts import messages  # noqa: E402


def busy_s():
    """CPU seconds the whole machine spent busy (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def own_s():
    t = os.times()
    return t.user + t.system


class Stamps(LogitsProcessor):
    """Records the time each step's logits arrive (step 0 = after prefill)."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompts", type=int, default=64, help="distinct prompts (cycled over the question list)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    m = a.max_new_tokens
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype),
                                                 attn_implementation=a.attn).to(a.device).eval()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    texts = [tok.apply_chat_template(messages(i), tokenize=False,
                                     add_generation_prompt=True) for i in range(a.prompts)]

    def run(b, new):
        enc = tok([texts[i % len(texts)] for i in range(b)], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(a.device)
        sync()
        st = Stamps()
        b0, o0 = busy_s(), own_s()
        t0 = time.perf_counter()
        with torch.inference_mode():
            # input_ids + attention_mask only: a tokenizer_config without model_input_names
            # also returns token_type_ids, which generate() rejects
            out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id,
                                 logits_processor=LogitsProcessorList([st]))
        sync()
        wall = time.perf_counter() - t0
        others = None if b0 is None else round(max(0.0, (busy_s() - b0 - own_s() + o0) / wall), 2)
        gen = out.shape[1] - enc["input_ids"].shape[1]
        assert gen == new, f"generated {gen} tokens, wanted {new}"
        return enc, st.t, t0, wall, others

    print(json.dumps({"bench": "hf_generate", "event": "setup", "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__, "threads": a.threads,
                      "attn": a.attn, "max_new_tokens": m, "device": a.device, "dtype": a.dtype}), flush=True)
    run(1, min(m, 8))  # warmup
    for b in [int(x) for x in a.batches.split(",")]:
        enc, t, t0, wall, others = run(b, m)
        lens = enc["attention_mask"].sum(1)
        print(json.dumps({
            "bench": "hf_generate", "batch": b, "new_tokens": m,
            "prompt_tokens_mean": round(lens.float().mean().item(), 1), "padded_len": enc["input_ids"].shape[1],
            "wall_s": round(wall, 3), "prefill_s": round(t[0] - t0, 4),
            "decode_tok_s": round((m - 1) / (t[-1] - t[0]), 2) if m > 1 else None,
            "total_tok_s": round(b * m / wall, 2), "others_cpus": others,
        }), flush=True)


if __name__ == "__main__":
    main()
