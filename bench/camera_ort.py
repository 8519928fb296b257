#!/usr/bin/env python3
"""ONNX Runtime side of bench/camera: the same frames, the same protocol, one thread.

Reads <work>/hearth.json and <work>/frames.rgb (written by bench-camera), times
session.run of the vendored BlazeFace (and of Hearth's int8 export, if written) per call
after 10 warm-up calls, and writes the merged table to <out>.md / <out>.json.
ORT latency is the wall time of session.run through the Python API (time.perf_counter_ns),
on inputs already converted to f32 (Hearth's `raw` row includes that conversion).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data/models/face_detection_front_128x128_barracuda.onnx"


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, xs: list[np.ndarray], runs: int) -> dict:
    name = sess.get_inputs()[0].name
    for x in (xs * 10)[:10]:
        sess.run(None, {name: x})
    us = []
    cpu0 = time.thread_time_ns()
    for i in range(runs):
        x = xs[i % len(xs)]
        t = time.perf_counter_ns()
        sess.run(None, {name: x})
        us.append((time.perf_counter_ns() - t) / 1000)
    cpu_us = (time.thread_time_ns() - cpu0) / 1000 / runs
    us.sort()
    q = lambda p: us[round((len(us) - 1) * p)]
    return {"median_us": q(0.5), "p10_us": q(0.1), "p90_us": q(0.9), "mean_us": sum(us) / len(us), "runs": len(us), "cpu_us_mean": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", default="bench/camera")
    a = ap.parse_args()
    h = json.loads((a.work / "hearth.json").read_text())
    frames = np.fromfile(a.work / "frames.rgb", dtype=np.uint8).reshape(-1, 1, 128, 128, 3)
    xs = [f.astype(np.float32) / 127.5 - 1.0 for f in frames]
    runs = h["tract_f32"]["raw"]["runs"]
    ort_f32 = timed(session(MODEL), xs, runs)
    int8_path = a.work / "blazeface_int8.onnx"
    ort_i8 = timed(session(int8_path), xs, runs) if int8_path.exists() else None

    ms = lambda s: f"{s['median_us'] / 1000:.2f} ms (p10 {s['p10_us'] / 1000:.2f}, p90 {s['p90_us'] / 1000:.2f})"
    cpu = lambda s: f"{s['cpu_us_mean'] / 1000:.2f} ms" if s.get("cpu_us_mean") is not None else "-"
    fps = lambda s: f"{1e6 / s['median_us']:.0f}"
    rows = [
        ("Hearth, tract f32, inference (`raw`)", h["tract_f32"]["raw"]),
        ("Hearth, tract f32, + anchors + weighted NMS (`detect`)", h["tract_f32"]["detect"]),
    ]
    if h.get("dense_f32"):
        d = h["dense_f32"]
        rows.append((f"Hearth, dense conv engine f32 ({d['backend']}), inference", d["raw"]))
        rows.append((f"Hearth, dense conv engine f32, + anchors + weighted NMS", d["detect"]))
    if h.get("tract_int8"):
        rows.append(("Hearth, tract int8 export (QLinearConv), inference", h["tract_int8"]["raw"]))
    if h.get("dense_int8"):
        d = h["dense_int8"]
        rows.append((f"Hearth, dense conv engine, int8 export ({d['backend']}), inference", d["raw"]))
    rows.append(("ONNX Runtime 1 thread, f32, session.run", ort_f32))
    if ort_i8:
        rows.append(("ONNX Runtime 1 thread, Hearth's int8 file, session.run", ort_i8))
    g = h["gating"]
    lines = [
        f"# bench/camera — BlazeFace 128 on one core ({platform.processor() or platform.machine()}, onnxruntime {ort.__version__})",
        "",
        f"Command: `{a.command}`. {h['frames_timed']} face frames decoded by ffmpeg from a clip composed of `data/faces` crops "
        f"(tract f32 finds a face in {h['frames_with_face_f32']}), {runs} timed calls after 10 warm-up calls, per call, one thread, same CPU (taskset).",
        "",
        "| engine | latency per frame (median wall) | CPU time per frame (mean) | frames/s (wall) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {ms(s)} | {cpu(s)} | {fps(s)} |" for name, s in rows]
    agree = [
        f"{k}: faces found in {h[k]['frames_with_face']}/{h['frames_timed']} frames"
        + (f", max |raw − tract| on the probe frames {h[k]['probe_diff']:.2g}" if h[k].get("probe_diff") is not None else "")
        for k in ("tract_f32", "dense_f32", "tract_int8", "dense_int8")
        if h.get(k)
    ]
    lines += ["", "Agreement: " + "; ".join(agree) + f". The camera's default engine (`backend = \"auto\"`, used for gating below): {h.get('gating_backend', 'tract')}."]
    ratio = g["mean_gated_frame_us"] / max(g["mean_detector_frame_us"], 1e-9)
    lines += [
        "",
        f"Motion gating on the {g['frames']}-frame clip (10 s idle, 5 s face, 10 s idle, 5 s face; 10 fps, simulated clock, real detector):",
        "",
        "| frames | detector runs | mean cost, gated frame | mean cost, detector frame | gated / detector | mean per frame | events |",
        "|---|---|---|---|---|---|---|",
        f"| {g['frames']} | {g['detector_runs']} | {g['mean_gated_frame_us']:.0f} µs | {g['mean_detector_frame_us'] / 1000:.2f} ms | "
        f"{ratio * 100:.1f} % | {g['mean_frame_us'] / 1000:.2f} ms ({1e6 / g['mean_frame_us']:.0f} frames/s of capacity) | {' '.join(g['events'])} |",
        "",
    ]
    text = "\n".join(lines)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"hearth": h, "ort_f32": ort_f32, "ort_int8": ort_i8}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
