"""The model and training of Hearth's trainer in numpy: an MLP (Gemm with transB = 1, ReLU,
softmax) trained by mini-batch SGD on the mean cross-entropy of each batch, with heavy-ball
momentum `v = mu*v + g; w -= lr*v` (mu = 0: plain SGD), samples shuffled every epoch, the last
batch possibly short -- hearth_model::train, line for line."""

import json
from pathlib import Path

import numpy as np


def load_csv(path):
    a = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    return a[:, 1:], a[:, 0].astype(np.int64)


def load_init(data_dir):
    """The initial weights Hearth's coordinator starts from, in a fixed order (by name)."""
    w = json.loads((Path(data_dir) / "init.json").read_text())
    names = sorted(w)
    return names, [np.array(w[n]["data"], dtype=np.float32).reshape(w[n]["shape"]) for n in names]


def layers(names, arrays):
    """[(weight [out, in], bias [out])] in layer order (fc0, fc1, ...)."""
    d = dict(zip(names, arrays))
    k = 0
    out = []
    while f"fc{k}.weight" in d:
        out.append((d[f"fc{k}.weight"], d[f"fc{k}.bias"]))
        k += 1
    return out


def logits(ls, x):
    h = x
    for i, (w, b) in enumerate(ls):
        h = h @ w.T + b
        if i < len(ls) - 1:
            h = np.maximum(h, 0.0)
    return h


def accuracy(names, arrays, x, y):
    return float((logits(layers(names, arrays), x).argmax(1) == y).mean())


def train(names, arrays, x, y, epochs, lr, batch, momentum, seed):
    """Returns the trained arrays (same order) and the last epoch's mean batch loss."""
    arrays = [a.copy() for a in arrays]
    index = {n: i for i, n in enumerate(names)}
    vel = [np.zeros_like(a) for a in arrays]
    rng = np.random.default_rng(seed)
    loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        losses = []
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            xb, yb = x[idx], y[idx]
            ls = layers(names, arrays)
            acts = [xb]
            h = xb
            for i, (w, b) in enumerate(ls):
                h = h @ w.T + b
                if i < len(ls) - 1:
                    h = np.maximum(h, 0.0)
                acts.append(h)
            z = acts[-1] - acts[-1].max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            n = len(yb)
            losses.append(float(-np.log(p[np.arange(n), yb] + 1e-12).mean()))
            g = p
            g[np.arange(n), yb] -= 1.0
            g /= n
            grads = {}
            for i in range(len(ls) - 1, -1, -1):
                w, _ = ls[i]
                grads[f"fc{i}.weight"] = g.T @ acts[i]
                grads[f"fc{i}.bias"] = g.sum(0)
                if i > 0:
                    g = (g @ w) * (acts[i] > 0)
            for name, gr in grads.items():
                j = index[name]
                vel[j] = momentum * vel[j] + gr
                arrays[j] -= lr * vel[j]
        loss = float(np.mean(losses)) if losses else 0.0
    return arrays, loss
