#!/usr/bin/env python3
"""The TFLite-runtime side of bench/tflite, and the comparison table.

Runs each vendored .tflite model in ai-edge-litert (the TensorFlow Lite runtime, one thread)
on the same inputs as bench-tflite (camera/tests/fixtures/frames.rgb, x / 127.5 - 1; hand
re-crop upscaled 2x), with the same protocol (10 warm-up calls, then --runs timed calls cycling
over the frames), twice: with the default XNNPACK delegate and with the builtin kernels only.
Compares Hearth's outputs (<work>/<stem>.<output>.f32) with the runtime's: max abs diff,
max diff relative to the output's largest magnitude, and for BlazeFace the per-anchor face
decisions (score logit > 0, i.e. sigmoid > 0.5). Writes <out>.md and <out>.json.
"""
import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from importlib.metadata import version

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = [("face_detection_short_range", 1), ("hand_recrop", 2)]


def inputs(k: int) -> np.ndarray:
    raw = np.frombuffer((ROOT / "camera/tests/fixtures/frames.rgb").read_bytes(), np.uint8)
    f = raw.reshape(-1, 128, 128, 3)
    if k > 1:
        f = f.repeat(k, axis=1).repeat(k, axis=2)
    return f.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def run(path, x, runs, delegate):
    kw = {} if delegate else {
        "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = Interpreter(model_path=str(path), num_threads=1, **kw)
    it.allocate_tensors()
    ind = it.get_input_details()[0]["index"]
    outs = {d["name"]: [] for d in it.get_output_details()}
    for frame in x:
        it.set_tensor(ind, frame[None])
        it.invoke()
        for d in it.get_output_details():
            outs[d["name"]].append(it.get_tensor(d["index"]).copy())
    n = len(x)
    for i in range(10):
        it.set_tensor(ind, x[i % n][None])
        it.invoke()
    us = []
    for i in range(runs):
        it.set_tensor(ind, x[i % n][None])
        t = time.perf_counter()
        it.invoke()
        us.append((time.perf_counter() - t) * 1e6)
    us.sort()
    q = lambda p: us[round((len(us) - 1) * p)]
    return {k: np.concatenate(v).reshape(-1) for k, v in outs.items()}, {
        "median_us": q(0.5), "p10_us": q(0.1), "p90_us": q(0.9), "runs": len(us)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--command", default="bench/tflite")
    a = ap.parse_args()
    work = pathlib.Path(a.work)
    hearth = json.loads((work / "hearth.json").read_text())
    rows, doc = [], {"command": a.command, "runtime": f"ai-edge-litert {version('ai-edge-litert')}",
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                     + " ".join(f"{v:.2f}" for v in os.getloadavg()), "models": {}}
    for stem, k in MODELS:
        x = inputs(k)
        path = ROOT / f"data/models/{stem}.tflite"
        ref, lat_x = run(path, x, a.runs, True)
        ref_b, lat_b = run(path, x, a.runs, False)
        h = hearth["models"][stem]
        diffs, rel, dec = {}, 0.0, None
        for name in h["outputs"]:
            got = np.fromfile(work / f"{stem}.{name}.f32", dtype="<f4")
            want = ref[name]
            d = float(np.abs(got - want).max())
            diffs[name] = d
            rel = max(rel, d / max(float(np.abs(want).max()), 1e-12))
            if name == "classificators":
                dec = float(np.mean((got > 0) == (want > 0)))
        bx = max(float(np.abs(ref_b[n] - ref[n]).max()) for n in ref)
        m = {"hearth": h, "litert_xnnpack": lat_x, "litert_builtin": lat_b,
             "max_abs_diff": diffs, "max_rel_diff": rel, "face_decision_agreement": dec,
             "xnnpack_vs_builtin_max_abs_diff": bx}
        doc["models"][stem] = m
        hl = h["latency"]["median_us"]
        rows.append(
            f"| {stem} | {h['tflite_bytes']} | {h['params']} | {hl/1e3:.2f} | {lat_x['median_us']/1e3:.2f} "
            f"| {lat_b['median_us']/1e3:.2f} | {hl/lat_x['median_us']:.2f}x | "
            f"{max(diffs.values()):.2e} ({rel:.1e} rel) | "
            f"{'-' if dec is None else f'{dec:.4f}'} | {h['translate_ms']:.1f} |")
    head = ("| model | .tflite bytes | params | Hearth (tract) ms | LiteRT XNNPACK ms | LiteRT builtin ms "
            "| Hearth / XNNPACK | max abs diff vs LiteRT | face decisions agree | translate ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    md = (f"Command: `{a.command}`; {doc['runtime']} (1 thread) vs Hearth {hearth['engine']} (1 thread), "
          f"same core, batch 1, median of {a.runs} calls over the 4 camera fixture frames.\n"
          f"Machine: {doc['machine']}.\n\n" + head + "\n" + "\n".join(rows) + "\n")
    pathlib.Path(a.out + ".md").write_text(md)
    pathlib.Path(a.out + ".json").write_text(json.dumps(doc, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
