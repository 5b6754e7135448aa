"""Print benches/pack.sh's results table from its times folder.

    python3 report.py TIMES_DIR > results.txt

Reads TIMES_DIR/meta.json (written by pack.sh), pipe-runs.txt (per run: wall
s, peak RSS KiB, CPU s, stage took s, 1-min load, CPUs busy with other
processes), py-runs.txt (wall s, peak RSS KiB, CPU s, load, others), pipe-stats.json (the pack stage's stats.json), py-N.json
(trl_pack.py run), stats.json (trl_pack.py stats) and pipe-messages.txt.
Standard library only.
"""

import datetime
import json
import os
import platform
import statistics
import sys

T = sys.argv[1]


def load(name):
    with open(os.path.join(T, name)) as f:
        return json.load(f)


def rows(name):
    with open(os.path.join(T, name)) as f:
        return [[float(x) for x in l.split()] for l in f if l.strip()]


meta = load("meta.json")
pr = rows("pipe-runs.txt")  # wall maxrss_kb cpu took load1 others
yr = rows("py-runs.txt")  # wall maxrss_kb cpu load1 others
stats = load("pipe-stats.json")
ps = stats.get("train") or stats.get("data") or next(iter(stats.values()))
ys = [load(f"py-{k}.json") for k in range(1, len(yr) + 1)]
sj = load("stats.json")
ck = sj.get("compare", {})
yc = sj["python"]
med = statistics.median

