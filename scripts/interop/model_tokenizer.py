"""Compare the tokenizer.json pipe rebuilt from a GGUF with transformers.

Run through model_tokenizer.sh (it builds the model folder with `pipe run`).

    --ours DIR   the `model` stage's output folder (tokenizer.json, tokenizer_config.json)
    --gguf FILE  the GGUF it was imported from

Checks, each as identical-ids counts over the same texts:
  1. `transformers.AutoTokenizer` on our folder (PreTrainedTokenizerFast over
     our tokenizer.json) vs the raw `tokenizers.Tokenizer` over it: must be 100%.
  2. ours vs `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, the
     tokenizer transformers itself builds from the GGUF vocabulary (reported).
     transformers' converter gives every BPE GGUF a plain GPT-2 ByteLevel
     pre-tokenizer and ignores `tokenizer.ggml.pre`; for `smollm` llama.cpp
     (and SmolLM2's original tokenizer.json) isolate digits first, so a
     whitespace run right before a digit splits differently. 2b proves that
     is the only difference: ours with transformers' pre-tokenizer swapped in
     must match it exactly.
  3. `apply_chat_template` on conversations: ours vs transformers' GGUF tokenizer.
Exit status 1 if any check but 2 is below 100%.
"""

import argparse
import glob
import json
import os
import random
import sys
import sysconfig

from tokenizers import Tokenizer
from transformers import AutoTokenizer


def gsm8k_like(n, seed=0):
    rnd = random.Random(seed)
    names = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "José", "Zoë"]
    items = ["clips", "dollars", "pages", "eggs", "cupcakes", "marbles", "apples", "books"]
    forms = [
        "{w} sold {a} {i} in April, and then she sold half as many {i} in May. How many {i} did {w} sell altogether?",
        "{w} earns ${b} an hour for babysitting. Yesterday, she just did {a} minutes of babysitting. How much did she earn?",
        "{w} is saving money for a new wallet which costs ${c}.{b:02d}. She has only 50% of the money she needs.",
        "Question: {w} can read {a} pages per hour... If {w}'s book has {c} pages, how long will it take?\nAnswer: {c} / {a}",
        "{w} doesn't like {i}; she'll trade them \u2014 {a}\u00d7{b} \u2014 for \u2018nice\u2019 things \U0001f642",
        "  Step {b}:\tmultiply {a} by {b}\n\n  then add {c}.   Done!!  ",
        "They've got {b} more than Ken, who'd had 1,{c:03d} before; we're told it's 3.5x.",
        "#### {c}",
        "In {b} years, {w} will be {a} years old; {b}% of {c} is {d}.",
        "<|im_start|>user\n{w} has {a} {i}.<|im_end|>\n<|im_start|>assistant\n{a} - {b} = {d}<|im_end|>\n",
    ]
    out = []
    for k in range(n):
        a, b, c = rnd.randint(1, 99), rnd.randint(1, 12), rnd.randint(1, 2000)
        out.append(forms[k % len(forms)].format(w=rnd.choice(names), i=rnd.choice(items), a=a, b=b, c=c, d=a * b))
    return out


