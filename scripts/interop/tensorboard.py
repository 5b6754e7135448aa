"""Check pipe's TensorBoard event files with TensorBoard's EventAccumulator.

Run through tensorboard.sh:  python tensorboard.py DIR

DIR holds what `metrics::tests::interop_write_tensorboard_events` wrote:
metrics.jsonl, tensorboard/events.out.tfevents.* and loss.png. Checks:
  1. one event file, named events.out.tfevents.<10-digit secs>.<host>.<pid>.<n>;
  2. EventAccumulator (TensorBoard's reader, which verifies the TFRecord CRCs
     through its own crc32c) loads it, reports file_version brain.Event:2 and
     exactly the scalar tags train/{epoch,loss,lr,grad_norm,tokens_per_s,elapsed_s}
     and eval/loss;
  3. every tag's steps and values equal the formulas the writer used (as f32),
     and equal metrics.jsonl's values (as f32);
  4. wall times are increasing and recent; loss.png is a PNG.
Exit status 1 if anything fails.
"""

import json
import math
import os
import re
import socket
import struct
import sys
import time

# This file is itself named tensorboard.py: drop its folder from the import
# path so `import tensorboard` finds the package, not this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from tensorboard.backend.event_processing import event_accumulator

failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    d = sys.argv[1]
    tb = os.path.join(d, "tensorboard")
    files = os.listdir(tb)
    check(len(files) == 1, f"one event file: {files}")
    name = files[0]
    m = re.fullmatch(r"events\.out\.tfevents\.(\d{10})\.(.+)\.(\d+)\.(\d+)", name)
    check(m is not None, f"file name {name} has TensorFlow's shape")
    if m:
        check(m.group(2) == socket.gethostname(), f"host part {m.group(2)!r} == socket.gethostname()")
        check(abs(int(m.group(1)) - time.time()) < 3600, "time part is now")

    acc = event_accumulator.EventAccumulator(tb, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    print(f"tags: {tags['scalars']}")
    want_tags = {f"train/{k}" for k in ["epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"]}
    want_tags.add("eval/loss")
    check(set(tags["scalars"]) == want_tags, "scalar tags")
    # EventAccumulator keeps the number after "brain.Event:".
    check(acc.file_version == 2.0, f"file_version {acc.file_version!r} (brain.Event:2)")

    formulas = {
        "train/epoch": lambda s: s / 50.0,
        "train/loss": lambda s: 2.0 + 1.0 / s,
        "train/lr": lambda s: 1e-4 * (1.0 - s / 50.0),
        "train/grad_norm": lambda s: 0.5 + s / 100.0,
        "train/tokens_per_s": lambda s: 1000.0 + s,
        "train/elapsed_s": lambda s: s * 0.25,
    }
    records = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    by_step = {r["step"]: r for r in records}
    for tag, fn in formulas.items():
        ev = acc.Scalars(tag) if tag in tags["scalars"] else []
        steps = [e.step for e in ev]
        check(steps == list(range(1, 51)), f"{tag}: steps 1..50 ({len(steps)} events)")
        bad = [(e.step, e.value, fn(e.step)) for e in ev if e.value != f32(fn(e.step))]
        check(not bad, f"{tag}: values match the writer's formula as f32 {bad[:3]}")
        key = tag.split("/", 1)[1]
        bad = [(e.step, e.value) for e in ev if e.value != f32(by_step[e.step][key])]
        check(not bad, f"{tag}: values match metrics.jsonl {bad[:3]}")
        walls = [e.wall_time for e in ev]
        check(all(a <= b for a, b in zip(walls, walls[1:])) and abs(walls[-1] - time.time()) < 3600,
              f"{tag}: wall times increasing and recent")
    ev = acc.Scalars("eval/loss") if "eval/loss" in tags["scalars"] else []
    check([(e.step, e.value) for e in ev] == [(51, 1.5)], f"eval/loss: {[(e.step, e.value) for e in ev]}")
    loss = acc.Scalars("train/loss")
    print("train/loss first/last:", [(e.step, round(e.value, 6)) for e in (loss[:1] + loss[-1:])])
    with open(os.path.join(d, "loss.png"), "rb") as f:
        check(f.read(8) == b"\x89PNG\r\n\x1a\n", "loss.png is a PNG")

    if failures:
        print(f"FAIL: {len(failures)} check(s) failed")
        sys.exit(1)
    print("PASS: TensorBoard's EventAccumulator reads pipe's event file (tags, steps, values)")


if __name__ == "__main__":
    main()
