"""Compare pipe's `train` outputs with what `peft` / `transformers` make of them.

Run through peft_lora.sh (it trains the models with `pipe run`).

    --logits-bin FILE      pipe's `logits` example (stages/examples/logits.rs)
    --base DIR             the `model` stage's f32 HF folder
    --adapter NAME=DIR     a LoRA `train` output (repeatable)
    --full NAME=DIR        a full fine-tune `train` output (repeatable)
    --merged NAME=DIR=ADAPTER_DIR  a `merge` output and the adapter it folded in

Checks (each prints PASS/FAIL; exit status 1 if any fails):
  base      transformers vs pipe logits on the base (the reference point).
  adapter   adapter_config.json parses as a `LoraConfig` with the fields PEFT
            reads; the safetensors keys and shapes are exactly those PEFT's
            own `get_peft_model_state_dict` gives for that config on this base;
            `PeftModel.from_pretrained` warns about no missing or unexpected
            keys (other warnings are printed) and a second `load_adapter`
            reports no missing/unexpected adapter keys; with modules_to_save,
            lm_head is PEFT's trainable copy and the embedding is untouched;
            logits of base+adapter: PEFT vs pipe (`Llama::load_peft`).
  full      `AutoModelForCausalLM.from_pretrained` reports no missing,
            unexpected or mismatched keys; logits: transformers vs pipe.
  merged    as `full` for the merged folder, and its transformers logits vs
            pipe's base+adapter logits (f32; bound 2e-4: the merged weights
            are rounded to f32 once more).

Logits are compared twice:
  f64  both sides in f64 end to end (pipe's `logits --f64`; transformers in
       float64 with sdpa attention, and the two places where transformers'
       Llama computes in f32 whatever the model dtype, RMSNorm and the RoPE
       tables, patched to keep f64). Bound 1e-8: any difference in the math
       (RoPE, scaling, eps, tying, LoRA scale, key mapping) shows up here.
  f32  both sides in f32 (transformers eager attention). Spec bound 1e-4. On
       SmolLM2-135M (logits up to ~40) each side's own f32 result is already
       ~1e-4 away from its f64 result, so two correct f32 implementations can
       differ by a bit more than 1e-4: if the f64 check passes and the f32
       difference is within the sum of both sides' own f32 rounding errors, the
       line says PASS (f32 rounding) and prints those errors. PEFT_INTEROP_STRICT_F32=1
       makes the 1e-4 bound strict.
Each fine-tuned model must also be clearly away from the base (max abs logit
change > 1e-2), or the comparison would prove nothing.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama

BOUND = 1e-4
F64_BOUND = 1e-8
STRICT_F32 = os.environ.get("PEFT_INTEROP_STRICT_F32") == "1"
MOVED = 1e-2
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "How do I boil an egg?"},
     {"role": "assistant", "content": "Put it in boiling water for about nine minutes."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "2 + 2 = ?"}],
]

failures = []


def report(ok, what, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {what}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(what)


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


# transformers' Llama runs RMSNorm and builds the RoPE tables in f32 whatever
# the model dtype; for the f64 comparison, keep those in f64 too.
_rms_f32 = modeling_llama.LlamaRMSNorm.forward
_rope_f32 = modeling_llama.LlamaRotaryEmbedding.forward


def _rms(self, h):
    if h.dtype != torch.float64:
        return _rms_f32(self, h)
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope(self, x, position_ids):
    c = self.config
    if x.dtype != torch.float64 or getattr(self, "rope_type", "default") != "default":
        return _rope_f32(self, x, position_ids)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    f = position_ids[:, :, None].double() * inv[None, None, :]
    e = torch.cat((f, f), dim=-1)
    return e.cos() * self.attention_scaling, e.sin() * self.attention_scaling


modeling_llama.LlamaRMSNorm.forward = _rms
modeling_llama.LlamaRotaryEmbedding.forward = _rope


def pipe_logits(binary, ids, base, adapter=None, f64=False):
    cmd = [binary] + (["--f64"] if f64 else []) + [base] + ([adapter] if adapter else [])
    out = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr}")
    return [np.asarray(x, dtype=np.float64) for x in json.loads(out.stdout)]


def hf_logits(model, ids):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0].double().numpy() for s in ids]


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def load_base(path, f64=False):
    if f64:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def compare(what, ref, args, ids, build, base, adapter=None):
    """f64 and f32 logits of `build(f64)` (a transformers/PEFT model) vs pipe's; returns the f32 ones."""
    p64 = pipe_logits(args.logits_bin, ids, base, adapter, f64=True)
    t64 = hf_logits(build(True), ids)
    d64 = max_diff(p64, t64)
    report(d64 < F64_BOUND, f"{what}: logits in f64, {ref} vs pipe", f"max abs diff {d64:.3e} (bound {F64_BOUND:g})")
    p32 = pipe_logits(args.logits_bin, ids, base, adapter)
    t32 = hf_logits(build(False), ids)
    d32, ep, et = max_diff(p32, t32), max_diff(p32, p64), max_diff(t32, t64)
    own = f"own f32 error vs f64: pipe {ep:.3e}, {ref} {et:.3e}"
    if d32 < BOUND:
        report(True, f"{what}: logits in f32, {ref} vs pipe", f"max abs diff {d32:.3e} (bound {BOUND:g}; {own})")
    elif not STRICT_F32 and d64 < F64_BOUND and d32 <= ep + et:
        print(f"PASS (f32 rounding)  {what}: logits in f32, {ref} vs pipe: max abs diff {d32:.3e} "
              f"> {BOUND:g} but within both sides' own f32 rounding ({own})")
    else:
        report(False, f"{what}: logits in f32, {ref} vs pipe", f"max abs diff {d32:.3e} (bound {BOUND:g}; {own})")
    return t32


