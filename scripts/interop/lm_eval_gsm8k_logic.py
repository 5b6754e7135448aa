"""Record what lm-evaluation-harness really does for gsm8k_cot / gsm8k over a chat API.

Run through lm_eval_gsm8k_logic.sh. This script:
  1. writes 30 made-up test docs and 40 made-up train docs (GSM8K-shaped:
     {question, answer}, answer ending "#### N") to a temp dir;
  2. copies lm_eval's own gsm8k-cot.yaml / gsm8k.yaml (read from the installed
     package) to task yamls that only swap the dataset for those local files;
  3. starts a mock OpenAI-compatible server on 127.0.0.1 (stdlib http.server, in
     a thread) that records every request body and answers
     /v1/chat/completions with canned responses that exercise the filters
     (picked by the evaluated doc's index, so every response is used);
  4. runs lm_eval.simple_evaluate(model="local-chat-completions",
     apply_chat_template=True, log_samples=True) for both tasks, with and
     without fewshot_as_multiturn, with and without a system instruction;
  5. also calls lm_eval's filters / exact_match / mean_stderr and CPython's
     random.Random(1234).sample directly on extra tricky inputs;
  6. checks that what was sent on the wire is what the samples log says, and
     writes everything to --out (a JSON fixture) for the Rust side
     (stages/src/evaluate/gsm8k.rs, test `lm_eval_fixture`) to compare against.
No network: datasets load local JSON files, no tokenizer is used (tokenized_requests=False).
Exit status 1 if a Python-side consistency check fails.
"""

import argparse
import http.server
import importlib.metadata
import json
import os
import platform
import random
import struct
import sys
import tempfile
import threading

import yaml

# ---------------------------------------------------------------- the data

NAMES = ["Ava", "Bo", "Chidi", "Dana", "Émile", "Farah", "Goro", "Hana", "Ivan", "Jun"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "coins", "cards"]


def make_docs(n, salt):
    """GSM8K-shaped docs with varied answers: plain, thousands, negative, decimal, money, odd spacing."""
    docs = []
    for i in range(n):
        name, item = NAMES[(i + salt) % len(NAMES)], ITEMS[(i * 3 + salt) % len(ITEMS)]
        a, b = 7 + 3 * i + salt, 2 + (i * 5 + salt) % 9
        c = a * b
        kind = (i + salt) % 6
        if kind == 1:
            c, ans = c * 100, f"{c * 100:,}"  # "#### 1,400"
        elif kind == 2:
            c, ans = b - a, str(b - a)  # negative
        elif kind == 3:
            ans = f"{c / 4:g}"  # decimal such as 5.25
        elif kind == 4:
            ans = f"{c}  \n"  # trailing whitespace after the number
        else:
            ans = str(c)
        q = (
            f"{name} has {a} {item} and buys {b} boxes with the same number in each box. "
            f"How many {item} does {name} have in the end? (case #{salt}-{i})"
        )
        if i % 7 == 5:
            q += "\nGive the number only: $ and , are fine."
        reasoning = f"{name} buys {b} boxes of {a}: {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n"
        docs.append({"question": q, "answer": f"{reasoning}#### {ans}"})
    return docs


TEST = make_docs(30, 0)
TRAIN = make_docs(40, 101)

# Canned responses; {n} is the gold number of the evaluated doc (target text), {m} a wrong one.
RESPONSES = [
    "Let's think step by step. 3 + 4 = 7. The answer is {n}.",
    "The answer is {n}",
    "Reasoning first.\n#### {n}",
    "#### {n}.\nThe answer is {m}.",
    "The answer is ${n}.00.",
    "The answer is 1,234.",
    "So she ends up with -3 apples. The answer is -3.",
    "No idea, sorry.",
    "",
    "The answer is 3.5. Wait, recount: 7 + {n}. So the answer is {n}.",
    "The answer is {n}.\n\nQ: Another question?\nA: The answer is 99.",
    "The answer is {m}.\n\nQuestion: extra\nAnswer: #### 12",
    "The answer is \uff15.",
    "<|im_end|> The answer is {n}.",
    "The answer is ,.",
    "Total 1,234,567.89 dollars, so the answer is {n}",
    "-.5 or 5- or --3 and $",
    "The answer is {n}.</s>",
    "THE ANSWER IS {n}.",
    "The answer is {n}.\n",
    "#### -{n}",
    "The answer is: {n}.",
    "It is $18. The answer is 18.",
    "I got 12 then 15.\n#### 15\nThe answer is 15.",
    "The answer is {n}..",
]


