#!/usr/bin/env python3
"""ONNX Runtime side of bench/compress.

Reads the Hearth side's results (<work>/hearth.json), quantizes the *same* fp32 ONNX files
with ONNX Runtime's own quantizers, measures them on the *same* test inputs (.npy written by
bench-compress) with the same protocol (one thread, warm-up then per-call timings, median; at
batch 1 and, per sample, at batch N = 64 by default), merges everything into one table, checks the issue's targets and writes
<out>.md / <out>.json.

ORT rows:
  fp32 (ORT)                    the fp32 file as is
  ORT dynamic int8              quantize_dynamic (QInt8 weights, per channel): ORT splits each
                                Gemm into a DynamicQuantizeMatMul (activation scale computed at
                                run time) + Add.
  ORT static int8               quantize_static, QOperator format, per-channel int8 weights,
                                uint8 activations, MinMax calibration on the train split.

ORT latency is the wall time of session.run through the Python API (time.perf_counter_ns),
which includes the binding's per-call cost (at batch N it is shared by N samples). The batched
figure feeds a [N, n] input; every model here declares a symbolic batch dimension (checked: a
model whose batch dimension is fixed gets a copy with a symbolic one, noted in its row). To show how large that is, both engines also time
a floor model (input -> Softmax only) with the same protocol; the table reports both floors.
A separate profiled session gives ORT's per-node kernel times (the profiler's own overhead
inflates them, so only their shares are meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

TARGET_INT8_RATIO = 3.9
TARGET_INT8_LOSS_PTS = 1.0
TARGET_BEST_RATIO = 10.0
TARGET_BEST_LOSS_PTS = 2.0
TARGET_PRUNE_LATENCY = 0.6
TARGET_INT8_VS_ORT = 1.0


class TrainSplitReader(CalibrationDataReader):
    """Feeds the train-split inputs one sample at a time (batch 1, like inference)."""

    def __init__(self, input_name: str, x: np.ndarray):
        self.input_name = input_name
        self.x = x
        self.i = 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        row = self.x[self.i : self.i + 1]
        self.i += 1
        return {self.input_name: row}

    def rewind(self):
        self.i = 0


def session(path: Path, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(path.with_suffix("")) + "_ortprofile"
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), 256):
        probs = sess.run(None, {name: x[start : start + 256]})[0]
        correct += int((probs.argmax(axis=1) == y[start : start + 256]).sum())
    return correct / len(x)


def summarize(times_us: list[float]) -> dict:
    t = np.sort(np.asarray(times_us, dtype=np.float64))
    n = len(t)

    def q(p):
        return float(t[int(round((n - 1) * p))]) if n else 0.0

    return {"median_us": float(np.median(t)) if n else 0.0, "p10_us": q(0.1), "p90_us": q(0.9), "runs": n}


def latency_python(sess: ort.InferenceSession, rows: list[np.ndarray], warmup: int, runs: int) -> dict:
    """Per-call wall time of session.run through the Python API, cycling through the test rows
    exactly like the Hearth side."""
    name = sess.get_inputs()[0].name
    n = len(rows)
    for i in range(warmup):
        sess.run(None, {name: rows[i % n]})
    times = []
    for i in range(runs):
        feed = {name: rows[i % n]}
        t = time.perf_counter_ns()
        sess.run(None, feed)
        times.append((time.perf_counter_ns() - t) / 1e3)
    return summarize(times)


def latency_python_batch(sess: ort.InferenceSession, x: np.ndarray, batch: int, warmup: int, runs: int) -> dict:
    """Per-sample time of session.run on [batch, n] inputs: call i gets rows i*batch.. of the test
    split (mod its length, wrapping, so a split smaller than the batch repeats), exactly like
    the Hearth side; per-call times divided by the batch size."""
    name = sess.get_inputs()[0].name
    n = len(x)
    buf = np.ascontiguousarray(x[np.arange(n + batch) % n])
    batches = [buf[s : s + batch] for s in ((i * batch) % n for i in range(n))]

    def at(i):
        return batches[i % n]

    for i in range(warmup):
        sess.run(None, {name: at(i)})
    times = []
    for i in range(runs):
        feed = {name: at(warmup + i)}
        t = time.perf_counter_ns()
        out = sess.run(None, feed)
        times.append((time.perf_counter_ns() - t) / 1e3 / batch)
        if i == 0 and out[0].shape[0] != batch:
            raise RuntimeError(f"{out[0].shape} output rows for a batch of {batch}")
    return {"batch": batch, "per_sample": summarize(times)}


def batch_dim(path: Path) -> str:
    """The declared first dimension of the model's data input: a symbol or a fixed size."""
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    d = next(i for i in m.graph.input if i.name not in inits).type.tensor_type.shape.dim[0]
    return d.dim_param if d.HasField("dim_param") else str(d.dim_value)


