"""The PyTorch side of benches/gpu/train.sh: training steps of a random-init
Llama-shaped model with transformers (+ peft for LoRA), on CUDA, bf16, sdpa.

    python torch_train.py --config smollm2-135m|llama-1b --method lora|full \
        [--batch 8] [--seq 1024] [--steps 10] [--warmup 2] [--ckpt] [--compile]

The same step as pipe's (stages/examples/train_bench.rs): forward, loss over
every token, backward, clip to norm 1.0, AdamW (lr 1e-4), zero grad. The
model is loaded in bf16 (as TRL does with torch_dtype=bfloat16); LoRA r 16,
alpha 16 on every linear but lm_head (PEFT's all-linear), PEFT's defaults
(adapters kept in f32). Random token ids, one causal sequence per row.
Prints one JSON line: tokens/s (median step), peak
torch.cuda.max_memory_allocated (MiB), first and last losses.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                     tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = LlamaConfig(**CONFIGS[a.config])
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=torch.bfloat16)
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 bias="none", task_type="CAUSAL_LM"))
        if a.ckpt:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fwd = torch.compile(model) if a.compile else model
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fwd(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(out.loss.detach()))
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "torch-compile" if a.compile else "torch", "config": a.config, "method": a.method, "dtype": "bf16",
        "batch": a.batch, "seq": a.seq, "docs": 1, "ckpt": a.ckpt, "trainable": sum(p.numel() for p in params),
        "tokens_per_s": a.batch * a.seq / med, "step_s": med,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
