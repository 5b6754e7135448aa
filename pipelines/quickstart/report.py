"""Base vs fine-tuned, side by side (a `command` stage; `pipe run` prints its
summary.txt).

Reads results.json of the evaluate stages given as inputs
eval_base / eval_tuned / heldout_base / heldout_tuned, and train.json of
`sft` (eval loss before and after training). Writes summary.txt and
report.json into $PIPE_OUT.
"""

import json
import os
import sys


def load(name, file):
    path = os.path.join(os.environ[f"PIPE_IN_{name.upper()}"], file)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}\nhint: input `{name}` must be an evaluate (or train) stage")


def cell(r, flt):
    m = r["filters"][flt]
    return f"{100 * m['exact_match']:6.2f} ± {100 * m['exact_match_stderr']:5.2f}%"


def main():
    out = os.environ["PIPE_OUT"]
    evals = {k: load(k, "results.json") for k in ["eval_base", "eval_tuned", "heldout_base", "heldout_tuned"]}
    train = load("sft", "train.json")
    lines = ["the base model and the fine-tuned one, side by side", f"{'':34}{'base':>18}{'fine-tuned':>18}"]
    # No wall-clock figures (tokens/s): the report is a deterministic stage,
    # and `pipe run --frozen` checks that its output matches the lock file.
    report = {"train": {k: train.get(k) for k in ["eval_loss_before", "eval_loss_after", "steps"]}}
    for title, base, tuned in [
        ("GSM8K test, decontaminated", "eval_base", "eval_tuned"),
        ("held-out gsm_symbolic", "heldout_base", "heldout_tuned"),
    ]:
        b, t = evals[base], evals[tuned]
        shots = b["config"]["num_fewshot"]
        lines.append(f"{title} (gsm8k_cot, {shots}-shot, n = {b['n']})")
        for flt in ["strict-match", "flexible-extract"]:
            lines.append(f"  {flt:32}{cell(b, flt):>18}{cell(t, flt):>18}")
        parsed = [r["n"] - r["filters"]["strict-match"]["invalid"] for r in (b, t)]
        label = 'answers ending "The answer is N."'
        lines.append(f"  {label:32}{parsed[0]:>18}{parsed[1]:>18}")
        report[title] = {
            "n": b["n"],
            "base": b["filters"],
            "fine_tuned": t["filters"],
        }
    if train.get("eval_loss_before") is not None:
        lines.append(
            f"{'held-out answer loss (train eval)':34}{train['eval_loss_before']:>18.4f}{train['eval_loss_after']:>18.4f}"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
