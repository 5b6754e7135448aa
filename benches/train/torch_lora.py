"""The PyTorch side of benches/train_cpu.sh: LoRA training steps on CPU.

    python torch_lora.py --model DIR --pack FILE --result OUT.json \
        --batch 1 --steps 5 --warmup 1 --r 16 --alpha 16 --dropout 0.05 --lr 2e-4

`transformers` + `peft`, f32, the model folder pipe's `model` stage wrote,
LoRA on every linear but lm_head (PEFT's all-linear: q/k/v/o/gate/up/down),
the same packed rows pipe trains on (its `pack` Parquet, read with pyarrow;
rows shorter than the longest are skipped, so every step sees batch x seq
tokens), labels as pipe has them (-100 = no loss; transformers shifts them).
A manual loop: forward, loss, backward, clip to max norm 1.0, AdamW step,
zero grad, as pipe's train stage does. `--warmup` steps are run but not timed;
tokens/s = batch x seq / wall time of a step (median and all of them go to
--result, with each step's CPU time). Attention: `--attn sdpa` (default: PyTorch's fused CPU kernel) or
`eager`.
"""

import argparse
import json
import statistics
import time

import pyarrow.parquet as pq
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    t = pq.read_table(a.pack, columns=["input_ids", "labels", "position_ids"]).to_pylist()
    seq = max(len(r["input_ids"]) for r in t)
    rows = [r for r in t if len(r["input_ids"]) == seq]
    need = a.batch * (a.warmup + a.steps)
    if len(rows) < need:
        raise SystemExit(f"{a.pack}: {len(rows)} full rows of {seq} tokens, need {need}")

    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation=a.attn)
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=TARGETS,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    times, cpu, losses = [], [], []
    for step in range(a.warmup + a.steps):
        batch = rows[step * a.batch:(step + 1) * a.batch]
        t0, c0 = time.perf_counter(), time.process_time()
        ids = torch.tensor([r["input_ids"] for r in batch])
        labels = torch.tensor([r["labels"] for r in batch])
        pos = torch.tensor([r["position_ids"] for r in batch])
        out = model(input_ids=ids, labels=labels, position_ids=pos)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(out.loss.detach()))
        if step >= a.warmup:
            times.append(dt)
            cpu.append(dc)
        print(f"step {step + 1}: {dt:.2f} s (CPU {dc:.2f} s), loss {losses[-1]:.4f}"
              f"{' (warmup)' if step < a.warmup else ''}", flush=True)
    tokens = a.batch * seq
    tps = [tokens / x for x in times]
    res = {
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "threads": torch.get_num_threads(), "attn": a.attn,
        "seq": seq, "batch": a.batch, "tokens_per_step": tokens, "trainable_parameters": n_trainable,
        "step_s": times, "step_cpu_s": cpu, "tokens_per_s": tps, "median_tokens_per_s": statistics.median(tps), "losses": losses,
    }
    with open(a.result, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
