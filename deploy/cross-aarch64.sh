#!/usr/bin/env bash
# Cross-builds the Hearth binaries for a Raspberry Pi (aarch64-unknown-linux-gnu) from x86_64,
# and with --test also runs the dense engine, model and proto tests under qemu-user (the
# portable int8 path and NEON dispatch of hearth-dense) to prove the Pi build works.
#
#   deploy/cross-aarch64.sh            # release binaries in target/aarch64-unknown-linux-gnu/release/
#   deploy/cross-aarch64.sh --test     # plus the dense engine, model and proto tests under qemu-aarch64
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [[ "${1:-}" == "--test" ]]; then command -v qemu-aarch64 >/dev/null || need+=(qemu-user); fi
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}"
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

cargo build --release --target "$target" --bins
ls -l target/$target/release/hearth-{hub,agent,coordinator,demo}
if [[ "${1:-}" == "--test" ]]; then
  cargo test --target "$target" -p hearth-dense -p hearth-model -p hearth-proto
fi
