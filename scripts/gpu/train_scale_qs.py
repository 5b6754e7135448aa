"""One line of scripts/gpu/train_scale.sh's report: the quickstart's math
training (a train stage's output folder) on N GPUs.

    python3 train_scale_qs.py SFT_DIR N
"""

import json
import sys

d, n = sys.argv[1], sys.argv[2]
t = json.load(open(f"{d}/train.json"))
print(
    f"quickstart math training, seed size, {n} GPU(s): {t['steps']} steps, {t['tokens']:,} tokens, "
    f"{t['seconds']:.0f} s ({t['tokens_per_s']:,.0f} tok/s), final loss {t['final_loss']:.3f}, "
    f"peak MiB per GPU {t.get('peak_gpu_mib_per_device')}"
)
