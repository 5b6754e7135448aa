"""The Python side of benches/pack.sh: transformers + datasets + TRL, as a user
would write it, over the same conversations as pipe's `pack` stage.

    python trl_pack.py run   --model DIR --data MESSAGES.parquet --out DIR --result R.json
                             [--seq-len 1024] [--num-proc 2] [--batch-size 1000]
    python trl_pack.py stats --python PY_PACK.parquet [--pipe PIPE_PACK.parquet] --model DIR --result S.json

`run` times, one after the other (each phase's wall time is recorded):
  1. tokenizer: `AutoTokenizer.from_pretrained(DIR)` (pipe's `model` output);
  2. load:      `Dataset.from_parquet` of pipe's `messages` output (the same
                conversations pipe's `pack` reads);
  3. tokenize:  `ds.map(batched=True, num_proc=N)` calling
                `tokenizer.apply_chat_template(batch, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, chat_template=TRAINING_TEMPLATE)`;
  4. labels:    `ds.map(batched=True, num_proc=N)`: labels = input_ids where the
                assistant mask is 1, else -100 (TRL's SFTTrainer `build_labels`);
  5. pack:      `ds.select_columns(["input_ids", "labels"])` then
                `trl.pack_dataset(ds, seq_length, strategy="bfd", map_kwargs={"num_proc": N})`,
                exactly the calls TRL's SFTTrainer makes (it passes the same map_kwargs);
  6. write:     `packed.to_parquet(OUT/train.parquet)` (pipe writes Parquet too).
Python start-up and imports are timed separately and not part of the total.

Assistant masks: SmolLM2's ChatML template has no `{% generation %}` markers,
so `return_assistant_tokens_mask=True` would give all-zero masks; TRL 1.x's
SFTTrainer(assistant_only_loss=True) swaps in a "training" template with the
markers for the templates it knows (`get_training_chat_template`) and raises
for others, SmolLM2's included. So we do what its error message asks: the same
template with `{% generation %}` around each assistant message's content and
its `<|im_end|>\\n` (what pipe's `loss_on: assistant` trains on). The rendered
text is checked to be byte-identical to the original template's.

`run` counts only tokens before truncation (from list offsets); `stats`, a
separate process so that reading the output adds nothing to `run`'s peak
memory, counts tokens packed, trainable tokens (labels != -100), packed rows
and samples.

CPU time: user + system of this process and its reaped children (the num_proc
workers) over the timed phases. Peak memory: a thread samples the summed RSS
and PSS of this process and its children every 100 ms; `/usr/bin/time -v`
around the whole process reports the largest single process's peak RSS.

With --pipe, `stats` also compares the two packed outputs sample by sample,
independent of the packing order: every packed row is cut into its samples (pipe: `seq_lens`,
TRL: `seq_lengths`), and the multisets of (input_ids) and of (input_ids,
labels) are compared. Differences are explained by decoding the first few
unmatched samples next to their closest counterpart.
"""

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402


