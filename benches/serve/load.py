"""Load generator for any OpenAI-compatible server (benches/serve.sh).

    python load.py --base-url http://127.0.0.1:8000/v1 [--model NAME] [--max-tokens 64]
                   [--concurrency 1,8,32,64] [--rounds 1]

Prompts: benches/serve/prompts.py as single user messages (the server applies
the chat template). Every request: max_tokens M, temperature 0, and
"ignore_eos": true (as vLLM) so each generates exactly M tokens. Standard
library only, so it also runs on the GPU machine.
After one untimed warmup request, prints JSON lines:
  stream1      one streamed request: ttft_s (send -> first content chunk) and
               decode_tok_s = (tokens - 1) / (last chunk - first chunk), tokens
               from usage (stream_options include_usage) else M; gap_p50_ms,
               gap_max_ms, gap_top_ms: the intervals between chunks
  concurrency  C threads each send ROUNDS requests back to back (C in flight);
               total_tok_s = sum(usage.completion_tokens) / wall_s of the level;
               exact = every request returned completion_tokens == M;
               others_cpus = CPUs kept busy meanwhile by processes other than
               this one and --server-pid (Linux; > ~0.2: the figure is disturbed)
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompts import messages  # noqa: E402


class Client:
    """The few OpenAI calls the benchmark makes, on the standard library only
    (the GPU machine has no `openai` package): one keep-alive connection per
    thread, plain and SSE-streamed chat completions."""

    def __init__(self, base_url):
        u = urllib.parse.urlparse(base_url)
        self.host, self.port, self.path = u.hostname, u.port or 80, u.path.rstrip("/")

    def _conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=3600)

    def models(self):
        c = self._conn()
        c.request("GET", self.path + "/models")
        return json.loads(c.getresponse().read())["data"]

    def chat(self, body, conn=None):
        c = conn or self._conn()
        c.request("POST", self.path + "/chat/completions", json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        if not body.get("stream"):
            data = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {data}")
            return data
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()!r}")
        return (json.loads(line[6:]) for line in (raw.decode().strip() for raw in r)
                if line.startswith("data: ") and line != "data: [DONE]")


def cpu_s(pid=None):
    """CPU seconds: the whole machine's busy time (pid None, /proc/stat) or a process's."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        if pid is None:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / hz
    except (OSError, ValueError, IndexError):
        return None


def gap_stats(stamps):
    """The intervals between streamed chunks: median and largest (ms), and
    the three largest with their index (a stall, or tokens in bursts)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not gaps:
        return {}
    top = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:3]
    return {"gap_p50_ms": round(1e3 * sorted(gaps)[len(gaps) // 2], 3),
            "gap_max_ms": round(1e3 * max(gaps), 3),
            "gap_top_ms": [[i, round(1e3 * gaps[i], 3)] for i in top]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", help="default: the first of /v1/models")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=1, help="requests per thread at each level")
    ap.add_argument("--server-pid", type=int, help="the server's pid, for others_cpus")
    a = ap.parse_args()
    m = a.max_tokens
    client = Client(a.base_url)
    model = a.model or client.models()[0]["id"]
    kw = dict(model=model, max_tokens=m, temperature=0, ignore_eos=True)

    def one(i, conn=None):
        return client.chat(dict(messages=messages(i), **kw), conn)["usage"]["completion_tokens"]

    one(0)  # warmup

    # batch-1 decode speed, streamed
    t0 = time.perf_counter()
    stamps, usage = [], None
    for ch in client.chat(dict(messages=messages(0), stream=True, stream_options={"include_usage": True}, **kw)):
        if ch.get("choices") and ch["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
        if ch.get("usage"):
            usage = ch["usage"]["completion_tokens"]
    n = usage or m
    print(json.dumps({"bench": "load", "event": "stream1", "model": model, "max_tokens": m,
                      "tokens": n, "chunks": len(stamps), "usage_reported": usage is not None,
                      "ttft_s": round(stamps[0] - t0, 4),
                      "decode_tok_s": round((n - 1) / (stamps[-1] - stamps[0]), 2) if n > 1 else None,
                      **gap_stats(stamps)}), flush=True)

    for c in [int(x) for x in a.concurrency.split(",")]:
        def worker(w):
            conn = client._conn()
            return [one(w * a.rounds + k, conn) for k in range(a.rounds)]
        pids = [os.getpid()] + ([a.server_pid] if a.server_pid else [])
        c0 = [cpu_s()] + [cpu_s(p) for p in pids]
        t = time.perf_counter()
        with ThreadPoolExecutor(c) as ex:
            toks = [x for xs in ex.map(worker, range(c)) for x in xs]
        wall = time.perf_counter() - t
        c1 = [cpu_s()] + [cpu_s(p) for p in pids]
        others = None if None in c0 + c1 else round(max(0.0, (c1[0] - c0[0] - sum(c1[1:]) + sum(c0[1:])) / wall), 2)
        print(json.dumps({"bench": "load", "event": "concurrency", "concurrency": c, "requests": len(toks),
                          "completion_tokens": sum(toks), "exact": all(x == m for x in toks),
                          "wall_s": round(wall, 3), "total_tok_s": round(sum(toks) / wall, 2), "others_cpus": others}), flush=True)


if __name__ == "__main__":
    main()
