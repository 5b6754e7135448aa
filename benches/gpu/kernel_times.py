#!/usr/bin/env python3
"""Sum Nsight Compute's kernel durations by kernel name.

On the GPU machine (ncu is at /usr/local/cuda/bin/ncu there):

    ncu --cache-control none --clock-control none --metrics gpu__time_duration.sum \
        --csv [-k regex:NAME] ./train_bench ... > kernels.csv
    python3 benches/gpu/kernel_times.py kernels.csv [--top 40]

Prints, per kernel name (template arguments cut), the launches, the total
and the mean duration, largest total first, and the sum of all. Kernels
run one at a time under ncu, so the total is the GPU's busy time without
overlap, not a wall time.
"""

import argparse
import collections
import csv
import re
import sys

UNITS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}


def short(name: str) -> str:
    name = re.sub(r"\(.*$", "", name)  # the parameter list
    name = re.sub(r"<.*>", "<..>", name)  # template arguments
    return name.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        # ncu prints its own log lines ("==PROF== ...") before the table.
        lines = [l for l in f if l.startswith('"')]
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(r["Metric Value"].replace(",", "")) * UNITS.get(r["Metric Unit"], float("nan"))
        k = short(r["Kernel Name"])
        total[k] += ms
        count[k] += 1
    if not total:
        print(f"{a.csv}: no gpu__time_duration.sum rows", file=sys.stderr)
        return 1
    all_ms = sum(total.values())
    print(f"{'kernel':70} {'launches':>8} {'total ms':>9} {'mean us':>9} {'share':>6}")
    for k, ms in sorted(total.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{k[:70]:70} {count[k]:8d} {ms:9.3f} {ms / count[k] * 1e3:9.1f} {ms / all_ms:6.1%}")
    print(f"{'all':70} {sum(count.values()):8d} {all_ms:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