# ---------------------------------------------------------------- memory
class TreeMem:
    """Peak memory of this process and all its descendants (datasets' num_proc
    workers), sampled every `interval` s: the summed RSS (counts pages that forked
    workers share with the parent once per process) and the summed PSS (shared
    pages split between the processes sharing them: the honest total).
    One sample costs ~1.5 ms of CPU."""

    def __init__(self, interval=0.1):
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_self = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _mem(pid):
        rss = pss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return rss, pss

    @staticmethod
    def _children():
        kids = collections.defaultdict(list)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                ppid = int(s[s.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids[ppid].append(int(d))
        return kids

    def sample(self):
        me = os.getpid()
        kids = self._children()
        todo, rss, pss = [me], 0, 0
        while todo:
            p = todo.pop()
            r, q = self._mem(p)
            rss, pss = rss + r, pss + q
            if p == me:
                self.peak_self = max(self.peak_self, r)
            todo.extend(kids.get(p, ()))
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.sample()


# ---------------------------------------------------------------- template
_CHATML_TURN = re.compile(
    r"\{\{\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'(?:\n|\\n)'\s*\+\s*message\['content'\]\s*"
    r"\+\s*'<\|im_end\|>'\s*\+\s*'(?:\n|\\n)'\s*\}\}"
)


def training_template(template):
    """SmolLM2's ChatML template with {% generation %} around assistant content + <|im_end|>\\n."""
    m = _CHATML_TURN.search(template)
    if not m:
        raise SystemExit(
            "error: the model's chat template is not SmolLM2's ChatML one; cannot add {% generation %} markers\n"
            f"template: {template!r}"
        )
    turn = m.group(0)
    patched = (
        "{% if message['role'] == 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
        "{% else %}" + turn + "{% endif %}"
    )
    return template[: m.start()] + patched + template[m.end() :]


# ---------------------------------------------------------------- run
def cmd_run(a):
    t_imp = time.perf_counter()
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import pack_dataset

    imports_s = time.perf_counter() - t_imp
    assert "torch" not in sys.modules, "torch got imported"
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    phases = {}
    num_proc = a.num_proc if a.num_proc > 1 else None
    mk = {"num_proc": num_proc, "load_from_cache_file": False}

    with TreeMem() as mem:
        cpu0 = os.times()
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(a.model)
        tpl = training_template(tok.chat_template)
        phases["tokenizer"] = time.perf_counter() - t0

        t = time.perf_counter()
        ds = Dataset.from_parquet(a.data)
        phases["load"] = time.perf_counter() - t

        # Untimed sanity check: the training template renders the same text.
        t_chk = time.perf_counter()
        some = ds[:50]["messages"]
        r0 = tok.apply_chat_template(some, tokenize=False)
        r1 = tok.apply_chat_template(some, tokenize=False, chat_template=tpl)
        if r0 != r1:
            raise SystemExit("error: the training template renders differently from the model's template")
        chk_s = time.perf_counter() - t_chk

        def tokenize(batch):
            out = tok.apply_chat_template(
                batch["messages"],
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                chat_template=tpl,
            )
            return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

        t = time.perf_counter()
        ds = ds.map(tokenize, batched=True, batch_size=a.batch_size, remove_columns=ds.column_names, **mk)
        phases["tokenize"] = time.perf_counter() - t

        def build_labels(batch):
            return {
                "labels": [
                    [i if m else -100 for i, m in zip(ids, mask)]
                    for ids, mask in zip(batch["input_ids"], batch["assistant_masks"])
                ]
            }

        t = time.perf_counter()
        ds = ds.map(build_labels, batched=True, batch_size=a.batch_size, remove_columns=["assistant_masks"], **mk)
        phases["labels"] = time.perf_counter() - t

        t = time.perf_counter()
        tokenized = ds.select_columns(["input_ids", "labels"])
        packed = pack_dataset(tokenized, a.seq_len, strategy="bfd", map_kwargs=mk)
        phases["pack"] = time.perf_counter() - t

        t = time.perf_counter()
        os.makedirs(a.out, exist_ok=True)
        out_file = os.path.join(a.out, "train.parquet")
        packed.to_parquet(out_file)
        phases["write"] = time.perf_counter() - t
        total = sum(phases.values())
        cpu1 = os.times()
    cpu = sum(getattr(cpu1, k) - getattr(cpu0, k) for k in ("user", "system", "children_user", "children_system"))

    # ---- after the clock stopped: only what the offsets give (cheap, no data
    # pages touched); the rest is counted by `stats`, in another process, so
    # that it adds nothing to this process's peak memory.
    lens_before = pc.list_value_length(tokenized.data.table.column("input_ids"))
    st = {
        "versions": {
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "trl": trl.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "pyarrow": pa.__version__,
        },
        "tokenizer_class": type(tok).__name__,
        "num_proc": num_proc or 1,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "samples": len(tokenized),
        "tokens_before_truncation": pc.sum(lens_before).as_py(),
        "truncated": pc.sum(pc.greater(lens_before, a.seq_len).cast(pa.int64())).as_py(),
        "phases_s": phases,
        "total_s": total,
        "untimed_template_check_s": chk_s,
        "imports_s": imports_s,
        "startup_s": t_imp - T_START,
        "cpu_s": cpu,
        "peak_tree_rss_bytes": mem.peak_rss,
        "peak_tree_pss_bytes": mem.peak_pss,
        "peak_main_rss_bytes": mem.peak_self,
        "out": out_file,
    }
    with open(a.result, "w") as f:
        json.dump(st, f, indent=2)
    print(json.dumps({k: st[k] for k in ("samples", "tokens_before_truncation", "total_s", "phases_s")}))


# ---------------------------------------------------------------- check
def samples_of(path, lens_col):
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["input_ids", "labels", lens_col])
    ids = pc.list_flatten(t.column("input_ids")).to_numpy().astype(np.int32)
    lab = pc.list_flatten(t.column("labels")).to_numpy().astype(np.int32)
    lens = pc.list_flatten(t.column(lens_col)).to_numpy().astype(np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    return [(ids[s:e], lab[s:e]) for s, e in zip(starts, ends)]


def h(*arrs):
    d = hashlib.blake2b(digest_size=16)
    for x in arrs:
        d.update(x.tobytes())
        d.update(b"|")
    return d.digest()


def counts(path, lens_col, seq_len):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    labels = pc.list_flatten(t.column("labels"))
    st = {
        "tokens": pc.sum(pc.list_value_length(t.column("input_ids"))).as_py(),
        "trainable_tokens": pc.sum(pc.not_equal(labels, -100).cast(pa.int64())).as_py(),
        "rows": t.num_rows,
        "packed_samples": pc.sum(pc.list_value_length(t.column(lens_col))).as_py(),
        "columns": {f.name: str(f.type) for f in t.schema},
    }
    st["packing_efficiency"] = st["tokens"] / (st["rows"] * seq_len) if st["rows"] else 0.0
    return st


def cmd_stats(a):
    res = {"python": counts(a.python, "seq_lengths", a.seq_len)}
    if a.pipe:
        res["pipe"] = counts(a.pipe, "seq_lens", a.seq_len)
        res["compare"] = compare(a)
    with open(a.result, "w") as f:
        json.dump(res, f, indent=2, ensure_ascii=False)
    print(json.dumps({k: v for k, v in res.get("compare", {}).items() if k != "examples"}))


def compare(a):
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    P = samples_of(a.pipe, "seq_lens")
    Y = samples_of(a.python, "seq_lengths")
    res = {"pipe_samples": len(P), "python_samples": len(Y)}
    for name, key in (("ids", lambda s: h(s[0])), ("ids_and_labels", lambda s: h(s[0], s[1]))):
        cp = collections.Counter(key(s) for s in P)
        cy = collections.Counter(key(s) for s in Y)
        common = sum((cp & cy).values())
        res[name] = {"identical": common, "only_pipe": len(P) - common, "only_python": len(Y) - common}
    # Explain the first few differences.
    notes = []
    if res["ids_and_labels"]["only_pipe"] or res["ids_and_labels"]["only_python"]:
        by_full = collections.Counter(h(s[0], s[1]) for s in Y)
        up = [s for s in P if by_full[h(s[0], s[1])] == 0]
        by_full_p = collections.Counter(h(s[0], s[1]) for s in P)
        uy = [s for s in Y if by_full_p[h(s[0], s[1])] == 0]

        def lcp(x, y):
            n = min(len(x), len(y))
            d = np.nonzero(x[:n] != y[:n])[0]
            return int(d[0]) if len(d) else n

        for s in up[: a.explain]:
            if not uy:
                break
            best = max(uy[:2000], key=lambda y: lcp(s[0], y[0]))
            k = lcp(s[0], best[0])
            note = {"pipe_len": len(s[0]), "python_len": len(best[0]), "first_id_diff_at": k}
            if k < min(len(s[0]), len(best[0])) or len(s[0]) != len(best[0]):
                lo = max(0, k - 8)
                note["pipe_ids"] = s[0][lo : k + 8].tolist()
                note["python_ids"] = best[0][lo : k + 8].tolist()
                note["pipe_text"] = tok.decode(s[0][lo : k + 8].tolist())
                note["python_text"] = tok.decode(best[0][lo : k + 8].tolist())
            else:
                d = np.nonzero(s[1] != best[1])[0]
                note["ids_identical"] = True
                note["label_diff_positions"] = d[:20].tolist()
                note["label_diffs"] = len(d)
                if len(d):
                    i = int(d[0])
                    lo = max(0, i - 4)
                    note["around"] = [
                        (int(s[0][j]), tok.decode([int(s[0][j])]), int(s[1][j]), int(best[1][j]))
                        for j in range(lo, min(len(s[0]), i + 5))
                    ]
            notes.append(note)
    res["examples"] = notes
    return res


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--result", required=True)
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--num-proc", type=int, default=2)
    r.add_argument("--batch-size", type=int, default=1000)
    c = sub.add_parser("stats")
    c.add_argument("--python", required=True)
    c.add_argument("--pipe", help="also compare with pipe's packed Parquet, sample by sample")
    c.add_argument("--model", required=True)
    c.add_argument("--result", required=True)
    c.add_argument("--seq-len", type=int, default=1024)
    c.add_argument("--explain", type=int, default=5)
    a = ap.parse_args()
    {"run": cmd_run, "stats": cmd_stats}[a.cmd](a)


if __name__ == "__main__":
    main()
