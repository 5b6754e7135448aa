"""Table of benches/gpu/train.sh results: one row per run, grouped by case,
with pipe's tokens/s and peak memory against transformers eager and
torch.compile of the same case (and against "pipe-old", an earlier
build run in the same call, when there is one), and model FLOPs utilisation for full
fine-tuning (6 N FLOPs a token plus causal attention, 6 L d_attn T, against
the card's dense bf16 peak: 989 TFLOP/s for H100/H200 SXM).

    python report.py train_bench.jsonl
"""

import json
import sys

SHAPES = {  # (parameters, layers, attention width)
    "smollm2-135m": (134_515_008, 30, 576),
    "llama-1b": (1_235_814_400, 16, 2048),
}
PEAK = 989e12


def main():
    runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
    cases = {}
    for r in runs:
        cases.setdefault((r["config"], r["method"], r["ckpt"], r["batch"], r["seq"]), []).append(r)
    print(f"{'case':42} {'impl':28} {'tok/s':>9} {'peak MiB':>9} {'MFU':>6} {'x torch':>8} {'x compile':>9} {'mem x torch':>11} {'x old':>6}")
    for (cfg, method, ckpt, batch, seq), rs in cases.items():
        base = {r["impl"]: r for r in rs if r["impl"].startswith("torch") or r["impl"] == "pipe-old"}
        name = f"{cfg} {method} {batch}x{seq}{' ckpt' if ckpt else ''}"
        for r in rs:
            impl = r["impl"]
            if impl == "pipe":
                impl += f" docs={r.get('docs', 1)}" + ("" if r.get("fused_attention", True) else " unfused")
                impl += " no-events" if r.get("no_events") else ""
                impl += " no-keep-pool" if r.get("keep_pool") is False else ""
                impl += " no-tc" if r.get("tensor_cores") is False else ""
                impl += f" head={r['head_logits']}" if r.get("head_logits") else ""
                impl += f" bwd={r['attn_bwd']}" if r.get("attn_bwd") else ""
                impl += "".join(f" {s.removeprefix('PIPE_')}" for s in r.get("switches", []))
            tps = r["tokens_per_s"]
            mfu = ""
            if method == "full" and cfg in SHAPES:
                n, layers, width = SHAPES[cfg]
                flops = 6 * n + 6 * layers * width * seq / max(r.get("docs", 1), 1)
                mfu = f"{100 * tps * flops / PEAK:.1f}%"
            ratio = lambda k: f"{tps / base[k]['tokens_per_s']:.2f}" if k in base and r["impl"] == "pipe" else ""
            mem = ""
            if r["impl"] == "pipe" and "torch" in base and r.get("peak_mib") and base["torch"].get("peak_mib"):
                mem = f"{r['peak_mib'] / base['torch']['peak_mib']:.2f}"
            peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"
            row = f"{name:42} {impl:28} {tps:9.0f} {peak:>9} {mfu:>6} {ratio('torch'):>8} {ratio('torch-compile'):>9}"
            print(f"{row} {mem:>11} {ratio('pipe-old'):>6}")


if __name__ == "__main__":
    main()
