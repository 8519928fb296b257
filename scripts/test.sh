#!/usr/bin/env bash
# The test command: formatting, lints and the whole test suite (unit + end-to-end over loopback).
# Installs what it needs on a fresh Debian machine; needs only cargo and Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null && ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest not found: installing it with cargo" >&2
  cargo install --locked cargo-nextest
fi

# Debian's Mosquitto: the mqtts:// test (edge/tests/tls.rs) runs against it (it skips, saying
# so, when the binary is missing).
if [ ! -x /usr/sbin/mosquitto ] && command -v apt-get >/dev/null; then
  echo "mosquitto not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y mosquitto || { $SUDO apt-get update && $SUDO apt-get install -y mosquitto; }
fi

# Debian's ffmpeg: the camera tests (camera/tests/streams.rs, device-agent/tests/camera.rs) decode
# and serve real streams with it (they skip, saying so, when it is missing).
if ! command -v ffmpeg >/dev/null && command -v apt-get >/dev/null; then
  echo "ffmpeg not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y ffmpeg || { $SUDO apt-get update && $SUDO apt-get install -y ffmpeg; }
fi

# Debian's PostgreSQL: the coordinator's storage, round and multi-instance tests start clusters
# of their own with its initdb/postgres (they skip, saying so, when the binaries are missing).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "PostgreSQL not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y postgresql || { $SUDO apt-get update && $SUDO apt-get install -y postgresql; }
fi

cargo fmt --all -- --check
# The agent and the coordinator must not compile the compression toolkit (ARCHITECTURE.md).
for bin in hearth-agent hearth-coordinator; do
  if cargo tree -p "$bin" -e normal --locked --prefix none | grep -E '^(hearth-compress|indicatif) '; then
    echo "error: $bin depends on the compression toolkit" >&2
    exit 1
  fi
done
cargo clippy --workspace --all-targets --locked -- -D warnings
# One profile (dev, dependencies optimised) for the tests and the demo: compiled once.
cargo nextest run --workspace --locked --no-fail-fast "$@"
