"""Where a decode step's time goes, from a trace of decode_bench
(benches/gpu/trace/trace.c's tsv; CUDA_INJECTION64_PATH=libtrace.so
TRACE_OUT=t.tsv ./decode_bench --batches 1 --steps 16). Steps start at
dec_embed (or the upload of their inputs just before it, a host-to-device
copy); copies and memsets count as kernels. For each
kernel kind over the last steps: launches a step, the
mean time from the previous kernel's end to this one's end (what the kind
adds to the step), its own start-to-end time, and how long before the
previous kernel's end it started (programmatic dependent launch).

    python3 decode_steps.py t.tsv [steps]
"""
import sys, collections

rows = []
for l in open(sys.argv[1]):
    p = l.rstrip("\n").split("\t")
    if len(p) == 4 and p[0] in "KCS":
        rows.append((int(p[1]), int(p[2]), p[3]))
rows.sort()
# (A step's input upload, where it has one, just before its embedding.)
starts = [i for i, r in enumerate(rows) if r[2].startswith("dec_embed")]
starts = [i - 1 if i and rows[i - 1][2].startswith("memcpy1_") else i for i in starts]
last = int(sys.argv[2]) if len(sys.argv) > 2 else 8
starts = starts[-(last + 1):]
adds, own, early, count = (collections.defaultdict(float) for _ in range(4))
spans = []
for a, b in zip(starts, starts[1:]):
    sel = rows[a:b]
    spans.append(sel[-1][1] - sel[0][0])
    prev_end = sel[0][0]
    for s, e, n in sel:
        k = n if n.startswith(("memcpy", "memset")) else n.split("(")[0]
        adds[k] += e - prev_end
        own[k] += e - s
        early[k] += prev_end - s
        count[k] += 1
        prev_end = e
n = len(spans)
# The GPU idle between steps: the last item of one step to the next
# step's first (the host reads the argmax, fills the next inputs and
# launches the graph).
gaps = [rows[b][0] - rows[b - 1][1] for b in starts[1:]]
print(f"steps {n}: span mean {sum(spans) / max(n, 1) / 1e3:.1f} us (first to last item's end), "
      f"idle between steps mean {sum(gaps) / max(len(gaps), 1) / 1e3:.1f} us")
print(f"{'kernel':24} {'a step':>6} {'adds us':>8} {'own us':>8} {'early us':>9}")
for k in sorted(adds, key=lambda k: -adds[k]):
    c = count[k]
    print(f"{k:24} {c / n:6.0f} {adds[k] / n / 1e3:8.1f} {own[k] / c / 1e3:8.2f} {early[k] / c / 1e3:9.2f}")
