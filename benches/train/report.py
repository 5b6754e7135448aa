"""Print benches/train_cpu.sh's results from its times folder.

    python3 report.py TIMES_DIR > results.txt

Reads TIMES_DIR/meta.json (written by train_cpu.sh: settings, load, and per
side the GNU time figures: wall s, peak RSS KiB, CPU s, CPUs kept busy by other
processes), pipe-metrics.jsonl (the train stage's metrics) and torch.json
(torch_lora.py). Standard library only.
"""

import json
import os
import platform
import statistics
import sys

T = sys.argv[1]
with open(os.path.join(T, "meta.json")) as f:
    meta = json.load(f)
with open(os.path.join(T, "pipe-metrics.jsonl")) as f:
    pm = [json.loads(line) for line in f if line.strip()]
with open(os.path.join(T, "torch.json")) as f:
    tj = json.load(f)
ptps = [m["tokens_per_s"] for m in pm[1:]]
p, y = statistics.median(ptps), tj["median_tokens_per_s"]
pw, yw = meta["pipe"], meta["torch"]
steps = len(pm)


def mib(kb):
    return f"{kb / 1024:,.0f} MiB"


print(f"train_cpu benchmark: LoRA step on SmolLM2-135M-Instruct (f32), rows of {meta['seq']} tokens")
print(f"command:  {meta['command']}")
print(f"pipe:     {meta['pipe_version']} ({meta['pipe_src']})")
print(f"torch:    torch {tj['torch']}, transformers {tj['transformers']}, peft {tj['peft']}, "
      f"{tj['threads']} threads, {tj['attn']} attention")
print(f"machine:  {os.cpu_count()} CPUs ({platform.machine()}); 1/5/15-min load at start {meta['load_start']}, "
      f"at end {meta['load_end']}")
print(f"config:   lora r {meta['r']} alpha {meta['alpha']:g} dropout {meta['dropout']:g} all-linear, "
      f"AdamW lr {meta['lr']:g}, clip 1.0, batch {meta['batch']} x {meta['seq']} tokens, "
      f"{tj['trainable_parameters']:,} trainable params")
print()
print(f"pipe  tokens/s  {p:8.1f}   median of steps 2..{steps}: {', '.join(f'{x:.1f}' for x in ptps)}")
print(f"torch tokens/s  {y:8.1f}   median of {len(tj['tokens_per_s'])} steps after 1 warmup: "
      f"{', '.join(f'{x:.1f}' for x in tj['tokens_per_s'])}")
print(f"ratio pipe/torch  {p / y:.2f}x")
if tj.get("step_cpu_s"):
    tc = statistics.median(tj["step_cpu_s"])
    print(f"CPU seconds per step: torch {tc:.1f} (median, measured per step); pipe <= {pw['cpu'] / steps:.1f} "
          f"(the train run's CPU / {steps} steps, model load included)")
print()
print(f"peak RSS  pipe (the train stage's `pipe run`) {mib(pw['rss_kb'])};  torch (whole process) {mib(yw['rss_kb'])}")
print(f"runs      pipe:  wall {pw['wall']:.1f} s, CPU {pw['cpu']:.1f} s, 1-min load before {meta['load_pipe']}, "
      f"other processes busy {pw['others']:.2f} CPUs")
print(f"          torch: wall {yw['wall']:.1f} s, CPU {yw['cpu']:.1f} s, 1-min load before {meta['load_torch']}, "
      f"other processes busy {yw['others']:.2f} CPUs")
print("loss      pipe  " + ", ".join(f"{m['loss']:.3f}" for m in pm))
print("          torch " + ", ".join(f"{x:.3f}" for x in tj["losses"]))
