# Sourced by the aarch64 scripts (deploy/cross-aarch64.sh, scripts/package.sh arm64,
# scripts/test-aarch64.sh, bench/footprint): installs what a cross build for a Raspberry Pi
# (aarch64-unknown-linux-gnu) needs on a Debian x86-64 machine and exports cargo's linker and
# runner for it. The runner is qemu-user with the cross libc (no binfmt_misc needed);
# QEMU_CPU picks the emulated CPU (cortex-a72 = Pi 4, no dotprod; cortex-a76 = Pi 5).
# shellcheck shell=bash
hearth_aarch64_env() {
  local need=()
  command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}"
  fi
  rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  # qemu-user runs the binary with this sysroot for its dynamic loader and libc.
  export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
}
hearth_aarch64_env