def with_symbolic_batch(path: Path) -> tuple[Path, str]:
    """`path` itself if its batch dimension is symbolic; otherwise a copy whose graph inputs
    and outputs declare a symbolic batch "N" (and no stale value_info), plus a note."""
    dim = batch_dim(path)
    if not dim.isdigit():
        return path, ""
    m = onnx.load(str(path))
    for v in list(m.graph.input) + list(m.graph.output):
        if v.type.tensor_type.shape.dim:
            v.type.tensor_type.shape.dim[0].Clear()
            v.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    out = path.with_name(path.stem + "_symbatch.onnx")
    onnx.save(m, str(out))
    return out, f"batch dim fixed at {dim} in {path.name}; batched figure on a copy with symbolic batch"


def node_profile(path: Path, rows: list[np.ndarray], warmup: int, runs: int) -> tuple[dict, list[dict]]:
    """ORT's profiler: per-run "model_run" times and the mean time of each node kernel over the
    timed runs (both inflated by the profiler's own event recording)."""
    sess = session(path, profile=True)
    name = sess.get_inputs()[0].name
    n = len(rows)
    for i in range(warmup + runs):
        sess.run(None, {name: rows[i % n]})
    prof_path = sess.end_profiling()
    with open(prof_path) as f:
        events = json.load(f)
    os.remove(prof_path)
    run_events = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed = run_events[warmup:]
    runs_dur = [float(e["dur"]) for e in timed]
    # Node events of the timed runs: those starting after the first timed model_run began.
    t_start = timed[0]["ts"] if timed else 0
    per_node: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < t_start:
            continue
        key = (e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", ""))
        per_node[key] = per_node.get(key, 0.0) + float(e["dur"])
    nodes = [
        {"name": k[0], "op": k[1], "mean_us": v / max(len(timed), 1)}
        for k, v in per_node.items()
    ]
    return summarize(runs_dur), nodes


def floor_latency(work: Path, width: int, warmup: int, runs: int, batch: int, bwarmup: int, bruns: int) -> tuple[dict, dict]:
    """Per-call floor of ORT through Python: a model that only applies Softmax to a [1, width]
    input (what every classifier here ends with), timed like the real models."""
    path = work / f"floor_softmax_{width}.onnx"
    x = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", width])
    g = helper.make_graph([helper.make_node("Softmax", ["input"], ["probs"], axis=1)], "floor", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    x = np.random.default_rng(0).standard_normal((16, width)).astype(np.float32)
    rows = [np.ascontiguousarray(x[i : i + 1]) for i in range(len(x))]
    sess = session(path)
    return latency_python(sess, rows, warmup, runs), latency_python_batch(sess, x, batch, bwarmup, bruns)


def quantized_ops(path: Path) -> str:
    m = onnx.load(str(path))
    ops = []
    for n in m.graph.node:
        if n.op_type not in ops:
            ops.append(n.op_type)
    return ",".join(ops)


def ort_rows(task: dict, work: Path, warmup: int, runs: int, batch: int, bwarmup: int, bruns: int) -> list[dict]:
    name = task["task"]
    fp32 = work / task["fp32_onnx"]
    x = np.load(work / task["test_x"]).astype(np.float32)
    y = np.load(work / task["test_y"])
    calib = np.load(work / task["calib_x"]).astype(np.float32)
    rows = [np.ascontiguousarray(x[i : i + 1]) for i in range(len(x))]
    input_name = session(fp32).get_inputs()[0].name

    dyn = work / f"{name}_ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8, per_channel=True)
    static = work / f"{name}_ort_static.onnx"
    quantize_static(
        str(fp32),
        str(static),
        TrainSplitReader(input_name, calib),
        quant_format=QuantFormat.QOperator,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    specs = [
        ("ort_fp32", "fp32 (ORT)", fp32, "the fp32 file as is"),
        ("ort_dynamic", "ORT dynamic int8", dyn, "quantize_dynamic(QInt8, per_channel=True)"),
        ("ort_static", "ORT static int8", static,
         "quantize_static(QOperator, per_channel=True, U8 act / S8 weights, MinMax on train split)"),
    ]
    out = []
    for key, label, path, recipe in specs:
        sess = session(path)
        acc = accuracy(sess, x, y)
        lat_py = latency_python(sess, rows, warmup, runs)
        dim = batch_dim(path)
        bpath, bnote = with_symbolic_batch(path)
        bsess = sess if bpath == path else session(bpath)
        lat_b = latency_python_batch(bsess, x, batch, bwarmup, bruns)
        prof_runs = max(runs // 3, 100)
        prof_run, nodes = node_profile(path, rows, prof_runs // 10, prof_runs)
        row = {
            "key": key,
            "label": label,
            "engine": "ORT",
            "file": path.name,
            "bytes": path.stat().st_size,
            "accuracy": acc,
            "latency": lat_py,
            "latency_batch": lat_b,
            "batch_dim": dim,
            "batch_note": bnote,
            "profiled_run": prof_run,
            "recipe": recipe,
            "ops": quantized_ops(path),
            "ort_nodes": nodes,
        }
        print(
            f"  {name:<6} {label:<28} {row['bytes']:>9} B  acc {acc:.4f}  "
            f"median {lat_py['median_us']:.2f} µs (p10 {lat_py['p10_us']:.2f}, p90 {lat_py['p90_us']:.2f})  "
            f"batch {batch} ({dim}): {lat_b['per_sample']['median_us']:.3f} µs/sample{' — ' + bnote if bnote else ''}",
            flush=True,
        )
        out.append(row)
    return out


def fmt_bytes(b: int) -> str:
    return f"{b / 1024:.1f} KiB" if b < 1024 * 1024 else f"{b / 1024 / 1024:.2f} MiB"


def mark(ok: bool | None) -> str:
    return "" if ok is None else ("✅" if ok else "❌")


def b1(r: dict) -> float:
    return r["latency"]["median_us"]


def b1_tract(r: dict) -> float:
    """Batch-1 latency through tract's plan (Hearth rows served by the dense engine carry it
    separately; for every other row it is the batch-1 figure itself)."""
    return (r.get("latency_tract") or r["latency"])["median_us"]


def bn(r: dict) -> float:
    return r["latency_batch"]["per_sample"]["median_us"]


def build_table(hearth: dict, ort_by_task: dict[str, list[dict]]) -> tuple[str, list[dict], list[dict]]:
    nb = hearth["batch"]
    lines = [
        f"| model | variant | engine | size | × smaller | accuracy | Δ pts | latency µs b1 (median) | tract plan µs b1 "
        f"| µs/sample b{nb} (median) | vs ORT int8 b1 | vs ORT int8 b{nb} | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    merged = []
    checks = []
    order = ["fp32", "ort_fp32", "hearth_int8", "ort_dynamic", "ort_static", "hearth_best", "pruned50"]
    for task in hearth["tasks"]:
        name = task["task"]
        rows = {}
        for v in task["variants"]:
            engine = v.get("engine", "tract")
            rows[v["key"]] = dict(v, engine="tract" if engine == "tract" else f"{engine} b1, tract b{nb}")
        for v in ort_by_task.get(name, []):
            rows[v["key"]] = v
        base = rows["fp32"]
        ort_int8 = [rows[k] for k in ("ort_dynamic", "ort_static") if k in rows]
        # The faster ORT int8 model at each batch size (they may differ).
        fastest = {
            "b1": min(ort_int8, key=b1) if ort_int8 else None,
            "bn": min(ort_int8, key=bn) if ort_int8 else None,
        }
        for miss in task.get("missing", []):
            lines.append(f"| {name} {task['layers']} | {miss['label']} | — | — | — | — | — | — | — | — | — | — | "
                         f"❌ missing: {miss['error']} |")
            checks.append({"task": name, "target": f"{miss['label']} produced", "value": miss["error"], "ok": False})
        for key in order:
            if key not in rows:
                continue
            r = rows[key]
            ratio = base["bytes"] / r["bytes"]
            delta = 100.0 * (r["accuracy"] - base["accuracy"])
            lat, lat_t, lat_n = b1(r), b1_tract(r), bn(r)
            vs_ort = lat / b1(fastest["b1"]) if fastest["b1"] else None
            vs_ort_t = lat_t / b1(fastest["b1"]) if fastest["b1"] else None
            dense = r.get("latency_tract") is not None
            vs_ort_n = lat_n / bn(fastest["bn"]) if fastest["bn"] else None
            target = ""
            if key == "hearth_int8":
                ok_size = ratio >= TARGET_INT8_RATIO
                ok_acc = -delta <= TARGET_INT8_LOSS_PTS
                ok_lat = vs_ort is not None and vs_ort <= TARGET_INT8_VS_ORT
                ok_lat_n = vs_ort_n is not None and vs_ort_n <= TARGET_INT8_VS_ORT
                target = (
                    f"{mark(ok_size)} ≥{TARGET_INT8_RATIO}x {mark(ok_acc)} ≤{TARGET_INT8_LOSS_PTS:g} pt "
                    f"{mark(ok_lat)} ≤{TARGET_INT8_VS_ORT:g}x ORT b1 {mark(ok_lat_n)} ≤{TARGET_INT8_VS_ORT:g}x ORT b{nb}"
                )
                checks += [
                    {"task": name, "target": f"int8 ≥ {TARGET_INT8_RATIO}x smaller", "value": f"{ratio:.2f}x", "ok": ok_size},
                    {"task": name, "target": f"int8 ≤ {TARGET_INT8_LOSS_PTS:g} pt loss", "value": f"{delta:+.2f} pts", "ok": ok_acc},
                    {"task": name, "target": "int8 latency ≤ 1.0x ORT int8, batch 1 (the faster of dynamic/static), "
                     + ("Hearth's dense engine" if dense else "tract plan"),
                     "value": f"{vs_ort:.2f}x ({lat:.2f} vs {b1(fastest['b1']):.2f} µs, {fastest['b1']['label']})" if vs_ort else "n/a",
                     "ok": ok_lat},
                ]
                if dense:
                    checks.append(
                        {"task": name, "target": "int8 latency ≤ 1.0x ORT int8, batch 1 (the faster of dynamic/static), tract plan",
                         "value": f"{vs_ort_t:.2f}x ({lat_t:.2f} vs {b1(fastest['b1']):.2f} µs, {fastest['b1']['label']})" if vs_ort_t else "n/a",
                         "ok": vs_ort_t is not None and vs_ort_t <= TARGET_INT8_VS_ORT})
                checks += [
                    {"task": name, "target": f"int8 tract latency ≤ 1.0x ORT int8, batch {nb} per sample (the faster of dynamic/static)",
                     "value": f"{vs_ort_n:.2f}x ({lat_n:.3f} vs {bn(fastest['bn']):.3f} µs, {fastest['bn']['label']})" if vs_ort_n else "n/a",
                     "ok": ok_lat_n},
                ]
            elif key == "hearth_best":
                ok_size = ratio >= TARGET_BEST_RATIO
                ok_acc = -delta <= TARGET_BEST_LOSS_PTS
                target = f"{mark(ok_size)} ≥{TARGET_BEST_RATIO:g}x {mark(ok_acc)} ≤{TARGET_BEST_LOSS_PTS:g} pts"
                checks += [
                    {"task": name, "target": f"best recipe ≥ {TARGET_BEST_RATIO:g}x smaller", "value": f"{ratio:.2f}x", "ok": ok_size},
                    {"task": name, "target": f"best recipe ≤ {TARGET_BEST_LOSS_PTS:g} pts loss", "value": f"{delta:+.2f} pts", "ok": ok_acc},
                ]
            elif key == "pruned50":
                lr = lat / b1(base)
                lr_n = lat_n / bn(base)
                ok, ok_n = lr <= TARGET_PRUNE_LATENCY, lr_n <= TARGET_PRUNE_LATENCY
                target = (f"{mark(ok)} b1 {lr:.2f}x fp32 {mark(ok_n)} b{nb} {lr_n:.2f}x fp32 "
                          f"(≤{TARGET_PRUNE_LATENCY}x)")
                checks.append(
                    {"task": name, "target": f"50% neuron pruning: latency ≤ {TARGET_PRUNE_LATENCY}x fp32, batch 1, "
                     + ("Hearth's dense engine" if dense else "tract plan"),
                     "value": f"{lr:.2f}x ({lat:.2f} vs {b1(base):.2f} µs)", "ok": ok})
                if dense:
                    lr_t = lat_t / b1_tract(base)
                    checks.append(
                        {"task": name, "target": f"50% neuron pruning: latency ≤ {TARGET_PRUNE_LATENCY}x fp32, batch 1, tract plan",
                         "value": f"{lr_t:.2f}x ({lat_t:.2f} vs {b1_tract(base):.2f} µs)", "ok": lr_t <= TARGET_PRUNE_LATENCY})
                checks += [
                    {"task": name, "target": f"50% neuron pruning: tract latency ≤ {TARGET_PRUNE_LATENCY}x fp32, batch {nb} per sample",
                     "value": f"{lr_n:.2f}x ({lat_n:.3f} vs {bn(base):.3f} µs)", "ok": ok_n},
                ]
            if r.get("batch_note"):
                target = (target + " " if target else "") + f"({r['batch_note']})"
            lines.append(
                f"| {name} {task['layers']} | {r['label']} | {r['engine']} | {fmt_bytes(r['bytes'])} | {ratio:.2f}x | "
                f"{r['accuracy']:.4f} | {delta:+.2f} | {lat:.2f} | {lat_t:.2f} | {lat_n:.3f} | "
                f"{'' if vs_ort is None else f'{vs_ort:.2f}x'} | {'' if vs_ort_n is None else f'{vs_ort_n:.2f}x'} | {target} |"
            )
            merged.append(dict(r, task=name, size_ratio=ratio, delta_pts=delta, vs_ort_int8=vs_ort,
                               vs_ort_int8_batch=vs_ort_n))
    return "\n".join(lines) + "\n", merged, checks


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = []
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "affinity": affinity,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("target/bench-compress"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/compress"),
                    help="writes <out>.md and <out>.json")
    ap.add_argument("--command", default="bench/compress", help="command line recorded in the output")
    args = ap.parse_args()

    hearth = json.loads((args.work / "hearth.json").read_text())
    warmup, runs = hearth["warmup"], hearth["runs"]
    batch, bwarmup, bruns = hearth["batch"], hearth["batch_warmup"], hearth["batch_runs"]
    ort_by_task = {}
    for task in hearth["tasks"]:
        ort_by_task[task["task"]] = ort_rows(task, args.work, warmup, runs, batch, bwarmup, bruns)
    ort_floor, ort_floor_batch = floor_latency(args.work, 10, warmup, runs, batch, bwarmup, bruns)
    hearth_floor, hearth_floor_batch = hearth["floor"], hearth["floor_batch"]
    dims = sorted({f"{t['task']} {r['label']}: {r['batch_dim']}" for t in hearth["tasks"] for r in t["variants"]}
                  | {f"{name} {r['label']}: {r['batch_dim']}" for name, rs in ort_by_task.items() for r in rs})
    fixed = [d for d in dims if d.rsplit(": ", 1)[1].isdigit()]

    table, merged, checks = build_table(hearth, ort_by_task)
    mach = machine()
    md = [
        f"Command: `{args.command}`  ",
        f"Machine: {mach['nproc']} CPUs, {mach['cpu']}; pinned to CPU {mach['affinity']}; "
        f"tract {hearth['tract']} ({hearth['profile']} build, {hearth['threads']} thread); "
        f"onnxruntime {mach['onnxruntime']} (intra_op_num_threads=1, inter_op_num_threads=1), "
        f"onnx {mach['onnx']}, numpy {mach['numpy']}, Python {mach['python']}  ",
        f"Latency b1: batch 1, {warmup} warm-up calls then the median of {runs} timed calls cycling through the test "
        "split. tract: `Classifier::predict` (input slice → probabilities). ORT: `session.run` through the Python API. "
        f"Latency b{batch}: per sample = median time of one {batch}-row call / {batch}, {bwarmup} warm-up calls then "
        f"{bruns} timed calls, call i taking rows i·{batch}… of the test split (wrapping). tract: "
        f"`Classifier::predict_batch` (symbolic-batch plan); ORT: `session.run` on a [{batch}, n] array. "
        + ("Every model declares a symbolic batch dimension (none fixed at 1). " if not fixed
           else f"Fixed batch dimensions: {', '.join(fixed)}. ")
        + f"Per-call floor (a Softmax-only [N,10] model, same protocol): tract "
        f"{hearth_floor['median_us']:.2f} µs (b1) / {hearth_floor_batch['per_sample']['median_us']:.3f} µs per sample (b{batch}), "
        f"ORT via Python {ort_floor['median_us']:.2f} µs / {ort_floor_batch['per_sample']['median_us']:.3f} µs. "
        "×-smaller and Δ pts are against the fp32 file / fp32 tract accuracy; \"vs ORT int8\" is against the "
        "faster of ORT's two int8 models (dynamic, static) at that batch size.",
        "",
        table,
        "Targets:",
        "",
        "| model | target | measured | met |",
        "|---|---|---|---|",
    ]
    for c in checks:
        md.append(f"| {c['task']} | {c['target']} | {c['value']} | {mark(c['ok'])} |")
    md.append("")
    text = "\n".join(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": mach, "command": args.command, "ort_floor": ort_floor, "ort_floor_batch": ort_floor_batch,
         "batch_dims": dims, "hearth": hearth, "rows": merged, "checks": checks}, indent=1))
    print()
    print(text)


if __name__ == "__main__":
    main()
