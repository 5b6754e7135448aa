#!/usr/bin/env python3
"""Reference values for stages/src/nn/nf4.rs (NF4 + double quantisation).

An independent numpy re-implementation of bitsandbytes'
quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True):
nearest-code search by midpoints (`searchsorted`, as the bitsandbytes CPU
backend's `bucketize`), not the CUDA comparison trees the Rust code uses.

    python3 scripts/reference/nf4_ref.py            # prints the values pasted into the tests
    python3 scripts/reference/nf4_ref.py --bnb      # also checks against bitsandbytes (needs torch + bitsandbytes)
    python3 scripts/reference/nf4_ref.py --dump-dynamic-map   # the 256 values of DYNAMIC_MAP (needs bitsandbytes)

Needs numpy. The test matrices are built from integer formulas in f32
arithmetic (IEEE, so Rust computes the same bits).
"""
import sys

import numpy as np

f32 = np.float32

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=f32)


def matrix(rows, cols):
    """w[k] = (((7919 k + 13) mod 2003) - 1001) / 1001 * s(b), s(b) = ((37 b mod 11) + 1) / 16, b = k // 64."""
    k = np.arange(rows * cols, dtype=np.int64)
    num = ((k * 7919 + 13) % 2003 - 1001).astype(f32)
    b = k // 64
    s = ((b * 37) % 11 + 1).astype(f32) / f32(16)
    return (num / f32(1001) * s).astype(f32).reshape(rows, cols)


def nearest_sorted(x, code):
    """Index of the nearest code value (ties to the lower one), by midpoints."""
    mid = (code[:-1].astype(np.float64) + code[1:].astype(np.float64)) / 2
    return np.searchsorted(mid, x.astype(np.float64), side="left").astype(np.uint8)


def quantize(w, dyn):
    x = w.reshape(-1).astype(f32)
    blocks = x.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1).astype(f32)
    inv = (f32(1) / np.maximum(absmax, f32(1e-38))).astype(f32)
    q = nearest_sorted((blocks * inv[:, None]).astype(f32).reshape(-1), NF4)
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    offset = f32(absmax.astype(np.float64).mean())
    centred = (absmax - offset).astype(f32)
    qabs, scales = [], []
    for i in range(0, len(centred), 256):
        c = centred[i:i + 256]
        m = f32(np.abs(c).max())
        scales.append(m)
        qabs.append(nearest_sorted((c * (f32(1) / max(m, f32(1e-38)))).astype(f32), dyn))
    return packed, np.concatenate(qabs), np.array(scales, dtype=f32), offset


def dequantize(packed, qabs, scales, offset, dyn, shape):
    amax = (dyn[qabs] * np.repeat(scales, 256)[:len(qabs)] + offset).astype(f32)
    q = np.empty(packed.size * 2, dtype=np.uint8)
    q[0::2] = packed >> 4
    q[1::2] = packed & 15
    return (NF4[q].reshape(-1, 64) * amax[:, None]).astype(f32).reshape(shape)


def checksum(data):
    """sum((i + 1) * byte) mod 2^61 - 1, the same loop in the Rust test."""
    acc = 0
    for i, v in enumerate(bytes(data)):
        acc = (acc + (i + 1) * v) % (2**61 - 1)
    return acc


def dynamic_map():
    """bitsandbytes' dynamic map as pinned in nf4.rs (parsed from the Rust source)."""
    import pathlib
    import re
    src = (pathlib.Path(__file__).resolve().parents[2] / "stages/src/nn/nf4.rs").read_text()
    body = src[src.index("pub const DYNAMIC_MAP"):]
    body = body[body.index("= [") + 3:body.index("];")]
    vals = [f32(v) for v in re.findall(r"-?[0-9.]+(?:e-?[0-9]+)?", body)]
    assert len(vals) == 256
    return np.array(vals, dtype=f32)


def main():
    if "--dump-dynamic-map" in sys.argv:
        import bitsandbytes.functional as F
        m = F.create_dynamic_map(signed=True).numpy()
        for i in range(0, 256, 8):
            print("    " + ", ".join(str(f32(v)) for v in m[i:i + 8]) + ",")
        return
    dyn = dynamic_map()
    for (rows, cols) in [(4, 64), (64, 320)]:
        w = matrix(rows, cols)
        packed, qabs, scales, offset = quantize(w, dyn)
        dq = dequantize(packed, qabs, scales, offset, dyn, w.shape)
        print(f"== ({rows}, {cols})")
        if packed.size <= 128:
            print("packed =", packed.tobytes().hex())
            print("qabsmax =", list(map(int, qabs)))
        print("checksum(packed) =", checksum(packed))
        print("checksum(qabsmax) =", checksum(qabs))
        print("scales =", [repr(float(s)) for s in scales])
        print("offset =", repr(float(offset)))
        idx = [0, 1, 63, 64, w.size // 2 + 5, w.size - 1]
        print("dequant at", idx, "=", [repr(float(v)) for v in dq.reshape(-1)[idx]])
        print("sum(dequant) f64 =", repr(float(dq.astype(np.float64).sum())))
        if "--bnb" in sys.argv:
            import torch
            import bitsandbytes.functional as F
            out, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True, quant_type="nf4")
            print("bnb packed equal:", np.array_equal(out.numpy().reshape(-1), packed))
            print("bnb qabsmax equal:", np.array_equal(st.absmax.numpy(), qabs))
            print("bnb scales equal:", np.array_equal(st.state2.absmax.numpy(), scales))
            print("bnb offset:", repr(float(st.offset)), "ours:", repr(float(offset)))
            print("bnb dynamic map equal:", np.array_equal(st.state2.code.numpy(), dyn))
            bdq = F.dequantize_4bit(out, st).numpy()
            print("bnb dequant max abs diff:", float(np.abs(bdq - dq).max()))


if __name__ == "__main__":
    main()
