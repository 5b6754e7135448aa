"""pipe's `evaluate` stage vs the real lm-evaluation-harness, on real GSM8K test docs, one real server.

Run through lm_eval_vs_pipe.sh (which builds the workspace and imports the model). This script:
  1. writes the decontaminated test file (the 1,319 GSM8K test lines minus the `excluded_indices`
     ones, in order) for lm_eval, and a stand-in train file (the last 200 decontaminated test
     lines: no GSM8K train split is available offline) for gsm8k's 5-shot exemplars;
  2. starts ONE `pipe serve` on the model folder (port 0) and a recording pass-through proxy in
     front of it (stdlib, 127.0.0.1), so every request body and response of both tools is logged;
  3. per task (gsm8k_cot, then gsm8k): runs the lm_eval CLI (`--model local-chat-completions
     --apply_chat_template --fewshot_as_multiturn --limit N --log_samples`, a local copy of its own
     task yaml with only the dataset swapped for the local files), then pipe's `evaluate` stage
     (the full test file + `exclude:` the same index list, same limit, num_concurrent 1);
  4. compares per doc: the document (pipe's row id == the doc's line in the full file), the request
     body on the wire (messages, stop, max_tokens, temperature, seed), the response text, the
     answer each filter extracts, correctness; and accuracy + stderr per filter (exact floats).
Prints a table and PASS/FAIL; exit status 1 on any difference (the first one is shown in full).
"""

import argparse
import glob
import http.client
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

import yaml

FILTERS = ("strict-match", "flexible-extract")


# ---------------------------------------------------------------- data


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------- server + recording proxy


def start_server(pipe, model_dir, name, log_path, max_batch):
    cmd = [pipe, "serve", model_dir, "--port", "0", "--model-name", name]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
    url = None
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.write(line)
        log.flush()
        m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise SystemExit(f"error: `pipe serve` did not come up; see {log_path}")

    def drain():
        for line in proc.stderr:
            log.write(line)
            log.flush()

    threading.Thread(target=drain, daemon=True).start()
    return proc, url


