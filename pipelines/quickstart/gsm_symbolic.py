"""GSM8K-style problems with chain-of-thought answers from reasoning-gym's
`gsm_symbolic` generator (a `command` stage).

    python3 gsm_symbolic.py --seed S --n N --out FILE.jsonl

Writes `{question, answer}` rows in GSM8K's format (the reasoning, then
`#### N`), plus `answer_value`. reasoning-gym==0.1.25 is installed once into a
venv at ${PIPE_VENVS:-~/.cache/pipe/venvs}/reasoning-gym-0.1.25 (it has many
dependencies); this script re-runs itself there.
"""

import argparse
import json
import os
import subprocess
import sys

SPEC = "reasoning-gym==0.1.25"


def ensure_venv():
    venv = os.path.join(os.environ.get("PIPE_VENVS") or os.path.expanduser("~/.cache/pipe/venvs"),
                        SPEC.replace("==", "-"))
    py = os.path.join(venv, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    ok = os.path.exists(py) and subprocess.run([py, "-c", "import reasoning_gym"], capture_output=True).returncode == 0
    if not ok:
        print(f"installing {SPEC} into {venv} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        r = subprocess.run([py, "-m", "pip", "install", "--quiet", SPEC])
        if r.returncode != 0:
            sys.exit(f"error: pip install {SPEC} failed\nhint: it needs PyPI (or a mirror via PIP_INDEX_URL)")
    os.execv(py, [py, *sys.argv])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ensure_venv()
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=a.n, seed=a.seed)
    with open(a.out, "w") as f:
        for x in ds:
            m = x["metadata"]
            f.write(json.dumps({"question": x["question"], "answer": m["answer_cot"],
                                "answer_value": str(x["answer"])}) + "\n")
    print(f"{a.n} problems (seed {a.seed}) -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
