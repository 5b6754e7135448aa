"""GPU idle time per training step from a trace of benches/gpu/trace.sh
(trace.c's tsv): steps end at the optimizer's kernel (multi_adamw); for
each, the span from the kernel after the previous step's update to this
update's start, the time some kernel, copy or memset ran, the idle rest by
gap size, and for the last step the largest gaps with the operations
around them.

    python3 gaps.py trace.tsv
"""
import sys, collections
rows = []
for l in open(sys.argv[1]):
    p = l.rstrip("\n").split("\t")
    if len(p) == 4 and p[0] in "KCS" and p[1] != "0":
        rows.append((int(p[1]), int(p[2]), p[3]))
    elif p[0] == "D":
        print("DROPPED", p[3])
rows.sort()
print("events", len(rows))
ends = [i for i, r in enumerate(rows) if "multi_adamw" in r[2]]
print("steps (adamw launches)", len(ends))
def short(n):
    return n.split("(")[0].split("<")[0][:50]
for si in range(1, len(ends)):
    a, b = ends[si - 1] + 1, ends[si] + 1
    sel = rows[a:b]
    span = sel[-1][1] - sel[0][0]
    busy, end, gaps, prev = 0, sel[0][0], [], "start"
    for s, e, n in sel:
        if s > end:
            gaps.append((s - end, prev, n))
        busy += max(0, e - max(s, end))
        end = max(end, e)
        prev = n
    hist = collections.Counter()
    for g, _, _ in gaps:
        k = "<2us" if g < 2000 else "<10us" if g < 10000 else "<100us" if g < 100000 else ">=100us"
        hist[k] += g
    print(f"step {si}: {len(sel)} ops span {span/1e6:.2f} ms busy {busy/1e6:.2f} idle {(span-busy)/1e6:.2f} ms; gaps by size (ms): " + ", ".join(f"{k} {v/1e6:.2f}" for k, v in sorted(hist.items())))
    if si == len(ends) - 1:
        for g, p, n in sorted(gaps, key=lambda x: -x[0])[:20]:
            print(f"  gap {g/1e3:8.1f} us after {short(p)!r} before {short(n)!r}")