def check_adapter(name, adir, args, ids, base_hf):
    with open(f"{adir}/adapter_config.json") as f:
        raw = json.load(f)
    # 1. adapter_config.json: parses, and the fields PEFT reads say what we trained.
    cap = Captured()
    logging.getLogger().addHandler(cap)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = LoraConfig.from_pretrained(adir)
    logging.getLogger().removeHandler(cap)
    msgs = [str(x.message) for x in w] + cap.records
    want_mts = raw.get("modules_to_save")
    fields = {
        "peft_type": (str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type), "LORA"),
        "task_type": (str(cfg.task_type.value if hasattr(cfg.task_type, "value") else cfg.task_type), "CAUSAL_LM"),
        "r": (cfg.r, 8),
        "lora_alpha": (cfg.lora_alpha, 16),
        "target_modules": (set(cfg.target_modules), ALL_LINEAR),
        "modules_to_save": (cfg.modules_to_save, want_mts),
        "use_rslora": (cfg.use_rslora, False),
        "use_dora": (cfg.use_dora, False),
        "bias": (cfg.bias, "none"),
        "fan_in_fan_out": (cfg.fan_in_fan_out, False),
    }
    bad = {k: v for k, v in fields.items() if v[0] != v[1]}
    report(not bad and not msgs, f"{name}: adapter_config.json as PEFT reads it",
           f"r={cfg.r} lora_alpha={cfg.lora_alpha} targets={sorted(cfg.target_modules)} "
           f"modules_to_save={cfg.modules_to_save}"
           + (f"; wrong: {bad}" if bad else "") + (f"; warnings: {msgs}" if msgs else ""))

    # 2. Key names and shapes: exactly what PEFT would save for this config.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our own model: its warnings are not about pipe's files
        fresh = get_peft_model(load_base(args.base), LoraConfig.from_pretrained(adir))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    del fresh
    with safe_open(f"{adir}/adapter_model.safetensors", "pt") as f:
        ours = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata() or {}
    missing, extra = sorted(set(want) - set(ours)), sorted(set(ours) - set(want))
    shapes = [k for k in set(want) & set(ours) if want[k] != ours[k]]
    report(not missing and not extra and not shapes and meta.get("format") == "pt",
           f"{name}: adapter tensors vs PEFT's own state dict",
           f"{len(ours)} tensors" + (f"; missing {missing[:5]}" if missing else "")
           + (f"; unexpected {extra[:5]}" if extra else "") + (f"; shape mismatch {shapes[:5]}" if shapes else "")
           + ("" if meta.get("format") == "pt" else f"; metadata {meta}"))

    # 3. PeftModel.from_pretrained: no warnings at all; load_adapter's own report.
    model = load_base(args.base)
    cap = Captured()
    logging.getLogger().addHandler(cap)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adir)
    logging.getLogger().removeHandler(cap)
    msgs = [str(x.message) for x in w] + cap.records
    key_msgs = [m for m in msgs if "missing" in m.lower() or "unexpected" in m.lower()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same ones as above
        probe = model.load_adapter(adir, adapter_name="probe")
    p_missing = [k for k in probe.missing_keys if "probe" in k]
    p_unexpected = list(probe.unexpected_keys)
    model.delete_adapter("probe")
    model.set_adapter("default")
    report(not key_msgs and not p_missing and not p_unexpected,
           f"{name}: PeftModel.from_pretrained loads it cleanly",
           f"{len(msgs)} warning(s)" + (f" {msgs}" if msgs else "")
           + (f"; missing adapter keys {p_missing[:5]}" if p_missing else "")
           + (f"; unexpected keys {p_unexpected[:5]}" if p_unexpected else ""))
    model.eval()

    # 4. modules_to_save on a tied model: PEFT gives lm_head a trainable copy,
    # the embedding stays the base's.
    if want_mts:
        inner = model.base_model.model
        head = inner.lm_head
        copy = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else None
        emb_same = torch.equal(inner.model.embed_tokens.weight, base_hf.model.embed_tokens.weight)
        untied = copy is not None and copy.weight.data_ptr() != inner.model.embed_tokens.weight.data_ptr()
        moved = copy is not None and not torch.equal(copy.weight, base_hf.lm_head.weight)
        report(copy is not None and emb_same and untied and moved,
               f"{name}: modules_to_save [lm_head] semantics",
               f"lm_head is {type(head).__name__}, its copy untied from embed_tokens: {untied}, "
               f"copy differs from the base head: {moved}, embed_tokens unchanged: {emb_same}")

    # 5. Logits.
    del model

    def build(f64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(load_base(args.base, f64), adir).eval()

    return compare(name, "PEFT", args, ids, build, args.base, adir)


def check_full(name, fdir, args, ids):
    model, info = AutoModelForCausalLM.from_pretrained(
        fdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.eval()
    probs = {k: v for k, v in info.items() if v}
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with open(f"{fdir}/config.json") as f:
        cfg_tied = json.load(f).get("tie_word_embeddings")
    report(not probs and tied == bool(cfg_tied), f"{name}: transformers loads the full fine-tune",
           f"loading info {info}, lm_head tied: {tied} (config says {cfg_tied})")
    del model
    return compare(name, "transformers", args, ids, lambda f64: load_base(fdir, f64), fdir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logits-bin", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--full", action="append", default=[])
    ap.add_argument("--merged", action="append", default=[])
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"peft {__import__('peft').__version__}; f32: eager attention, f64: sdpa"
          + ("; strict f32 bound" if STRICT_F32 else ""))

    tok = AutoTokenizer.from_pretrained(args.base)
    ids = [list(map(int, tok.apply_chat_template(c, tokenize=True))) for c in CONVERSATIONS]
    print(f"{len(ids)} sequences of {[len(s) for s in ids]} tokens")

    base_hf = load_base(args.base)
    base_theirs = compare("base", "transformers", args, ids, lambda f64: load_base(args.base, f64), args.base)

    for spec in args.adapter:
        name, adir = spec.split("=", 1)
        theirs = check_adapter(name, adir, args, ids, base_hf)
        m = max_diff(theirs, base_theirs)
        report(m > MOVED, f"{name}: the adapter changes the model", f"max abs logit change vs base {m:.3e}")
    for spec in args.full:
        name, fdir = spec.split("=", 1)
        theirs = check_full(name, fdir, args, ids)
        m = max_diff(theirs, base_theirs)
        report(m > MOVED, f"{name}: the fine-tune changes the model", f"max abs logit change vs base {m:.3e}")

    for spec in args.merged:
        name, mdir, adir = spec.split("=", 2)
        theirs = check_full(name, mdir, args, ids)
        ours = pipe_logits(args.logits_bin, ids, args.base, adir)
        d = max_diff(theirs, ours)
        report(d < 2 * BOUND, f"{name}: transformers on the merged folder vs pipe's base + adapter (f32)",
               f"max abs diff {d:.3e} (bound {2 * BOUND:g})")

    if failures:
        print(f"FAILED: {len(failures)} check(s): {', '.join(failures)}")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
