"""Check pipe's `dataset` and `messages` outputs against Hugging Face `datasets` and TRL.

Run through datasets_messages.sh, which calls this twice:

    gen   --ws DIR                      write data/tricky.jsonl, prompts/system.txt, pipeline.yaml
    check --ws DIR --out NAME=PATH ...  check the stage outputs (`pipe show NAME --path`)

`check`:
  1. every output Parquet loads with `pyarrow.parquet.read_table`,
     `datasets.Dataset.from_parquet` and `datasets.load_dataset("parquet")`;
     features are printed; `messages` is a list of {role, content} strings,
     `prompt`/`completion` are strings, and no value is null;
  2. the rows hold exactly what the source rows and templates say (the
     dataset stage keeps every source row once; each messages row is what
     Python's Jinja2 renders from its source row, in the dataset split's order);
  3. `Dataset.to_json()` of each messages Parquet is byte-identical to pipe's
     `<split>.jsonl` export (the first differing line is shown, with the
     byte offset and both sides around it); the export also loads back with
     `load_dataset("json")` to the same rows;
  4. TRL (`trl.data_utils`): conversation rows are `is_conversational`, and
     `maybe_apply_chat_template` renders them with a ChatML template;
     instruction rows are prompt-completion (keys {prompt, completion}, plain
     strings, not conversational).
Exit status 1 if anything fails.
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import traceback

# ---------------------------------------------------------------- the data

SYSTEM = (
    "You are a careful assistant / helper \u2014 r\u00e9ponds en fran\u00e7ais ou en \u4e2d\u6587 \U0001f600.\n"
    "\tQuote \"exactly\", escape C:\\path\\to\\file, and keep </script> & <b>tags</b> as text.\n"
)
# What the stage uses: the file without its trailing newline(s).
SYSTEM_USED = SYSTEM.rstrip("\n")

USER_TPL = "Question: {{ q }}\n\nAnswer briefly."
ASSISTANT_TPL = "{{ a }}"
PROMPT_TPL = "### Instruction:\n{{ q }}\n\n### Response:\n"
COMPLETION_TPL = " {{ a }}"


def long_text(n=40000):
    unit = (
        "Long line with \u00e9, \u4e2d\u6587, \U0001f600, a/b/c, \"q\", back\\slash, tab\there, "
        "ctrl\x01\x1f, \u2028sep\u2029, zwj\u200d, bom\ufeff, nbsp\u00a0, del\x7f, math \U0001d400.\n"
    )
    return (unit * (n // len(unit) + 1))[:n] + " END"


def every_code_point():
    """U+0000..U+FFFF except surrogates, then every 97th astral code point."""
    bmp = (chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF)
    return "".join(bmp) + "".join(chr(c) for c in range(0x10000, 0x110000, 97)) + "\U0010ffff"


def rows():
    r = [
        {"q": "What is 2/3 of 9?", "a": "6"},
        {"q": "Caf\u00e9? cr\u00e8me br\u00fbl\u00e9e, na\u00efve, \u00c5ngstr\u00f6m", "a": "Oui \u2014 \u00e7a va \u00e0 merveille."},
        {"q": "\u4e2d\u6587\u95ee\u9898\uff1a\u4f60\u597d\u5417\uff1f\u65e5\u672c\u8a9e\u3068\ud55c\uad6d\uc5b4\u3082", "a": "\u6211\u5f88\u597d\uff0c\u8c22\u8c22\uff01"},
        {"q": "Emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7 flags?", "a": "\U0001f389 yes \U0001f600"},
        {"q": "Paths: /usr/bin/env, https://example.com/a/b?c=d&e=f, </script>", "a": "C:\\Windows\\System32 and \\\\server\\share\\ and \\n (a literal backslash-n)"},
        {"q": 'He said "hello" and \'bye\' and `tick` and "nested \\"escaped\\" quote"', "a": '{"json": "inside", "n": [1, 2]}'},
        {"q": "Line one\nLine two\r\nLine three\rTabs:\tA\tB\n\n\nEnd", "a": "Trailing newline\n"},
        {"q": "Control chars: NUL[\x00] SOH[\x01] BEL[\x07] BS[\x08] VT[\x0b] FF[\x0c] ESC[\x1b] US[\x1f] DEL[\x7f] C1[\x80\x9f]", "a": "ok \x00\x08\x0c"},
        {"q": "Unicode separators: LS[\u2028] PS[\u2029] NBSP[\u00a0] ZWSP[\u200b] BOM[\ufeff] RLO[\u202e]abc[\u202c] replacement[\ufffd] max[\U0010ffff] nonchar[\uffff]", "a": "\U0001d54f\U0001d552\U0001d55d \u00bd \u2153 \u00b2 " + every_code_point()},
        {"q": "Jinja-looking text {{ not_a_var }} {% if x %} {# comment #} stays literal", "a": "<b>HTML</b> &amp; <i>entities</i> &lt;kept&gt; 'as is'"},
        {"q": "Long answer please", "a": long_text()},
        {"q": "  leading and trailing spaces  ", "a": "\t indented answer \t"},
    ]
    convs = [
        [("human", "Hi! \U0001f44b"), ("gpt", "Hello / bonjour / \u4f60\u597d")],
        [("human", "2+2?"), ("gpt", "4"), ("human", "and \"2/2\"?\n\ttab"), ("gpt", "1 \\ one")],
        [("system", "Be terse \u2014 really."), ("human", "Why?"), ("gpt", "Because.\x01")],
    ]
    for i, row in enumerate(r):
        row["id"] = i
        row["conv"] = [{"from": f, "value": v} for f, v in convs[i % len(convs)]]
    return r


PIPELINE = """\
stages:
  ds:
    kind: dataset
    source: data/tricky.jsonl
    train_test_split: {test_size: 0.25, seed: 7}
  chat:
    kind: messages
    inputs: {data: ds}
    system_file: prompts/system.txt
    user: %(user)s
    assistant: %(assistant)s
    export: jsonl
  multi:
    kind: messages
    inputs: {data: ds}
    turns: {field: conv, role: from, content: value, roles: {human: user, gpt: assistant}}
    export: jsonl
  inst:
    kind: messages
    inputs: {data: ds}
    format: instruction
    prompt: %(prompt)s
    completion: %(completion)s
    export: jsonl
