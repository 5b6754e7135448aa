"""`pipe serve` through the real `openai` client (run by openai_client.sh).

    python openai_client.py --base-url http://HOST:PORT --model-dir DIR --model-name NAME

Prints PASS/FAIL per check; exits 1 on any FAIL. See openai_client.sh.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", required=True, help="http://HOST:PORT (no /v1)")
ap.add_argument("--model-dir", required=True)
ap.add_argument("--model-name", required=True)
a = ap.parse_args()

client = openai.OpenAI(base_url=a.base_url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
tok = AutoTokenizer.from_pretrained(a.model_dir)
M = a.model_name
failed = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        failed.append(name)


def guard(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - an exception is that check's FAIL
        check(name, False, f"{type(e).__name__}: {e}")


def chat(content, **kw):
    kw.setdefault("model", M)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def n_prompt(content):
    return len(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True))


Q = "What is the capital of France? Answer in one sentence, then explain why."
GREEDY = {}


def t_health():
    with urllib.request.urlopen(a.base_url.rstrip("/") + "/health") as r:
        check("GET /health", r.status == 200, f"status {r.status}")


def t_models():
    ids = [m.id for m in client.models.list().data]
    check("/v1/models lists the model", M in ids, f"ids {ids}")


def t_chat():
    r = chat(Q, max_tokens=48, temperature=0)
    c, u = r.choices[0], r.usage
    GREEDY["r"] = r
    check("chat: non-empty content", bool(c.message.content), repr(c.message.content))
    check("chat: finish_reason", c.finish_reason in ("stop", "length"), c.finish_reason)
    want = n_prompt(Q)
    check("chat: usage.prompt_tokens = templated prompt tokens", u.prompt_tokens == want,
          f"{u.prompt_tokens} vs {want} (transformers)")
    check("chat: completion_tokens <= max_tokens, total = sum",
          0 < u.completion_tokens <= 48 and u.total_tokens == u.prompt_tokens + u.completion_tokens, str(u))
    r2 = chat(Q, max_tokens=48, temperature=0)
    check("chat: greedy is deterministic", r2.choices[0].message.content == c.message.content)


def t_stream():
    r = GREEDY["r"]
    parts, last = [], None
    for ch in chat(Q, max_tokens=48, temperature=0, stream=True):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            last = ch.choices[0].finish_reason
    text = "".join(parts)
    want = r.choices[0].message.content
    check("stream: chunks concatenate to the non-streamed text", text == want, f"{text!r} vs {want!r}")
    check("stream: last chunk has finish_reason", last == r.choices[0].finish_reason, f"{last} vs {r.choices[0].finish_reason}")


def t_stop():
    full = GREEDY["r"].choices[0].message.content
    words = [w for w in full.split() if len(w) >= 4]
    stop = words[min(2, len(words) - 1)] if words else full[len(full) // 2:][:3]
    want = full[: full.index(stop)]
    for form in (stop, [stop, "\u2603never\u2603"]):
        r = chat(Q, max_tokens=48, temperature=0, stop=form)
        t, f = r.choices[0].message.content or "", r.choices[0].finish_reason
        check(f"stop={form!r}: text lacks it, finish_reason stop, = greedy prefix",
              stop not in t and f == "stop" and t == want, f"{t!r} ({f}); want {want!r}")


def t_length():
    r = chat("Write a long story about a dragon who learns to bake bread.", max_tokens=5, temperature=0)
    check("max_tokens=5: finish_reason length, completion_tokens 5",
          r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5,
          f"{r.choices[0].finish_reason}, {r.usage.completion_tokens}")


def t_seed():
    kw = dict(max_tokens=32, temperature=0.8, seed=1234)
    t1, t2 = (chat("Tell me a fun fact about octopuses.", **kw).choices[0].message.content for _ in range(2))
    check("seed 1234 + temperature 0.8 reproducible", t1 == t2, f"{t1!r} vs {t2!r}")


def t_completions():
    p = "The capital of France is"
    r = client.completions.create(model=M, prompt=p, max_tokens=16, temperature=0)
    want = len(tok(p, add_special_tokens=False).input_ids)
    check("/v1/completions: text, finish_reason, usage",
          bool(r.choices[0].text) and r.choices[0].finish_reason in ("stop", "length")
          and r.usage.prompt_tokens == want and 0 < r.usage.completion_tokens <= 16,
          f"{r.choices[0].text!r} {r.choices[0].finish_reason} {r.usage} (prompt want {want})")


def expect(name, exc, status, fn):
    try:
        fn()
        check(name, False, "no error")
    except openai.APIStatusError as e:
        body = e.response.json().get("error", {})
        shaped = all(k in body for k in ("message", "type", "param", "code"))
        check(name, isinstance(e, exc) and e.status_code == status and shaped,
              f"{type(e).__name__} {e.status_code} {json.dumps(body)}")


def t_errors():
    expect("unknown model -> NotFoundError 404", openai.NotFoundError, 404,
           lambda: chat("hi", model="no-such-model", max_tokens=4))
    expect("temperature 'hot' -> BadRequestError 400", openai.BadRequestError, 400,
           lambda: chat("hi", max_tokens=4, temperature="hot"))
    expect("messages missing -> BadRequestError 400", openai.BadRequestError, 400,
           lambda: client.post("/chat/completions", body={"model": M, "max_tokens": 4}, cast_to=object))
    req = urllib.request.Request(a.base_url.rstrip("/") + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req)
        check("malformed JSON -> 400", False, "no error")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read()).get("error", {})
        check("malformed JSON -> 400", e.code == 400 and "message" in body, f"{e.code} {body}")
    ctx = json.load(open(f"{a.model_dir}/config.json"))["max_position_embeddings"]
    long = "hello " * (ctx + 100)
    expect(f"prompt > max_position_embeddings ({ctx}) -> 413", openai.APIStatusError, 413,
           lambda: chat(long, max_tokens=4))


def t_equivalence():
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?"
    r = chat(q, max_tokens=32, temperature=0)
    ours = r.choices[0].message.content
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    new = out.sequences[0, ids.shape[1]:].tolist()
    theirs = tok.decode(new, skip_special_tokens=True)
    if ours == theirs:
        check("greedy = transformers generate (32 tokens, f32)", True, repr(ours))
        return
    mine = tok(ours, add_special_tokens=False).input_ids
    k = next((i for i, (x, y) in enumerate(zip(mine, new)) if x != y), min(len(mine), len(new)))
    gap = ""
    if k < len(out.scores):
        top = out.scores[k][0].topk(2).values.tolist()
        gap = f"; transformers' top-2 logit gap at that step {top[0] - top[1]:.5f}"
    check("greedy = transformers generate (32 tokens, f32)", False,
          f"first differing token {k}{gap}\n  pipe:         {ours!r}\n  transformers: {theirs!r}")


for name, fn in [("health", t_health), ("models", t_models), ("chat", t_chat), ("stream", t_stream),
                 ("stop", t_stop), ("length", t_length), ("seed", t_seed), ("completions", t_completions),
                 ("errors", t_errors), ("equivalence", t_equivalence)]:
    guard(name, fn)

print(f"\n{'FAIL' if failed else 'PASS'}: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
sys.exit(1 if failed else 0)