class Proxy:
    """Forwards every request unchanged to the upstream server and records (tool, body, response)."""

    def __init__(self, upstream):
        u = urllib.parse.urlparse(upstream)
        self.host, self.port = u.hostname, u.port
        self.tag = None  # which tool's run is in progress
        self.replay = None  # {messages JSON: (server's raw reply, text to serve instead)}: no server call
        self.log = []
        self.lock = threading.Lock()

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        hdrs = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, r.getheader("Content-Type", "application/json"), data

    def serve(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _do(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                t0 = time.time()
                chat = method == "POST" and self.path.endswith("/chat/completions")
                if chat and proxy.replay is not None:
                    hit = proxy.replay.get(json.dumps(json.loads(body)["messages"], ensure_ascii=False))
                    if hit is None:
                        status, ctype, data = 404, "application/json", b'{"error": "not a recorded request"}'
                    else:
                        obj = json.loads(hit[0])
                        obj["choices"][0]["message"]["content"] = hit[1]
                        status, ctype, data = 200, "application/json", json.dumps(obj, ensure_ascii=False).encode()
                else:
                    status, ctype, data = proxy.forward(method, self.path, self.headers, body)
                if chat:
                    try:
                        text = json.loads(data)["choices"][0]["message"]["content"]
                    except Exception:  # noqa: BLE001 - record whatever came back
                        text = None
                    with proxy.lock:
                        proxy.log.append(
                            {"tool": proxy.tag, "body": json.loads(body), "status": status, "response": text,
                             "latency_s": time.time() - t0, "raw": data.decode("utf-8", "replace")}
                        )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._do("POST")

            def do_GET(self):
                self._do("GET")

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    def take(self, tool):
        with self.lock:
            return [r for r in self.log if r["tool"] == tool]


# ---------------------------------------------------------------- lm_eval


def write_task_yaml(lm_eval_dir, task, tasks_dir, test, train):
    fname = {"gsm8k_cot": "gsm8k-cot.yaml", "gsm8k": "gsm8k.yaml"}[task]
    with open(os.path.join(lm_eval_dir, "tasks", "gsm8k", fname), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    assert cfg["task"] == task, cfg["task"]
    cfg.pop("dataset_name", None)
    cfg.pop("tag", None)
    cfg["task"] = f"local_{task}"
    cfg["dataset_path"] = "json"
    cfg["dataset_kwargs"] = {"data_files": {"test": test, "train": train}}
    with open(os.path.join(tasks_dir, f"local_{task}.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)


def run_lm_eval(args, task, base, out_dir, env):
    cmd = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-chat-completions",
        "--model_args",
        f"model={args.model_name},base_url={base}/chat/completions,num_concurrent=1,max_retries=3,"
        "tokenized_requests=False,timeout=3600",
        "--tasks", f"local_{task}",
        "--include_path", os.path.join(args.work, "tasks"),
        "--apply_chat_template", "--fewshot_as_multiturn",
        "--limit", str(args.limit),
        "--log_samples", "--output_path", out_dir,
    ]
    print("$ lm_eval " + " ".join(cmd[3:]), flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.time()
    log_path = os.path.join(out_dir + ".log")
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=args.work)
    wall = time.time() - t0
    if rc != 0:
        sys.stdout.write(open(log_path, encoding="utf-8").read()[-4000:])
        raise SystemExit(f"FAIL: lm_eval exited {rc} (log {log_path})")
    res_files = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    smp_files = glob.glob(os.path.join(out_dir, "**", f"samples_local_{task}_*.jsonl"), recursive=True)
    assert len(res_files) == 1 and len(smp_files) == 1, (res_files, smp_files)
    with open(res_files[0], encoding="utf-8") as f:
        res = json.load(f)
    r = res["results"][f"local_{task}"]
    metrics = {flt: (r[f"exact_match,{flt}"], r[f"exact_match_stderr,{flt}"]) for flt in FILTERS}
    docs = {}
    for s in read_jsonl(smp_files[0]):
        e = docs.setdefault(s["doc_id"], {"doc": s["doc"], "target": s["target"], "filtered": {}, "em": {}})
        a = s["arguments"]
        arg0, arg1 = (a[0][0], a[0][1]) if isinstance(a, list) else (a["gen_args_0"]["arg_0"], a["gen_args_0"]["arg_1"])
        # a JsonChatStr (the chat as a JSON string), logged as [prompt] (or {"prompt": ...})
        arg0 = arg0.get("prompt", arg0) if isinstance(arg0, dict) else arg0
        arg0 = arg0[0] if isinstance(arg0, list) and len(arg0) == 1 and isinstance(arg0[0], str) else arg0
        e["messages"] = json.loads(arg0)
        e["gen_kwargs"] = arg1
        e["response"] = s["resps"][0][0]
        fr = s["filtered_resps"]
        e["filtered"][s["filter"]] = fr[0] if isinstance(fr, list) else fr
        e["em"][s["filter"]] = float(s["exact_match"])
    return {"metrics": metrics, "docs": docs, "wall": wall, "n_shot": res.get("n-shot", {}).get(f"local_{task}"),
            "version": res.get("lm_eval_version") or res.get("config", {}).get("lm_eval_version")}


# ---------------------------------------------------------------- pipe


def run_pipe(args, task, base, ws, stage):
    params = {
        "kind": "evaluate",
        "endpoint": base,
        "model": args.model_name,
        "task": task,
        "data_file": "data/test.jsonl",
        "exclude": "data/sources.json",
        "limit": args.limit,
        "num_concurrent": 1,
        "fewshot_as_multiturn": True,
    }
    if task == "gsm8k":
        params["fewshot_file"] = "data/train.jsonl"
    with open(os.path.join(ws, "pipeline.yaml"), encoding="utf-8") as f:
        pl = yaml.safe_load(f)
    pl["stages"][stage] = params
    with open(os.path.join(ws, "pipeline.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(pl, f, sort_keys=False)
    cmd = [args.pipe, "run", "pipeline.yaml", stage, "--force", stage]
    print("$ pipe " + " ".join(cmd[1:]) + f"   # in {ws}", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ws, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.stdout.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"FAIL: pipe run exited {p.returncode}")
    out = subprocess.run([args.pipe, "show", stage, "--path"], cwd=ws, capture_output=True, text=True, check=True)
    folder = out.stdout.strip()
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    metrics = {flt: (res["filters"][flt]["exact_match"], res["filters"][flt]["exact_match_stderr"]) for flt in FILTERS}
    return {"metrics": metrics, "samples": read_jsonl(os.path.join(folder, "samples.jsonl")), "wall": wall,
            "folder": folder, "n": res.get("n")}


# ---------------------------------------------------------------- replay pass


def replay_map(task, lm, wire):
    """The model is too weak to get anything right (SmolLM2-135M: ~1-2% on GSM8K), which leaves the
    correct-answer paths untested. So a second pass serves, for the very same requests, the server's
    real responses rewritten by doc index: i % 4 == 0 unchanged; 1: real + the gold answer appended in
    the task's format; 2: only the gold answer, formatted "$1,234" / "#### 1,234" when it is an integer; 3: real +
    a wrong answer. Both tools see identical bytes; the scoring (filters, exact_match, mean, stderr)
    must then agree on a mix of right and wrong answers."""
    by_msgs = {json.dumps(d["messages"], ensure_ascii=False): (i, d) for i, d in lm["docs"].items()}
    out = {}
    for r in wire:
        k = json.dumps(r["body"]["messages"], ensure_ascii=False)
        i, d = by_msgs[k]
        gold = d["target"].split("####")[-1].strip()
        fancy = f"${int(gold):,}" if re.fullmatch(r"-?[0-9]+", gold) else gold
        cot = task == "gsm8k_cot"
        text = r["response"] or ""
        text = [
            text,
            text + (f"\nThe answer is {gold}." if cot else f"\n#### {gold}"),
            f"The answer is {fancy}." if cot else f"So the total is {fancy}.\n#### {fancy.lstrip('$')}",
            text + (f"\nThe answer is {gold}1." if cot else f"\n#### {gold}1"),
        ][i % 4]
        out[k] = (r["raw"], text)
    return out


# ---------------------------------------------------------------- compare


def pct(x):
    return "  n/a " if x is None else f"{100 * x:6.2f}"


def compare(task, args, kept, test, lm, pp, wire_lm, wire_pp):
    """Returns (problems, table rows, agreement counts)."""
    probs = []
    n = args.limit

    def prob(msg, a=None, b=None):
        if a is not None or b is not None:
            msg += f"\n    lm_eval: {json.dumps(a, ensure_ascii=False)[:3000]}\n    pipe:    {json.dumps(b, ensure_ascii=False)[:3000]}"
        probs.append(msg)

    if sorted(lm["docs"]) != list(range(n)):
        prob(f"lm_eval logged doc ids {sorted(lm['docs'])[:5]}..., want 0..{n - 1}")
    if len(pp["samples"]) != n:
        prob(f"pipe wrote {len(pp['samples'])} samples, want {n}")
    if len(wire_lm) != n or len(wire_pp) != n:
        prob(f"requests on the wire: lm_eval {len(wire_lm)}, pipe {len(wire_pp)}, want {n} each")
    key = lambda b: json.dumps(b["messages"], ensure_ascii=False)  # noqa: E731
    wl = {key(r["body"]): r for r in wire_lm}
    wp = {key(r["body"]): r for r in wire_pp}
    agree = {f: 0 for f in FILTERS}
    same_resp = same_prompt = same_body = 0
    first_resp_diff = None
    for i in range(min(n, len(pp["samples"]))):
        d, s = lm["docs"].get(i), pp["samples"][i]
        if d is None:
            continue
        # the same document: pipe's id is the row in the full file, lm_eval's doc i is the i-th kept row
        if s["id"] != kept[i]:
            prob(f"doc {i}: pipe row id {s['id']}, want {kept[i]} (the {i}-th row not excluded)")
        if d["doc"] != test[kept[i]] or s["question"] != test[kept[i]]["question"]:
            prob(f"doc {i}: question differs", d["doc"]["question"], s["question"])
        if d["target"] != s["target"]:
            prob(f"doc {i}: target differs", d["target"], s["target"])
        # the prompt, as logged and as sent
        if d["messages"] == s["messages"]:
            same_prompt += 1
        else:
            prob(f"doc {i}: prompt messages differ", d["messages"], s["messages"])
        rl, rp = wl.get(key(d)), wp.get(key(s))
        if rl is None or rp is None:
            prob(f"doc {i}: request not seen on the wire (lm_eval {rl is not None}, pipe {rp is not None})")
        else:
            bl = {k: v for k, v in rl["body"].items()}
            bp = {k: v for k, v in rp["body"].items()}
            if bl == bp:
                same_body += 1
            else:
                keys = sorted(k for k in set(bl) | set(bp) if bl.get(k) != bp.get(k))
                prob(f"doc {i}: request bodies differ in {keys}", {k: bl.get(k) for k in keys}, {k: bp.get(k) for k in keys})
            if rl["response"] != d["response"]:
                prob(f"doc {i}: lm_eval logged a response other than the server's", rl["response"], d["response"])
            if rp["response"] != s["response"]:
                prob(f"doc {i}: pipe recorded a response other than the server's", rp["response"], s["response"])
        # the response and its scoring
        if d["response"] == s["response"]:
            same_resp += 1
        elif first_resp_diff is None:
            a, b = d["response"], s["response"]
            k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
            first_resp_diff = (i, k, a, b)
            prob(f"doc {i}: response differs from char {k} (same request body: {rl is not None and rp is not None and rl['body'] == rp['body']})", a, b)
        for f in FILTERS:
            xl, xp = d["filtered"][f], s["extracted"][f]
            cl, cp = d["em"][f] == 1.0, bool(s["correct"][f])
            if xl == xp and cl == cp:
                agree[f] += 1
            elif d["response"] == s["response"]:
                # same text, different scoring: a real bug in pipe's filters/metric
                prob(f"doc {i} {f}: same response, extracted/correct differ", [xl, cl], [xp, cp])
    for f in FILTERS:
        (al, sl), (ap, sp) = lm["metrics"][f], pp["metrics"][f]
        if al != ap or not (sl == sp or (sl in (None, "N/A") and sp is None)):
            prob(f"{f}: accuracy/stderr differ", [al, sl], [ap, sp])
    stats = {"prompt": same_prompt, "body": same_body, "response": same_resp, "agree": agree}
    return probs, stats


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipe", required=True)
    ap.add_argument("--model-dir", required=True, help="HF folder of the model (pipe show base --path)")
    ap.add_argument("--model-name", default="smollm2-135m-instruct")
    ap.add_argument("--ws", required=True, help="pipe workspace with data/test.jsonl and data/sources.json")
    ap.add_argument("--work", required=True, help="scratch dir for lm_eval")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--tasks", default="gsm8k_cot,gsm8k")
    ap.add_argument("--max-batch", type=int, default=0)
    args = ap.parse_args()

    import lm_eval

    test = read_jsonl(os.path.join(args.ws, "data", "test.jsonl"))
    with open(os.path.join(args.ws, "data", "sources.json"), encoding="utf-8") as f:
        excluded = set(json.load(f)["excluded_indices"])
    kept = [i for i in range(len(test)) if i not in excluded]
    print(f"GSM8K test: {len(test)} docs, {len(excluded)} excluded, {len(kept)} kept; evaluating the first {args.limit}")
    if args.limit + 200 > len(kept):
        raise SystemExit("error: --limit too large: the stand-in train file is the last 200 kept docs")
    os.makedirs(os.path.join(args.work, "tasks"), exist_ok=True)
    dec = os.path.join(args.work, "test-decontaminated.jsonl")
    write_jsonl(dec, [test[i] for i in kept])
    train_rows = [test[i] for i in kept[-200:]]
    write_jsonl(os.path.join(args.work, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(args.ws, "data", "train.jsonl"), train_rows)
    lm_dir = os.path.dirname(lm_eval.__file__)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        write_task_yaml(lm_dir, t, os.path.join(args.work, "tasks"), dec, os.path.join(args.work, "train.jsonl"))

    env = dict(os.environ, HF_HOME=os.path.join(args.work, "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    server, upstream = start_server(args.pipe, args.model_dir, args.model_name,
                                    os.path.join(args.work, "serve.log"), args.max_batch)
    all_probs, rows = [], []
    proxy = Proxy(upstream)
    try:
        psrv = proxy.serve()
        base = f"http://127.0.0.1:{psrv.server_address[1]}/v1"
        print(f"pipe serve: {upstream} (pid {server.pid}), recording proxy: {base}")
        for task in tasks:
            for replay in (False, True):
                label = f"{task}+replay" if replay else task
                proxy.replay = replay_map(task, rows[-1][1], proxy.take(f"lm_eval/{task}")) if replay else None
                proxy.tag = f"lm_eval/{label}"
                lm = run_lm_eval(args, task, base, os.path.join(args.work, f"lm_eval-{label}"), env)
                print(f"  lm_eval {lm['version']}: {label} {lm['n_shot']}-shot, {args.limit} docs in {lm['wall']:.0f} s")
                proxy.tag = f"pipe/{label}"
                stage = f"eval_{task}" + ("_replay" if replay else "")
                pp = run_pipe(args, task, base, args.ws, stage)
                print(f"  pipe evaluate: {label}, {pp['n']} docs in {pp['wall']:.0f} s ({pp['folder']})")
                proxy.tag = proxy.replay = None
                probs, st = compare(task, args, kept, test, lm, pp, proxy.take(f"lm_eval/{label}"), proxy.take(f"pipe/{label}"))
                all_probs += [f"{label}: {p}" for p in probs]
                rows.append((label, lm, pp, st))
    finally:
        with open(os.path.join(args.work, "wire.json"), "w", encoding="utf-8") as f:
            json.dump(proxy.log, f, ensure_ascii=False, indent=1)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    n = args.limit
    print()
    print(f"{'task':16} {'filter':17} | {'lm_eval acc ± stderr':>22} | {'pipe acc ± stderr':>22} | per-sample agreement")
    for task, lm, pp, st in rows:
        for f in FILTERS:
            (al, sl), (ap_, sp) = lm["metrics"][f], pp["metrics"][f]
            sl = sl if isinstance(sl, float) else None
            print(f"{task:16} {f:17} | {pct(al)}% ± {pct(sl)}%     | {pct(ap_)}% ± {pct(sp)}%     | "
                  f"{st['agree'][f]}/{n} (extracted + correct)")
        print(f"{task:16} {'':17}   same prompt {st['prompt']}/{n}, same request body {st['body']}/{n}, "
              f"same response {st['response']}/{n}; wall: lm_eval {lm['wall']:.0f} s, pipe {pp['wall']:.0f} s")
    print()
    if all_probs:
        for p in all_probs[:20]:
            print("MISMATCH " + p)
        if len(all_probs) > 20:
            print(f"... and {len(all_probs) - 20} more")
        print(f"FAIL: {len(all_probs)} difference(s) between lm_eval and pipe evaluate (details in {args.work})")
        sys.exit(1)
    print(f"PASS: pipe evaluate == lm_eval on {n} real GSM8K docs per task ({', '.join(tasks)}; +replay: the same "
          "requests answered with rewritten responses): same prompts, request bodies, responses, extracted answers, "
          "correctness, accuracy and stderr")


if __name__ == "__main__":
    main()