p_wall = med(r[0] for r in pr)
p_cpu = med(r[2] for r in pr)
p_took = med(r[3] for r in pr)
p_rss = max(r[1] for r in pr) * 1024
y_total = med(y["total_s"] for y in ys)
y_cpu = med(y["cpu_s"] for y in ys)
y_wall = med(r[0] for r in yr)
y_rss_main = max(r[1] for r in yr) * 1024
y_rss_tree = max(y["peak_tree_rss_bytes"] for y in ys)
y_pss_tree = max(y["peak_tree_pss_bytes"] for y in ys)
y = sorted(ys, key=lambda v: v["total_s"])[len(ys) // 2]
ptok, ytok = ps["tokens"], yc["tokens"]
seq = meta["seq_len"]


def mib(b):
    return f"{b / 2**20:.0f} MiB"


def mtps(n, t):
    return f"{n / t / 1e6:.3f} M tok/s"


v = y["versions"]
print("pipe pack benchmark (benches/pack.sh), {}".format(datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
print(f"command: {meta['command']}")
print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; "
      f"load average {meta['load_start']} at start, {meta['load_end']} at end (1/5/15 min)")
print(f"pipe:    {meta['pipe_version']} ({meta['pipe_src']})")
print(f"python:  {v['python']}, transformers {v['transformers']} ({y['tokenizer_class']}), tokenizers "
      f"{v['tokenizers']}, datasets {v['datasets']}, trl {v['trl']}, pyarrow {v['pyarrow']}; no torch")
print(f"data:    N={meta['n']} synthetic Orca-Math-like samples (benches/pack/gen_data.py, seed {meta['seed']}) "
      f"+ the seed's system prompt: {y['tokens_before_truncation'] / max(1, y['samples']):.0f} tokens/sample "
      "before truncation")
print(f"job:     SmolLM2-135M-Instruct tokenizer + ChatML template, assistant-only labels, BFD into rows of {seq}")
print(f"         pipe: `pipe run --force pack` ({len(pr)} run(s), median); python: datasets map(batched=True, "
      f"batch_size={y['batch_size']}, num_proc={y['num_proc']}) + trl.pack_dataset(strategy='bfd', "
      f"map_kwargs num_proc={y['num_proc']}) ({len(yr)} run(s), median)")
print()
w = 36
print(f"{'':{w}} {'pipe':>16} {'python':>16} {'python/pipe':>12}")
print(f"{'time, pipe = process wall':{w}} {p_wall:14.2f} s {y_total:14.2f} s {y_total / p_wall:11.1f}x  goal >= 10x")
print(f"{'time, pipe = stage took':{w}} {p_took:14.2f} s {y_total:14.2f} s {y_total / p_took:11.1f}x")
print(f"{'CPU time (user + sys)':{w}} {p_cpu:14.2f} s {y_cpu:14.2f} s {y_cpu / p_cpu:11.1f}x")
print(f"{'throughput (packed tokens / time)':{w}} {mtps(ptok, p_wall):>16} {mtps(ytok, y_total):>16}")
print(f"{'peak RSS (time -v, largest process)':{w}} {mib(p_rss):>16} {mib(y_rss_main):>16}")
print(f"{'peak of all processes, RSS / PSS':{w}} {'(one process)':>16} {mib(y_rss_tree) + ' / ' + mib(y_pss_tree):>16}")
print()
print("python phases: " + ", ".join(f"{k} {t:.2f}s" for k, t in y["phases_s"].items())
      + f"  (sum = the python time; start-up + imports {y['startup_s'] + y['imports_s']:.2f}s not counted; "
      f"whole process {y_wall:.2f}s)")
print("pipe runs (wall / CPU / took / load1 before / CPUs used by other processes during): "
      + "; ".join(f"{r[0]:.2f}s / {r[2]:.2f}s / {r[3]:.2f}s / {r[4]:.2f} / {r[5]:.2f}" for r in pr))
print("python runs (timed / CPU / load1 before / CPUs used by other processes during): "
      + "; ".join(f"{q['total_s']:.2f}s / {q['cpu_s']:.2f}s / {r[3]:.2f} / {r[4]:.2f}" for q, r in zip(ys, yr)))
f = meta["first"]
print(f"pipe first run (model + dataset + messages + pack): {f['wall']:.2f}s wall, peak RSS {f['rss_kb'] / 1024:.0f} MiB; "
      f"stages took: model {f['model']}s, dataset {f['data']}s, messages {f['chat']}s, pack {f['pack']}s")
print()
print(f"{'sanity checks':{w}} {'pipe':>16} {'python':>16}")


def row(label, a, b, note=""):
    print(f"  {label:{w - 2}} {a!s:>16} {b!s:>16}  {note}")


row("samples in", ps["samples"], y["samples"])
row("tokens (after truncation)", ptok, ytok, f"diff {ptok - ytok:+d} ({(ptok - ytok) / max(1, ytok) * 100:+.4f}%)")
row("tokens before truncation", "-", y["tokens_before_truncation"])
row("trainable tokens (labels != -100)", ps["trainable_tokens"], yc["trainable_tokens"],
    f"diff {ps['trainable_tokens'] - yc['trainable_tokens']:+d}")
row("truncated samples", ps["truncated"], y["truncated"])
row("packed samples", ps["packed_samples"], yc["packed_samples"])
row("packed rows", ps["rows"], yc["rows"], f"TRL bins each map batch ({y['batch_size']} samples) separately")
row("packing efficiency", f"{ps['packing_efficiency']:.4f}", f"{yc['packing_efficiency']:.4f}")
row("skipped, no trainable token", ps.get("skipped_no_trainable_tokens", "-"), "-")
if "ids" in ck:
    a, b = ck["ids"], ck["ids_and_labels"]
    print(f"  sample by sample ({ck['pipe_samples']} pipe, {ck['python_samples']} python, order-independent): "
          f"identical input_ids {a['identical']}, identical input_ids + labels {b['identical']} "
          f"(only in pipe {b['only_pipe']}, only in python {b['only_python']})")
    for e in ck.get("examples", [])[:3]:
        print("    e.g. " + json.dumps(e, ensure_ascii=False)[:600])
else:
    print("  sample by sample: not compared (CHECK=0)")

notes = []
others = max([r[5] for r in pr] + [r[4] for r in yr])
if others > 0.2:
    notes.append(f"other processes kept up to {others:.2f} of {os.cpu_count()} CPUs busy during a timed run: "
                 "wall timings are noisy (the CPU-time ratio is steadier); rerun on a quiet machine")
else:
    notes.append(f"the machine was quiet during the timed runs (other processes <= {others:.2f} CPUs); "
                 "the 1-min load averages above include this benchmark's own previous runs")
with open(os.path.join(T, "pipe-messages.txt")) as fh:
    said = fh.read().strip()
if said:
    notes.append("pipe also printed: " + said.replace("\n", " | ")[:600])
if notes:
    print()
    print("notes:")
    for n in notes:
        print("  - " + n)
print()
print("summary")
print(f"  pipe    {mtps(ptok, p_wall)}  ({ptok} tokens in {p_wall:.2f}s wall, stage took {p_took:.2f}s), "
      f"peak RSS {mib(p_rss)}")
print(f"  python  {mtps(ytok, y_total)}  ({ytok} tokens in {y_total:.2f}s, num_proc {y['num_proc']}), "
      f"peak {mib(y_pss_tree)} PSS over all processes, {mib(y_rss_main)} RSS largest process")
print(f"  ratio   {y_total / p_wall:.1f}x (pipe process wall), {y_total / p_took:.1f}x (stage took), "
      f"{y_cpu / p_cpu:.1f}x CPU time; goal >= 10x")
