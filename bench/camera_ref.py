#!/usr/bin/env python3
"""Reference BlazeFace detections: ONNX Runtime plus a plain numpy decode.

Written from MediaPipe's face_detection_front graph (SsdAnchorsCalculator,
TensorsToDetectionsCalculator, NonMaxSuppressionCalculator WEIGHTED), independently of the
Rust code, to check Hearth's detector (camera/src/detector.rs).

  camera_ref.py decode FRAMES.rgb OUT.json      # N×128×128×3 bytes → detections per frame
  camera_ref.py fixture DIR                     # writes DIR/frames.rgb and DIR/reference.json:
                                                # frames composed from data/faces (faces at
                                                # several places and sizes, two faces, none)
Runs in bench/.venv (onnxruntime, numpy; bench/requirements.txt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data/models/face_detection_front_128x128_barracuda.onnx"
N = 128
MIN_SCORE = 0.5
NMS_IOU = 0.3


def anchors() -> np.ndarray:
    """896 anchor centres (x, y): strides 8,16,16,16; 2 anchors per layer and cell."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        side = N // stride
        for y in range(side):
            for x in range(side):
                out += [((x + 0.5) / side, (y + 0.5) / side)] * per_cell
    return np.array(out, dtype=np.float32)


ANCHORS = anchors()


def session() -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])


def raw(sess: ort.InferenceSession, frame: np.ndarray):
    x = frame.reshape(1, N, N, 3).astype(np.float32) / 127.5 - 1.0
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    by_shape = {tuple(o.shape): o for o in outs}
    scores = np.concatenate([by_shape[(1, 512, 1)], by_shape[(1, 384, 1)]], axis=1).reshape(-1)
    boxes = np.concatenate([by_shape[(1, 512, 16)], by_shape[(1, 384, 16)]], axis=1).reshape(-1, 16)
    return scores, boxes


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return 0.0 if union <= 0 else inter / union


def decode(scores: np.ndarray, boxes: np.ndarray) -> list[dict]:
    prob = 1.0 / (1.0 + np.exp(-np.clip(scores.astype(np.float64), -100, 100)))
    xc = boxes[:, 0] / N + ANCHORS[:, 0]
    yc = boxes[:, 1] / N + ANCHORS[:, 1]
    w = boxes[:, 2] / N
    h = boxes[:, 3] / N
    cand = [
        (float(prob[i]), [xc[i] - w[i] / 2, yc[i] - h[i] / 2, xc[i] + w[i] / 2, yc[i] + h[i] / 2])
        for i in np.flatnonzero(prob >= MIN_SCORE)
    ]
    cand.sort(key=lambda c: -c[0])
    out = []
    while cand:
        top_score, top_box = cand[0]
        group = [c for c in cand if iou(top_box, c[1]) > NMS_IOU]
        cand = [c for c in cand if iou(top_box, c[1]) <= NMS_IOU]
        wsum = sum(s for s, _ in group)
        box = [sum(s * b[k] for s, b in group) / wsum for k in range(4)]
        out.append({"box": [float(min(max(v, 0.0), 1.0)) for v in box], "score": top_score})
    return out


def decode_file(sess, frames: np.ndarray) -> list[list[dict]]:
    return [decode(*raw(sess, f)) for f in frames]


def crops(cls: int) -> list[np.ndarray]:
    rows = [l.split(",") for l in (ROOT / "data/faces/test.csv").read_text().splitlines()]
    return [np.array(r[1:], dtype=np.float32).reshape(25, 25) for r in rows if int(r[0]) == cls]


def resize(img: np.ndarray, m: int) -> np.ndarray:
    idx = np.clip(((np.arange(m) + 0.5) * 25 / m - 0.5).round().astype(int), 0, 24)
    return img[idx][:, idx]


def fixture_frames() -> np.ndarray:
    faces, backgrounds = crops(1), crops(0)
    bg = resize(backgrounds[0], N) * 160 + 30
    layouts = [
        [(faces[0], 64, 32, 32)],
        [(faces[1], 56, 8, 60)],
        [(faces[2], 48, 4, 8), (faces[3], 48, 76, 72)],
        [],
    ]
    frames = []
    for layout in layouts:
        g = bg.copy()
        for face, size, x, y in layout:
            g[y : y + size, x : x + size] = resize(face, size) * 255
        frames.append(np.repeat(g.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return np.stack(frames)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "decode":
        frames = np.fromfile(sys.argv[2], dtype=np.uint8).reshape(-1, N, N, 3)
        Path(sys.argv[3]).write_text(json.dumps(decode_file(session(), frames)))
    elif len(sys.argv) == 3 and sys.argv[1] == "fixture":
        d = Path(sys.argv[2])
        d.mkdir(parents=True, exist_ok=True)
        frames = fixture_frames()
        frames.tofile(d / "frames.rgb")
        dets = decode_file(session(), frames)
        doc = {
            "model": MODEL.name,
            "onnxruntime": ort.__version__,
            "min_score": MIN_SCORE,
            "nms_iou": NMS_IOU,
            "frames": dets,
        }
        (d / "reference.json").write_text(json.dumps(doc, indent=1) + "\n")
        for i, f in enumerate(dets):
            print(i, [(round(x["score"], 3), [round(v, 3) for v in x["box"]]) for x in f])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
