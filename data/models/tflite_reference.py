#!/usr/bin/env python3
"""Reference outputs of the vendored .tflite models, computed once with the TFLite runtime.

Runs each model in `ai-edge-litert` (pip, the TensorFlow Lite runtime; version recorded) on
inputs every side can rebuild without Python:

- `face_detection_short_range.tflite`: the 4 camera fixture frames
  (`camera/tests/fixtures/frames.rgb`, 4 x 128x128x3 RGB bytes), scaled `x / 127.5 - 1` in f32
  (MediaPipe's [-1, 1] range, as the camera detector feeds it);
- `hand_recrop.tflite`: the same 4 frames, each upscaled 2x by pixel repetition to 256x256,
  same scaling.

Writes `data/models/reference/<stem>.npz` (numpy.savez, stored members: one array per model
output, named by the output tensor, leading axis = frame) and
`data/models/reference/provenance.json` (runtime version, inputs, sha256 of model, inputs and
outputs). Needs numpy and ai-edge-litert: `bench/tflite/run.sh` builds the venv.
Usage: python tflite_reference.py
"""
import hashlib
import io
import json
import pathlib
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from importlib.metadata import version

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = ROOT / "data/models"
OUT = HERE / "reference"
FRAMES = ROOT / "camera/tests/fixtures/frames.rgb"


def frames() -> np.ndarray:
    raw = np.frombuffer(FRAMES.read_bytes(), dtype=np.uint8)
    return raw.reshape(-1, 128, 128, 3)


def scale(f: np.ndarray) -> np.ndarray:
    return f.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def inputs(stem: str) -> np.ndarray:
    f = frames()
    if stem == "hand_recrop":
        f = f.repeat(2, axis=1).repeat(2, axis=2)
    return scale(f)


def run(path: pathlib.Path, x: np.ndarray) -> dict:
    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    ind = it.get_input_details()[0]["index"]
    outs = {d["name"]: [] for d in it.get_output_details()}
    for frame in x:
        it.set_tensor(ind, frame[None])
        it.invoke()
        for d in it.get_output_details():
            outs[d["name"]].append(it.get_tensor(d["index"])[0].copy())
    return {k: np.stack(v).astype(np.float32) for k, v in outs.items()}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    prov = {
        "runtime": f"ai-edge-litert {version('ai-edge-litert')} (PyPI), numpy {np.__version__}",
        "threads": 1,
        "inputs": "camera/tests/fixtures/frames.rgb (sha256 "
        + hashlib.sha256(FRAMES.read_bytes()).hexdigest()
        + "), x / 127.5 - 1 in f32; hand_recrop: each frame upscaled 2x by repetition",
        "models": {},
    }
    for stem in ("face_detection_short_range", "hand_recrop"):
        model = HERE / f"{stem}.tflite"
        outs = run(model, inputs(stem))
        buf = io.BytesIO()
        np.savez(buf, **outs)
        (OUT / f"{stem}.npz").write_bytes(buf.getvalue())
        prov["models"][stem] = {
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "outputs": {k: list(v.shape) for k, v in outs.items()},
            "npz_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        }
        print(stem, {k: v.shape for k, v in outs.items()})
    (OUT / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