""" % {
    "user": json.dumps(USER_TPL),
    "assistant": json.dumps(ASSISTANT_TPL),
    "prompt": json.dumps(PROMPT_TPL),
    "completion": json.dumps(COMPLETION_TPL),
}


def render(tpl, row):
    """A template rendered as Python's Jinja2 renders it (what HF users expect;
    note Jinja drops one final newline of a template: keep_trailing_newline=False)."""
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(tpl).render(**row)


def expected(stage, row):
    """The row a messages stage should make from a source row."""
    if stage == "chat":
        return {
            "messages": [
                {"role": "system", "content": render(SYSTEM_USED, row)},
                {"role": "user", "content": render(USER_TPL, row)},
                {"role": "assistant", "content": render(ASSISTANT_TPL, row)},
            ]
        }
    if stage == "multi":
        roles = {"human": "user", "gpt": "assistant"}
        return {"messages": [{"role": roles.get(t["from"], t["from"]), "content": t["value"]} for t in row["conv"]]}
    if stage == "inst":
        return {"prompt": render(PROMPT_TPL, row), "completion": render(COMPLETION_TPL, row)}
    raise ValueError(stage)


def gen(ws):
    os.makedirs(os.path.join(ws, "data"), exist_ok=True)
    os.makedirs(os.path.join(ws, "prompts"), exist_ok=True)
    lines = []
    for i, row in enumerate(rows()):
        # Mix raw UTF-8 and \u-escaped input, and escaped slashes, so the reader sees both.
        s = json.dumps(row, ensure_ascii=(i % 2 == 1))
        if i % 3 == 0:
            s = s.replace("/", "\\/")
        lines.append(s)
    # The last line has no trailing newline (common in real files).
    with open(os.path.join(ws, "data", "tricky.jsonl"), "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines))
    with open(os.path.join(ws, "prompts", "system.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(SYSTEM)
    with open(os.path.join(ws, "pipeline.yaml"), "w", encoding="utf-8") as f:
        f.write(PIPELINE)


# ---------------------------------------------------------------- checking

FAILS = []
PASSES = []


def ok(msg):
    PASSES.append(msg)
    print(f"  ok    {msg}")


def fail(msg):
    FAILS.append(msg)
    print(f"  FAIL  {msg}")


def check(cond, msg, detail=""):
    if cond:
        ok(msg)
    else:
        fail(msg + (f": {detail}" if detail else ""))
    return cond


def short(s, n=160):
    r = repr(s)
    return r if len(r) <= n else r[: n - 3] + "..."


def first_diff(a: bytes, b: bytes):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else None


def compare_jsonl(ours_path, theirs_path, label):
    """Byte-exact, line by line; print the first difference precisely."""
    with open(ours_path, "rb") as f:
        ours = f.read()
    with open(theirs_path, "rb") as f:
        theirs = f.read()
    if ours == theirs:
        nl = ours.count(b"\n")
        ok(f"{label}: pipe's export == Dataset.to_json() byte for byte ({len(ours)} bytes, {nl} lines)")
        return True
    ol, tl = ours.split(b"\n"), theirs.split(b"\n")
    ndiff = sum(1 for x, y in zip(ol, tl) if x != y) + abs(len(ol) - len(tl))
    fail(f"{label}: pipe's export differs from Dataset.to_json() ({ndiff} line(s) differ; sizes {len(ours)} vs {len(theirs)} bytes)")
    for i, (x, y) in enumerate(zip(ol, tl)):
        if x != y:
            off = first_diff(x, y)
            lo = max(0, off - 60)
            print(f"        first difference: line {i + 1}, byte {off} of the line")
            print(f"        ours   [{lo}:{off + 60}]: {x[lo:off + 60]!r}")
            print(f"        to_json[{lo}:{off + 60}]: {y[lo:off + 60]!r}")
            if len(x) < 600 and len(y) < 600:
                print(f"        ours    line: {x.decode('utf-8', 'replace')}")
                print(f"        to_json line: {y.decode('utf-8', 'replace')}")
            break
    else:
        print(f"        line counts differ: ours {len(ol)} vs to_json {len(tl)} (split on \\n); "
              f"ours ends {ours[-20:]!r}, to_json ends {theirs[-20:]!r}")
    # Every escaping difference over all lines, by character.
    pairs = collections.Counter()
    unaligned = 0
    for x, y in zip(ol, tl):
        if x == y:
            continue
        ux, uy = units(x), units(y)
        if [c for c, _ in ux] != [c for c, _ in uy]:
            unaligned += 1
            continue
        for (c, bx), (_, by) in zip(ux, uy):
            if bx != by:
                pairs[(c, bx, by)] += 1
    for (c, bx, by), n in sorted(pairs.items()):
        print(f"        U+{ord(c[0]):04X}{'+U+%04X' % ord(c[1]) if len(c) > 1 else ''}: ours {bx!r}, to_json {by!r} ({n}x)")
    if unaligned:
        print(f"        {unaligned} differing line(s) do not encode the same characters")
    return False


UNIT = re.compile(rb'\\u[dD][89abAB][0-9a-fA-F]{2}\\u[0-9a-fA-F]{4}|\\u[0-9a-fA-F]{4}|\\.|[\x00-\x7f]|[\xc0-\xff][\x80-\xbf]*|.', re.S)


def units(line: bytes):
    """A JSON line as (character(s), bytes that encode it), one per escape or UTF-8 char."""
    out = []
    for m in UNIT.finditer(line):
        b = m.group()
        if b.startswith(b"\\"):
            try:
                c = json.loads(b'"' + b + b'"')
            except ValueError:
                c = b.decode("latin-1")
        else:
            c = b.decode("utf-8", "replace")
        out.append((c, b))
    return out


def rows_key(r):
    return json.dumps(r, sort_keys=True, ensure_ascii=True)


def do_check(ws, outs, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import datasets
    from datasets import Dataset, load_dataset

    datasets.disable_progress_bars()
    import pandas

    print(f"versions: datasets {datasets.__version__}, pyarrow {pa.__version__}, pandas {pandas.__version__}, python {sys.version.split()[0]}")

    src = rows()
    src_by_id = {r["id"]: r for r in src}

    # -- the dataset stage
    print("\n== dataset stage `ds`")
    ds_dir = outs["ds"]
    splits = {}
    for split in ("train", "test"):
        p = os.path.join(ds_dir, f"{split}.parquet")
        if not check(os.path.exists(p), f"ds/{split}.parquet exists"):
            continue
        t = pq.read_table(p)
        print(f"     pyarrow schema: {t.schema.to_string(show_schema_metadata=False).replace(chr(10), '; ')}")
        d = Dataset.from_parquet(p, cache_dir=os.path.join(tmp, "cache"))
        print(f"     features: {d.features}")
        check(t.num_rows == len(d), f"ds/{split}: pyarrow and datasets agree on rows ({t.num_rows})")
        got = d.to_list()
        check(got == t.to_pylist(), f"ds/{split}: pyarrow and datasets give the same values")
        splits[split] = got
    if len(splits) == 2:
        allrows = splits["train"] + splits["test"]
        ids = sorted(r["id"] for r in allrows)
        check(ids == sorted(src_by_id), "ds: train + test hold every source row exactly once",
              f"ids {ids}")
        bad = [r["id"] for r in allrows if r["id"] in src_by_id and r != src_by_id[r["id"]]]
        check(not bad, "ds: every row equals its source row (all strings round-trip)", f"rows {bad} differ")
        for rid in bad[:2]:
            got = next(r for r in allrows if r["id"] == rid)
            for k in src_by_id[rid]:
                if got.get(k) != src_by_id[rid][k]:
                    print(f"        row {rid} field {k}: got {short(got.get(k))} want {short(src_by_id[rid][k])}")
        check(len(splits["test"]) == 3, f"ds: test_size 0.25 of 12 rows gives 3 test rows (got {len(splits['test'])})")

    # -- the messages stages
    try:
        from trl.data_utils import is_conversational, maybe_apply_chat_template
        trl_err = None
    except Exception as e:  # noqa: BLE001
        is_conversational = maybe_apply_chat_template = None
        trl_err = f"{type(e).__name__}: {e}"
    tok = None
    if trl_err is None:
        try:
            tok = chatml_tokenizer()
        except Exception as e:  # noqa: BLE001
            print(f"  note  no tokenizer for maybe_apply_chat_template ({type(e).__name__}: {e})")

    for stage in ("chat", "multi", "inst"):
        conv = stage != "inst"
        print(f"\n== messages stage `{stage}` ({'conversation' if conv else 'instruction'})")
        d_out = outs[stage]
        stats_path = os.path.join(d_out, "stats.json")
        if check(os.path.exists(stats_path), f"{stage}/stats.json exists"):
            with open(stats_path) as f:
                stats = json.load(f)
            for split, st in sorted(stats.items()):
                check(st.get("rows_in") == st.get("rows_out") == len(splits.get(split, [])) and not st.get("skipped"),
                      f"{stage}/stats.json {split}: rows_in == rows_out == {len(splits.get(split, []))}, nothing skipped",
                      json.dumps(st))
        for split in ("train", "test"):
            label = f"{stage}/{split}"
            p = os.path.join(d_out, f"{split}.parquet")
            if not check(os.path.exists(p), f"{label}.parquet exists"):
                continue
            try:
                t = pq.read_table(p)
                d = Dataset.from_parquet(p, cache_dir=os.path.join(tmp, "cache"))
                ld = load_dataset("parquet", data_files={split: p}, cache_dir=os.path.join(tmp, "cache"))[split]
            except Exception as e:  # noqa: BLE001
                fail(f"{label}.parquet: reading failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            print(f"     pyarrow schema: {t.schema.to_string(show_schema_metadata=False).replace(chr(10), '; ')}")
            print(f"     features: {d.features}")
            check(list(d.column_names) == (["messages"] if conv else ["prompt", "completion"]),
                  f"{label}: columns are {d.column_names}")
            got = d.to_list()
            check(got == t.to_pylist() == ld.to_list(),
                  f"{label}: pyarrow, Dataset.from_parquet and load_dataset('parquet') give the same {len(got)} rows")
            check(shape_ok(got, conv), f"{label}: " + (
                "messages is a non-empty list of {role, content} with string values, roles system/user/assistant"
                if conv else "prompt and completion are non-null strings"))
            if conv:
                from datasets import Value
                feat = d.features["messages"]
                inner = getattr(feat, "feature", None)
                if inner is None and isinstance(feat, list):
                    inner = feat[0]
                check(isinstance(inner, dict) and set(inner) == {"role", "content"}
                      and all(isinstance(v, Value) and v.dtype == "string" for v in inner.values()),
                      f"{label}: features['messages'] is a list of {{role: string, content: string}}", str(feat))
            # expected contents, in the dataset split's order
            want = [expected(stage, r) for r in splits.get(split, [])]
            if not check(got == want, f"{label}: every row is what Jinja2 renders from its source row, in order"):
                for i, (g, w) in enumerate(zip(got, want)):
                    if g != w:
                        print(f"        row {i}: got  {short(g, 400)}")
                        print(f"        row {i}: want {short(w, 400)}")
                        break
                if len(got) != len(want):
                    print(f"        {len(got)} rows, want {len(want)}")

            # JSONL export vs Dataset.to_json()
            ours = os.path.join(d_out, f"{split}.jsonl")
            if check(os.path.exists(ours), f"{label}.jsonl exists (export: jsonl)"):
                theirs = os.path.join(tmp, f"{stage}-{split}.to_json.jsonl")
                d.to_json(theirs)
                compare_jsonl(ours, theirs, label)
                # and the export reads back to the same rows
                try:
                    back = load_dataset("json", data_files={split: ours}, cache_dir=os.path.join(tmp, "cache"))[split]
                    check(back.to_list() == got, f"{label}.jsonl: load_dataset('json') reads it back to the Parquet's rows")
                except Exception as e:  # noqa: BLE001
                    fail(f"{label}.jsonl: load_dataset('json') failed: {type(e).__name__}: {e}")
                with open(ours, encoding="utf-8") as f:
                    parsed = [json.loads(l) for l in f]
                check(parsed == got, f"{label}.jsonl: json.loads of every line gives the Parquet's rows")

            # TRL
            if trl_err is not None:
                fail(f"{label}: cannot import trl.data_utils ({trl_err})")
                continue
            conv_flags = [is_conversational(r) for r in d]
            if conv:
                check(all(conv_flags), f"{label}: trl is_conversational(row) is True for all {len(conv_flags)} rows")
                if tok is not None:
                    try:
                        texts = [maybe_apply_chat_template(r, tok)["text"] for r in d]
                        want_t = [chatml(r["messages"]) for r in d]
                        check(texts == want_t, f"{label}: trl maybe_apply_chat_template renders every row (ChatML) as expected")
                        # (the tokenizer argument is `processing_class` in recent TRL, `tokenizer` before)
                        mapped = d.map(lambda r: maybe_apply_chat_template(r, tok), remove_columns=["messages"])
                        check(mapped["text"] == want_t, f"{label}: Dataset.map(maybe_apply_chat_template) gives a `text` column")
                    except Exception as e:  # noqa: BLE001
                        fail(f"{label}: trl maybe_apply_chat_template failed: {type(e).__name__}: {e}")
            else:
                check(not any(conv_flags), f"{label}: trl is_conversational(row) is False (plain prompt/completion)")
                check(all(set(r) == {"prompt", "completion"} for r in d),
                      f"{label}: every row has exactly the keys {{prompt, completion}} (TRL's prompt-completion type)")
                if tok is not None:
                    try:
                        same = all(maybe_apply_chat_template(r, tok) == r for r in d)
                        check(same, f"{label}: trl maybe_apply_chat_template leaves non-conversational rows unchanged")
                    except Exception as e:  # noqa: BLE001
                        fail(f"{label}: trl maybe_apply_chat_template failed: {type(e).__name__}: {e}")


def shape_ok(rows_, conv):
    for r in rows_:
        if conv:
            m = r.get("messages")
            if not isinstance(m, list) or not m:
                return False
            for x in m:
                if not (isinstance(x, dict) and set(x) == {"role", "content"}
                        and isinstance(x["role"], str) and isinstance(x["content"], str)
                        and x["role"] in ("system", "user", "assistant")):
                    return False
        else:
            if not (isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str)):
                return False
    return True


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def chatml_tokenizer():
    """A tiny tokenizer (word-level, no download) that only carries a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<|im_end|>",
                                   chat_template=CHATML)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["gen", "check"])
    ap.add_argument("--ws", required=True)
    ap.add_argument("--out", action="append", default=[], help="STAGE=PATH")
    a = ap.parse_args()
    if a.cmd == "gen":
        gen(a.ws)
        return 0
    outs = dict(o.split("=", 1) for o in a.out)
    with tempfile.TemporaryDirectory(prefix="to_json.", dir=a.ws) as tmp:
        try:
            do_check(a.ws, outs, tmp)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            fail(f"check crashed: {type(e).__name__}: {e}")
    print()
    print(f"{len(PASSES)} checks passed, {len(FAILS)} failed")
    for f in FAILS:
        print(f"  FAIL  {f}")
    print("PASS" if not FAILS else "FAIL")
    return 0 if not FAILS else 1


if __name__ == "__main__":
    sys.exit(main())