def stdlib_lines(n):
    """Real text: lines and small blocks of the Python standard library's sources."""
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))[:40]
    lines, blocks = [], []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            src = fh.read().splitlines()
        lines.extend(l for l in src if l.strip())
        blocks.extend("\n".join(src[i : i + 6]) for i in range(0, min(len(src), 60), 6))
    rnd = random.Random(1)
    rnd.shuffle(lines)
    rnd.shuffle(blocks)
    return lines[: n // 2] + blocks[: n // 2]


def multilingual():
    return [
        "Le cœur a ses raisons que la raison ne connaît point.",
        "Größenordnung: 3,5 × 10⁶ Äpfel für Straßenbäume.",
        "東京は日本の首都です。人口は約1400万人。",
        "Привет, как дела? Всё хорошо, спасибо!",
        "مرحبا بالعالم 123",
        "emoji 🙂🚀👍🏽 and math ∑ᵢ xᵢ² ≤ ∞",
        "tabs\tand\u00a0non-breaking\u2009thin spaces",
        "   leading and trailing   ",
        "\n\n\nnewlines\r\nwindows\rline endings\n",
        "CamelCaseIdentifiers and snake_case_names and kebab-case-words",
    ]


def compare(name, a, b, texts, show=3):
    same, diffs = 0, []
    for t in texts:
        x, y = a(t), b(t)
        if x == y:
            same += 1
        elif len(diffs) < show:
            diffs.append((t, x, y))
    rate = same / len(texts) if texts else 1.0
    print(f"{name}: {same}/{len(texts)} identical ({rate:.2%})")
    for t, x, y in diffs:
        print(f"  text: {t!r}\n    ours:         {x}\n    transformers: {y}")
    return rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--gguf", required=True)
    args = ap.parse_args()

    raw = Tokenizer.from_file(os.path.join(args.ours, "tokenizer.json"))
    ours = AutoTokenizer.from_pretrained(args.ours)
    # transformers guards its GGUF reader with `is_torch_available()` even for
    # metadata only (return_tensors=False, the tokenizer path), which never
    # touches torch; we install no torch (~GBs), so lift the guard here.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.is_torch_available = lambda: True
    ref = AutoTokenizer.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))
    print(f"ours: {type(ours).__name__}, vocab {len(ours)}; transformers from GGUF: {type(ref).__name__}, vocab {len(ref)}")
    ours_v, ref_v = ours.get_vocab(), ref.get_vocab()
    print(f"vocab entries that differ: {sum(1 for k, v in ref_v.items() if ours_v.get(k) != v)}")
    ref_pre = json.loads(ref.backend_tokenizer.to_str()).get("pre_tokenizer")
    print(f"transformers' pre_tokenizer for the GGUF: {json.dumps(ref_pre)}")

    corpora = {
        "gsm8k-like": gsm8k_like(300),
        "stdlib lines": stdlib_lines(300),
        "multilingual": multilingual(),
    }
    enc = lambda tok: (lambda t: tok(t, add_special_tokens=False)["input_ids"])
    swapped_json = json.loads(raw.to_str())
    swapped_json["pre_tokenizer"] = ref_pre
    swapped = Tokenizer.from_str(json.dumps(swapped_json))
    rates = []
    for cname, texts in corpora.items():
        rates.append(compare(f"[{cname}] PreTrainedTokenizerFast(ours) vs tokenizers(ours)", enc(ours), lambda t: raw.encode(t, add_special_tokens=False).ids, texts))
        compare(f"[{cname}] ours vs transformers' GGUF tokenizer", enc(ours), enc(ref), texts)
        rates.append(compare(f"[{cname}] ours with transformers' pre-tokenizer vs transformers' GGUF tokenizer", lambda t: swapped.encode(t, add_special_tokens=False).ids, enc(ref), texts))
        rates.append(compare(f"[{cname}] decode(encode(x)) == x (ours)", lambda t: ours.decode(enc(ours)(t)), lambda t: t, texts))

    rnd = random.Random(2)
    qs = gsm8k_like(50, seed=3)
    convos = []
    for k, q in enumerate(qs):
        c = [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {rnd.randint(1, 999)}."}]
        if k % 2:
            c.insert(0, {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"})
        convos.append(c)
    for gen in (False, True):
        tpl = lambda tok: (lambda c: tok.apply_chat_template(c[:-1] if gen else c, tokenize=True, add_generation_prompt=gen))
        same_text = sum(
            ours.apply_chat_template(c, tokenize=False) == ref.apply_chat_template(c, tokenize=False) for c in convos
        )
        print(f"[chat template, add_generation_prompt={gen}] rendered text identical: {same_text}/{len(convos)}")
        rates.append(compare(f"[chat template, add_generation_prompt={gen}] ours vs transformers' GGUF tokenizer", tpl(ours), tpl(ref), convos))
    sys.exit(0 if all(r == 1.0 for r in rates) else 1)


if __name__ == "__main__":
    main()
