#!/usr/bin/env python3
"""Reference SNR values for stages/src/nn/spectrum.rs.

Spectrum's (github cognitivecomputations/spectrum, spectrum.py) per-matrix
signal-to-noise ratio, written out here with numpy in f64:

    S      = singular values (np.linalg.svd, descending)
    sigma  = (quantile(S, .75) - quantile(S, .25)) / 1.349   (linear interpolation)
    beta   = min(n, m) / max(n, m)
    tau    = sigma * sqrt((1 + sqrt(beta))**2)
    snr    = sum(S[S > tau]) / sum(S[S <= tau])   (inf when that sum is 0)
    result = snr / S[0]

    python3 scripts/reference/spectrum_ref.py            # the values pasted into the tests
    python3 scripts/reference/spectrum_ref.py --torch    # also spectrum's own f32 torch arithmetic

The matrices are integer formulas divided in f32 (IEEE, so the Rust test
builds the same bits), then widened to f64.
"""
import sys

import numpy as np

f32 = np.float32


def noise_plus_signal(rows, cols, amp):
    """w[i, j] = (((31 i + 17 j + 7 i j) mod 97) - 48) / 48 + amp * ((i mod 5) - 2) * ((j mod 3) - 1) / 4"""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    noise = ((31 * i + 17 * j + 7 * i * j) % 97 - 48).astype(f32) / f32(48)
    signal = (f32(amp) * ((i % 5) - 2).astype(f32) * ((j % 3) - 1).astype(f32)) / f32(4)
    return (noise + signal).astype(f32)


def snr(w):
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    s = np.linalg.svd(w, compute_uv=False)
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    n, m = w.shape
    beta = n / m if n < m else m / n
    tau = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = s[s > tau].sum()
    noise = s[s <= tau].sum()
    ratio = signal / noise if noise != 0 else float("inf")
    margin = np.min(np.abs(s - tau)) / tau if tau > 0 else float("nan")
    return ratio / s[0], s, tau, margin


def snr_torch_f32(w):
    """The same formula as spectrum runs it: torch f32 svdvals and torch.quantile."""
    import torch
    t = torch.from_numpy(w)
    s = torch.linalg.svdvals(t)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = t.shape
    beta = n / m if n < m else m / n
    tau = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = s[s > tau].sum()
    noise = s[s <= tau].sum()
    ratio = signal / noise if noise != 0 else float("inf")
    return float(ratio / s[0])


def main():
    for (rows, cols, amp) in [(24, 40, 0.0), (24, 40, 3.0), (48, 16, 1.5), (64, 64, 8.0)]:
        w = noise_plus_signal(rows, cols, amp)
        r, s, tau, margin = snr(w)
        print(f"({rows}, {cols}, amp {amp}): snr = {float(r)!r}  S[0] = {float(s[0])!r}  tau = {float(tau)!r}  "
              f"signal count = {(s > tau).sum()}  min |S - tau| / tau = {margin:.2e}")
        if "--torch" in sys.argv:
            print(f"    torch f32: {snr_torch_f32(w)!r}")


if __name__ == "__main__":
    main()