def fill(template, gold):
    return template.replace("{n}", gold).replace("{m}", "7777")


def cot_target(doc):
    return doc["answer"].split("####")[-1].strip()


# ---------------------------------------------------------------- the mock server


class Mock:
    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()

    def respond(self, body):
        last = [m for m in body.get("messages", []) if m.get("role") == "user"][-1]["content"]
        idx = next(
            i
            for i, d in enumerate(TEST)
            if last.endswith((d["question"] + "\nA:", d["question"] + "\nAnswer:"))
        )
        text = fill(RESPONSES[idx % len(RESPONSES)], cot_target(TEST[idx]))
        with self.lock:
            self.requests.append({"doc_index": idx, "body": body, "response": text})
        return text

    def serve(self):
        mock = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                text = mock.respond(body)
                out = json.dumps(
                    {
                        "id": "mock",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv


# ---------------------------------------------------------------- lm_eval runs


def write_tasks(tmp):
    import lm_eval

    src = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k")
    for fname, name in [("gsm8k-cot.yaml", "gsm8k_cot"), ("gsm8k.yaml", "gsm8k")]:
        with open(os.path.join(src, fname), encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        assert cfg["task"] == name, cfg["task"]
        cfg.pop("dataset_name", None)
        cfg.pop("tag", None)
        cfg["task"] = f"local_{name}"
        cfg["dataset_path"] = "json"
        cfg["dataset_kwargs"] = {
            "data_files": {"test": os.path.join(tmp, "test.jsonl"), "train": os.path.join(tmp, "train.jsonl")}
        }
        with open(os.path.join(tmp, "tasks", f"local_{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)
        yield name, cfg


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def run_one(lm_eval, tm, mock, port, task, multiturn, system, num_fewshot):
    start = len(mock.requests)
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=mock,base_url=http://127.0.0.1:{port}/v1/chat/completions,num_concurrent=1,max_retries=1,tokenized_requests=False",
        tasks=[f"local_{task}"],
        task_manager=tm,
        num_fewshot=num_fewshot,
        apply_chat_template=True,
        fewshot_as_multiturn=multiturn,
        system_instruction=system,
        log_samples=True,
    )
    name = f"local_{task}"
    res = out["results"][name]
    samples = {}
    for s in out["samples"][name]:
        e = samples.setdefault(
            s["doc_id"],
            {"doc_id": s["doc_id"], "doc": s["doc"], "target": s["target"], "filtered": {}, "exact_match": {}},
        )
        ctx = s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
        e["messages"] = json.loads(getattr(ctx, "prompt", ctx))  # a JsonChatStr: the chat as a JSON string
        e["gen_kwargs"] = (
            s["arguments"][0][1] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_1"]
        )
        e["resps"] = s["resps"]
        e["filtered"][s["filter"]] = (
            s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        )
        e["exact_match"][s["filter"]] = s["exact_match"]
    metrics = {}
    for flt in ("strict-match", "flexible-extract"):
        metrics[flt] = {
            "exact_match": res[f"exact_match,{flt}"],
            "exact_match_bits": f64_bits(res[f"exact_match,{flt}"]),
            "stderr": res[f"exact_match_stderr,{flt}"],
            "stderr_bits": f64_bits(res[f"exact_match_stderr,{flt}"]),
        }
    return {
        "task": task,
        "multiturn": multiturn,
        "system": system,
        "num_fewshot": num_fewshot,
        "effective_num_fewshot": out["n-shot"][name],
        "requests": mock.requests[start:],
        "samples": [samples[k] for k in sorted(samples)],
        "metrics": metrics,
    }


# ---------------------------------------------------------------- direct calls


TRICKY = [
    "The answer is 1,234.",
    "The answer is $5.00.",
    "$5.00",
    "The answer is -12.",
    "The answer is 42",
    "The answer is 42.",
    "The answer is 4",
    "#### -7\n#### 8",
    "#### 1,234.\n",
    "The answer is 3. The answer is 4.",
    "no digits at all",
    "",
    "7",
    "-7",
    "x -7 y",
    "a 12 b 3",
    "a 12 b 34",
    "$$",
    "..,,",
    "The answer is -",
    "The answer is -5-",
    "The answer is 5\nok",
    "The answer is 5\n",
    "The answer is 5\r",
    "The answer is 1.2.3.4..",
    "Cost: $1,000. Then $20.",
    "＃＃＃＃ ５",
    "1e5 and 2.5e-3",
    "-$3",
    "$-3",
    "#### 72\n",
    "The answer is \t9.",
]
EM_CASES = [
    ("1,234", "1234"),
    ("$5.00", "5.00"),
    ("5.00", "5"),
    ("18.", "18"),
    ("18..", "18"),
    ("18.\n", "18"),
    ("18.\n", "18\n"),
    ("[invalid]", "18"),
    ("[INVALID]", "[invalid]"),
    ("-3", "-3"),
    ("-3", "3"),
    ("42", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 42"),
    ("#### 42", "42"),
    ("a #### b #### 42", "42"),
    ("Ab", "aB"),
    ("ΣΑΣ", "σας"),
    ("İ", "i̇"),
    ("5\x00", "5"),
    ("5.\x00", "5"),
    ("5", "5 "),
    ("$1,000.", "1000"),
    (".", ""),
    ("", ""),
    ("#### \n5", "5"),
    ("5.\n.", "5.\n"),
]


def direct(lm_eval_cfgs):
    from lm_eval.api.metrics import exact_match_hf_evaluate, mean_stderr
    from lm_eval.filters.extraction import RegexFilter

    filters = {}
    for task, cfg in lm_eval_cfgs.items():
        for fl in cfg["filter_list"]:
            rx = next(f for f in fl["filter"] if f["function"] == "regex")
            f = RegexFilter(rx["regex_pattern"], rx.get("group_select", 0))
            filters[(task, fl["name"])] = f
    filter_cases = []
    for text in TRICKY + [fill(r, "1,234") for r in RESPONSES]:
        out = {f"{t}/{n}": list(f.apply([[text]], [None]))[0][0] for (t, n), f in filters.items()}
        filter_cases.append({"response": text, "filtered": out})
    em = lm_eval_cfgs["gsm8k"]["metric_list"][0]
    assert lm_eval_cfgs["gsm8k_cot"]["metric_list"][0] == em
    kwargs = {k: em[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    em_cases = [
        {
            "prediction": p,
            "target": t,
            "score": float(exact_match_hf_evaluate(predictions=[p], references=[t], **kwargs)["exact_match"]),
        }
        for p, t in EM_CASES
    ]
    rng = random.Random(7)
    vectors = [
        [1.0, 0.0, 1.0, 1.0],
        [0.0, 1.0],
        [1.0] * 7 + [0.0] * 13,
        [rng.random() for _ in range(50)],
        [rng.choice([0.0, 1.0]) for _ in range(1319)],
    ]
    stderr_cases = [{"xs": v, "stderr": mean_stderr(v), "stderr_bits": f64_bits(mean_stderr(v))} for v in vectors]
    samples = []
    for pool, n in [
        (40, 5),
        (7473, 5),
        (10, 5),
        (21, 5),
        (22, 5),
        (85, 8),
        (86, 8),
        (7473, 8),
        (5, 5),
        (1, 1),
        (300, 40),
    ]:
        r = random.Random(1234)
        samples.append({"pool": pool, "n": n, "draws": [r.sample(range(pool), n) for _ in range(12)]})
    return filter_cases, em_cases, stderr_cases, samples


# ---------------------------------------------------------------- consistency checks


def check_run(run, problems):
    tag = f"{run['task']} multiturn={run['multiturn']} system={run['system'] is not None} n={run['num_fewshot']}"
    reqs = run["requests"]
    if len(reqs) != len(TEST) or len(run["samples"]) != len(TEST):
        problems.append(f"{tag}: {len(reqs)} requests, {len(run['samples'])} samples for {len(TEST)} docs")
    by_doc = {r["doc_index"]: r for r in reqs}
    for s in run["samples"]:
        r = by_doc.get(s["doc_id"])
        if r is None:
            problems.append(f"{tag}: no request for doc {s['doc_id']}")
            continue
        if r["body"]["messages"] != s["messages"]:
            problems.append(f"{tag}: doc {s['doc_id']}: request messages != logged arguments")
        if s["resps"] != [[r["response"]]]:
            problems.append(f"{tag}: doc {s['doc_id']}: logged resps {s['resps']!r} != served {r['response']!r}")
        if s["doc"] != TEST[s["doc_id"]]:
            problems.append(f"{tag}: doc_id {s['doc_id']} is not test doc #{s['doc_id']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="fixture JSON to write")
    ap.add_argument("--system", default="You are a careful math tutor.\nThink, then answer.")
    args = ap.parse_args()

    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger().setLevel(logging.ERROR)
    for name in ("lm_eval", "lm-eval", "httpx", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="lmeval-gsm8k-") as tmp:
        return run_all(args, lm_eval, TaskManager, tmp)


def run_all(args, lm_eval, TaskManager, tmp):
    os.makedirs(os.path.join(tmp, "tasks"))
    for fname, docs in [("test.jsonl", TEST), ("train.jsonl", TRAIN)]:
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    cfgs = dict(write_tasks(tmp))
    tm = TaskManager(include_path=os.path.join(tmp, "tasks"))

    mock = Mock()
    srv = mock.serve()
    port = srv.server_address[1]
    runs = []
    plan = [
        ("gsm8k_cot", True, args.system, None),
        ("gsm8k_cot", False, None, None),
        ("gsm8k_cot", False, args.system, 3),
        ("gsm8k", True, args.system, None),
        ("gsm8k", False, None, None),
        ("gsm8k", True, None, 2),
    ]
    for task, multiturn, system, nfs in plan:
        runs.append(run_one(lm_eval, tm, mock, port, task, multiturn, system, nfs))
        m = runs[-1]["metrics"]
        print(
            f"lm_eval {task:9} multiturn={multiturn!s:5} system={system is not None!s:5} num_fewshot={runs[-1]['effective_num_fewshot']}: "
            f"strict {m['strict-match']['exact_match']:.4f}±{m['strict-match']['stderr']:.4f}  "
            f"flexible {m['flexible-extract']['exact_match']:.4f}±{m['flexible-extract']['stderr']:.4f}  ({len(runs[-1]['requests'])} requests)"
        )
    srv.shutdown()

    problems = []
    for run in runs:
        check_run(run, problems)
    filter_cases, em_cases, stderr_cases, samples = direct(cfgs)
    fixture = {
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "python_version": platform.python_version(),
        "task_configs": cfgs,
        "test": TEST,
        "train": TRAIN,
        "runs": runs,
        "filter_cases": filter_cases,
        "exact_match_cases": em_cases,
        "stderr_cases": stderr_cases,
        "random_samples": samples,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
    print(f"fixture: {args.out} (lm_eval {fixture['lm_eval_version']}, Python {fixture['python_version']})")
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        sys.exit(1)
    print("python-side consistency: PASS (wire requests == logged samples for every run)")


if __name__ == "__main__":
    main()
