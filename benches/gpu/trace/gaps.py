"""GPU idle time per training step from a trace of benches/gpu/trace.sh
(trace.c's tsv): steps end at the optimizer's kernel (multi_adamw); for
each, the span from the kernel after the previous step's update to this
update's start, the time some kernel, copy or memset ran, the idle rest by
gap size, and for the last step the largest gaps with the operations
around them (with a trace of TRACE_API=1, also the driver calls the host
made during each: their count and time by name).

    python3 gaps.py trace.tsv
"""
import sys, collections
rows, api = [], []
for l in open(sys.argv[1]):
    p = l.rstrip("\n").split("\t")
    if len(p) == 4 and p[0] in "KCS" and p[1] != "0":
        rows.append((int(p[1]), int(p[2]), p[3]))
    elif len(p) == 4 and p[0] == "A":
        api.append((int(p[1]), int(p[2]), p[3]))
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
            gaps.append((s - end, prev, n, s))
        busy += max(0, e - max(s, end))
        end = max(end, e)
        prev = n
    hist = collections.Counter()
    for g, _, _, _ in gaps:
        k = "<2us" if g < 2000 else "<10us" if g < 10000 else "<100us" if g < 100000 else ">=100us"
        hist[k] += g
    print(f"step {si}: {len(sel)} ops span {span/1e6:.2f} ms busy {busy/1e6:.2f} idle {(span-busy)/1e6:.2f} ms; gaps by size (ms): " + ", ".join(f"{k} {v/1e6:.2f}" for k, v in sorted(hist.items())))
    if si == len(ends) - 1:
        for g, p, n, at in sorted(gaps, key=lambda x: -x[0])[:20]:
            print(f"  gap {g/1e3:8.1f} us after {short(p)!r} before {short(n)!r}")
            if api and g >= 20000:
                calls = collections.defaultdict(lambda: [0, 0])
                for s, e, name in api:
                    if at - g <= s < at:
                        calls[name][0] += 1
                        calls[name][1] += e - s
                for name, (c, t) in sorted(calls.items(), key=lambda x: -x[1][1])[:6]:
                    print(f"      {name}: {c} calls, {t/1e3:.1f} us")
