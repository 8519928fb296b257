#!/usr/bin/env python3
"""Preprocessing study for the smart-plug (PLAID) model; also MLP baselines for faces and digits.

Not part of the product. Needs numpy + scikit-learn, e.g.:
  python3 -m venv data/.cache/venv && data/.cache/venv/bin/pip install numpy scikit-learn==1.9.1
  data/.cache/venv/bin/python data/study_preprocessing.py
Reads only the vendored CSVs (data/<set>/{train,test}.csv).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

warnings.filterwarnings("ignore", category=ConvergenceWarning)
DATA = Path(__file__).resolve().parent
SEEDS = [0] + [int(s) for s in sys.argv[1:]]  # extra MLP seeds as arguments, e.g. 1 2 3 4


def load(name: str, part: str) -> tuple[list[np.ndarray], np.ndarray]:
    xs, ys = [], []
    for line in (DATA / name / f"{part}.csv").read_text().splitlines():
        v = line.split(",")
        ys.append(int(v[0]))
        xs.append(np.array(v[1:], dtype=np.float64))
    return xs, np.array(ys)


def resample(x: np.ndarray, L: int) -> np.ndarray:
    """Linear interpolation onto L points spanning the first to the last sample."""
    return np.interp(np.linspace(0.0, len(x) - 1.0, L), np.arange(len(x), dtype=np.float64), x)


def mlp_acc(Xtr, ytr, Xte, yte) -> list[float]:
    accs = []
    for seed in SEEDS:
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
        clf.fit(Xtr.astype(np.float32), ytr)
        accs.append(float((clf.predict(Xte.astype(np.float32)) == yte).mean()))
    return accs


def fmt(accs: list[float]) -> str:
    s = f"{accs[0]:.4f}"
    if len(accs) > 1:
        s += f"  (mean over seeds {SEEDS}: {np.mean(accs):.4f} ± {np.std(accs):.4f})"
    return s


def zn(X: np.ndarray) -> np.ndarray:
    return (X - X.mean(1, keepdims=True)) / (X.std(1, keepdims=True) + 1e-8)


def logfft(X: np.ndarray) -> np.ndarray:
    return np.log1p(np.abs(np.fft.rfft(X, axis=1)))


def recommended(xs: list[np.ndarray], L: int, scale: float) -> np.ndarray:
    """z-norm(resampled) ++ log(rms/s + 1e-6) ++ log(n/256) ++ log1p|rfft(z-norm)|."""
    R = np.stack([resample(x, L) for x in xs])
    Z = zn(R)
    log_rms = np.log(np.sqrt((R ** 2).mean(1, keepdims=True)) / scale + 1e-6)
    log_len = np.log(np.array([len(x) for x in xs], dtype=np.float64)[:, None] / 256.0)
    return np.hstack([Z, log_rms, log_len, logfft(Z)])


def main() -> None:
    xtr, ytr = load("plaid", "train")
    xte, yte = load("plaid", "test")
    # Global constant: 99th percentile of |x| over all raw train samples.
    scale = float(np.percentile(np.abs(np.concatenate(xtr)), 99))
    print(f"PLAID: {len(xtr)} train / {len(xte)} test; global scale s = p99(|x| over train) = {scale:.6g}")
    for L in (64, 128, 256):
        Rtr = np.stack([resample(x, L) for x in xtr])
        Rte = np.stack([resample(x, L) for x in xte])
        A_tr, A_te = Rtr / scale, Rte / scale
        variants = {
            "(a) x/s": (A_tr, A_te),
            "(b) per-series z-norm": (zn(Rtr), zn(Rte)),
            "(c) x/s + log1p|rfft(x/s)|": (np.hstack([A_tr, logfft(A_tr)]), np.hstack([A_te, logfft(A_te)])),
            "(d) log1p|rfft(x/s)| only": (logfft(A_tr), logfft(A_te)),
            "(e) z-norm + log(rms/s)": (
                np.hstack([zn(Rtr), np.log(np.sqrt((A_tr ** 2).mean(1, keepdims=True)) + 1e-6)]),
                np.hstack([zn(Rte), np.log(np.sqrt((A_te ** 2).mean(1, keepdims=True)) + 1e-6)])),
            "(f) recommended (see README)": (recommended(xtr, L, scale), recommended(xte, L, scale)),
        }
        for name, (Xa, Xb) in variants.items():
            print(f"  L={L:3d} {name:30s} dim={Xa.shape[1]:3d} acc={fmt(mlp_acc(Xa, ytr, Xb, yte))}")

    for name, div in (("faces", 1.0), ("digits", 16.0)):
        a, ya = load(name, "train")
        b, yb = load(name, "test")
        Xa, Xb = np.stack(a) / div, np.stack(b) / div
        print(f"{name}: {len(a)} train / {len(b)} test, inputs / {div:g} in "
              f"[{min(Xa.min(), Xb.min()):.3g}, {max(Xa.max(), Xb.max()):.3g}], "
              f"MLP(64,) acc={fmt(mlp_acc(Xa, ya, Xb, yb))}")


if __name__ == "__main__":
    main()
