#!/usr/bin/env python3
"""ONNX Runtime's answer on the vendored imported models (BENCHMARKS.md, "imported models").

For each model: ONNX Runtime's own pre-processing (`quant_pre_process`) then `quantize_dynamic`
(QInt8 weights, per channel), the same as a new user would do; reports the file size ratio and,
on the PaddleOCR classifier, the decision agreement with the fp32 model on the faces test images
fed exactly as `hearth-compress --data data/faces` feeds them (25x25 grey, bilinear resize with
half-pixel centres, scaled to [-1, 1], replicated to 3 channels), and the margins of the flipped
ones. Run from the repository root with bench/requirements.txt installed:

    python3 bench/ort_imported.py
"""
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

MODELS = [
    ("data/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", True),
    ("data/models/embedding_model.onnx", False),
    ("data/models/silero_vad_16k_sequence.onnx", False),
    ("data/models/face_detection_front_128x128_barracuda.onnx", False),
]
SAMPLES = 50


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


def faces_nchw(h, w, n):
    rows = np.loadtxt("data/faces/test.csv", delimiter=",")
    imgs = rows[:n, 1:].reshape(-1, 25, 25).astype(np.float32)
    return np.stack([np.repeat((resize(i, h, w) * 2 - 1)[None], 3, 0) for i in imgs]).astype(
        np.float32
    )


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path, decisions in MODELS:
            pre = os.path.join(tmp, "pre.onnx")
            dyn = os.path.join(tmp, "dyn.onnx")
            try:
                quant_pre_process(path, pre, skip_symbolic_shape=True)
                quantize_dynamic(pre, dyn, weight_type=QuantType.QInt8, per_channel=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{path}: ORT quantization failed: {e}")
                continue
            size, qsize = os.path.getsize(path), os.path.getsize(dyn)
            line = f"{path}: {size} -> {qsize} bytes, {size / qsize:.2f}x"
            if decisions:
                x = faces_nchw(48, 192, SAMPLES)
                a, b = ort.InferenceSession(path), ort.InferenceSession(dyn)
                name = a.get_inputs()[0].name
                pa = np.concatenate([a.run(None, {name: i[None]})[0] for i in x])
                pb = np.concatenate([b.run(None, {name: i[None]})[0] for i in x])
                same = pa.argmax(1) == pb.argmax(1)
                margins = np.abs(pa[~same].max(1) - 0.5)
                line += (
                    f"; max diff {np.abs(pa - pb).max():.3e}, mean {np.abs(pa - pb).mean():.3e}, "
                    f"decisions {same.sum()}/{len(same)} (flipped margins {np.round(margins, 3)})"
                )
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
