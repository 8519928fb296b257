#!/usr/bin/env python3
"""bench/compress, imported models: Hearth's recipes vs ONNX Runtime's quantizers on the vendored
real models (data/models/), on the same inputs, in one run.

For each model this writes its inputs to <work>/<stem>.npy (faces test images prepared as the model
expects for the image models, reproducible uniform [-1, 1] inputs for the audio ones) and
- runs `hearth-compress <model> --calib <stem>.npy` with each Hearth recipe (the .npy is both the
  calibration set — its first 16-20 inputs — and the agreement set) and reads the last table row:
  size ratio, decision agreement with the original, tract batch-1 latency;
- runs ONNX Runtime: `quant_pre_process`, then `quantize_dynamic` (QInt8, per channel) and
  `quantize_static` (QDQ, QInt8 per-channel weights, QUInt8 activations, calibrated on the first
  20 inputs), measured on the same inputs: size ratio, decision agreement with the fp32 model,
  batch-1 latency (intra_op_num_threads=1, median).
Decisions as Hearth's measure: argmax (classifier, embedding), "some score > 0.5" (BlazeFace's
score logits after a sigmoid; Silero's speech probability).

    bench/.venv/bin/python bench/imported.py --bin target/release/hearth-compress --work target/bench-imported \
        --out bench/results/imported
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

N = 50
CALIB = 20
RECIPES = [
    ("int8 package", "quant:int8-per-channel;export:package"),
    ("int8 QOperator", "export:int8-qoperator"),
    ("channels 25% + LS, int8 package", "prune-channels:0.25,recover=ls;quant:int8-per-channel;export:package"),
    ("channels 40% + LS, int8 package", "prune-channels:0.4,recover=ls;quant:int8-per-channel;export:package"),
    ("channels 25% + LS, int4 package", "prune-channels:0.25,recover=ls;quant:int4-per-channel;export:package"),
]


def resize(img, oh, ow):
    """Bilinear, half-pixel centres, edges clamped (measure::resize_bilinear)."""
    h, w = img.shape
    fy = np.clip((np.arange(oh) + 0.5) * h / oh - 0.5, 0, h - 1)
    fx = np.clip((np.arange(ow) + 0.5) * w / ow - 0.5, 0, w - 1)
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (fy - y0)[:, None], (fx - x0)[None, :]
    top = img[y0][:, x0] * (1 - dx) + img[y0][:, x1] * dx
    bot = img[y1][:, x0] * (1 - dx) + img[y1][:, x1] * dx
    return top * (1 - dy) + bot * dy


def faces(h, w):
    rows = np.loadtxt("data/faces/test.csv", delimiter=",")
    imgs = rows[:N, 1:].reshape(-1, 25, 25).astype(np.float32)
    return np.stack([resize(i, h, w) * 2 - 1 for i in imgs]).astype(np.float32)


def uniform(shape):
    return np.random.default_rng(0).uniform(-1, 1, size=(N, *shape)).astype(np.float32)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# (file, input shape for hearth, inputs [N, ...], decision(outputs dict) -> hashable)
def models():
    f = faces(48, 192)
    b = faces(128, 128)
    return [
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "1,3,48,192",
         np.repeat(f[:, None], 3, 1), lambda o: int(np.argmax(o["save_infer_model/scale_0.tmp_1"]))),
        ("face_detection_front_128x128_barracuda.onnx", None, np.repeat(b[..., None], 3, 3),
         lambda o: bool((sigmoid(o["Identity:0"]) > 0.5).any() or (sigmoid(o["Identity_1:0"]) > 0.5).any())),
        ("embedding_model.onnx", None, uniform((76, 32, 1)), lambda o: int(np.argmax(o["conv2d_19"]))),
        ("silero_vad_16k_sequence.onnx", None, uniform((576,)), lambda o: bool((o["speech_probs"] > 0.5).any())),
    ]


def feeds(sess, x):
    d = {}
    for i, inp in enumerate(sess.get_inputs()):
        if i == 0:
            d[inp.name] = x[None] if x.ndim < len(inp.shape) else x
        else:
            d[inp.name] = np.zeros([s if isinstance(s, int) else 1 for s in inp.shape], np.float32)
    return d


def run_all(path, xs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    outs = [dict(zip(names, s.run(None, feeds(s, x)))) for x in xs]
    f = feeds(s, xs[0])
    for _ in range(5):
        s.run(None, f)
    times = []
    for _ in range(50):
        t = time.perf_counter()
        s.run(None, f)
        times.append((time.perf_counter() - t) * 1e6)
    return outs, float(np.median(times))


class Reader(CalibrationDataReader):
    def __init__(self, path, xs):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.it = iter([feeds(s, x) for x in xs[:CALIB]])

    def get_next(self):
        return next(self.it, None)


def hearth(bin_, path, shape, npy, recipe, out):
    args = [bin_, path, "--recipe", recipe, "-o", out, "--calib", npy, "--latency-runs", "50",
            "--agreement-samples", str(N)]
    if shape:
        args += ["--input-shape", shape]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    rows = [l for l in p.stdout.splitlines() if l.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = lambda l: [c.strip() for c in l.strip("|").split("|")]
    first, last = cells(rows[2]), cells(rows[-1])
    col = lambda name: head.index(name)
    return {
        "ratio": float(first[col("bytes")]) / float(last[col("bytes")]),
        "decisions": float(last[col("decision_agree")]),
        "latency_us": float(last[col("latency_us")]),
        "fp32_latency_us": float(first[col("latency_us")]),
        "note": last[col("note")],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="bench/compress")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    results = []
    for fname, shape, xs, decide in models():
        path = os.path.join("data/models", fname)
        stem = os.path.splitext(fname)[0]
        npy = os.path.join(a.work, stem + ".npy")
        np.save(npy, xs)
        size = os.path.getsize(path)
        ref, ref_us = run_all(path, xs)
        ref_dec = [decide(o) for o in ref]
        row = {"model": fname, "ort_fp32_us": ref_us, "hearth": {}, "ort": {}}
        for label, recipe in RECIPES:
            out = os.path.join(a.work, f"{stem}.{len(row['hearth'])}.out")
            row["hearth"][label] = hearth(a.bin, path, shape, npy, recipe, out)
            print(fname, label, row["hearth"][label], file=sys.stderr)
        pre = os.path.join(a.work, stem + ".pre.onnx")
        try:
            quant_pre_process(path, pre, skip_symbolic_shape=True)
        except Exception as e:  # noqa: BLE001
            print(f"{fname}: pre-processing failed ({e}); quantizing the original", file=sys.stderr)
            pre = path
        for label in ("dynamic", "static"):
            q = os.path.join(a.work, f"{stem}.{label}.onnx")
            try:
                if label == "dynamic":
                    quantize_dynamic(pre, q, weight_type=QuantType.QInt8, per_channel=True)
                else:
                    quantize_static(pre, q, Reader(pre, xs), quant_format=QuantFormat.QDQ,
                                    per_channel=True, weight_type=QuantType.QInt8,
                                    activation_type=QuantType.QUInt8)
                outs, us = run_all(q, xs)
                dec = float(np.mean([decide(o) == d for o, d in zip(outs, ref_dec)]))
                row["ort"][label] = {"ratio": size / os.path.getsize(q), "decisions": dec, "latency_us": us}
            except Exception as e:  # noqa: BLE001
                row["ort"][label] = {"error": str(e).splitlines()[0][:120]}
            print(fname, label, row["ort"][label], file=sys.stderr)
        results.append(row)
    lines = [
        f"Command: `{a.command}`; {N} inputs per model (faces test images for the image models, uniform "
        "[-1, 1] for the audio ones), batch 1, one thread, same CPU.",
        "",
        "| model | what | size ratio | decisions | latency µs (fp32: Hearth/tract, ORT) |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda r: ("error: " + r["error"]) if "error" in r else \
        f"{r['ratio']:.2f}x | {r['decisions']:.3f} | {r['latency_us']:.0f}"
    for row in results:
        for label, r in row["hearth"].items():
            fp = f" (fp32 {r['fp32_latency_us']:.0f})" if "fp32_latency_us" in r else ""
            lines.append(f"| {row['model']} | Hearth {label} | {fmt(r)}{fp} |")
        for label, r in row["ort"].items():
            lines.append(f"| {row['model']} | ORT quantize_{label} | {fmt(r)} (fp32 {row['ort_fp32_us']:.0f}) |")
    text = "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    with open(a.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
