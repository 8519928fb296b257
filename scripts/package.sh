#!/usr/bin/env bash
# Builds Hearth's Debian packages for one architecture, with plain dpkg-deb:
#
#   ./scripts/package.sh            # this machine's architecture
#   ./scripts/package.sh arm64      # Raspberry Pi OS 64-bit / Debian arm64 (cross-built)
#   ./scripts/package.sh amd64
#
# Writes target/deb/hearth-{coordinator,hub,agent,compress}_<version>_<arch>.deb and
# hearth-data_<version>_all.deb (the data sets the agent replays and the coordinator
# evaluates on; both depend on it). Each service package ships its binary in /usr/bin, its
# default configuration in /etc/hearth/ (conffiles: an edited file survives upgrades), the
# hardened systemd unit from deploy/systemd/ and maintainer scripts that create the `hearth`
# system user and /var/lib/hearth (0700); purging the last Hearth service package removes both.
# No service is enabled or started by installing: `systemctl enable --now hearth-hub` does.
# The maintainer scripts honour DPKG_ROOT, so `dpkg --root DIR --force-script-chrootless`
# installs into a scratch root (scripts/test-packages.sh).
#
# The release build is done once per target and reused (cargo rebuilds only what changed).
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:-$(dpkg --print-architecture)}
case "$arch" in
  amd64) objdump=objdump ;;
  arm64) objdump=aarch64-linux-gnu-objdump ;;
  *) echo "usage: $0 [amd64|arm64]" >&2; exit 64 ;;
esac
command -v dpkg-deb >/dev/null || { echo "error: dpkg-deb not found (Debian's dpkg)" >&2; exit 69; }
bins=(hearth-coordinator hearth-hub hearth-agent hearth-compress)
# HEARTH_RELEASE_DIR: package binaries built elsewhere (e.g. a CI artifact) instead of building.
out=${HEARTH_RELEASE_DIR:-$(./scripts/release-build.sh "$arch")}

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=target/deb
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$deb"

# The glibc a binary needs: the newest GLIBC_x.y version it references, or 2.36 if it was
# linked with DT_RELR (deploy/release-link.rs), which glibc marks with GLIBC_ABI_DT_RELR.
glibc_of() {
  local refs
  refs=$("$objdump" -p "$1")
  { grep -o 'GLIBC_[0-9][0-9.]*' <<<"$refs" | sed 's/GLIBC_//'
    if grep -q GLIBC_ABI_DT_RELR <<<"$refs"; then echo 2.36; fi; } | sort -uV | tail -1
}

# Maintainer scripts, shared by the three service packages ($1 = package = unit name).
write_scripts() {
  local pkg=$1 dir=$2 configs=$3
  cat >"$dir/DEBIAN/postinst" <<EOF
#!/bin/sh
# $pkg: the hearth system user, its state directory, configuration readable by it only.
set -e
root="\${DPKG_ROOT:-}"
if [ "\$1" = configure ]; then
  if ! grep -q '^hearth:' "\$root/etc/passwd" 2>/dev/null; then
    if [ -z "\$root" ] && command -v adduser >/dev/null 2>&1; then
      adduser --system --group --quiet --home /var/lib/hearth --no-create-home \\
        --gecos "Hearth smart-home services" hearth
    else
      useradd \${root:+--prefix "\$root"} --system --user-group --home-dir /var/lib/hearth \\
        --no-create-home --shell /usr/sbin/nologin --comment "Hearth smart-home services" hearth
    fi
  fi
  # Numeric ids from the target root's files, so this also works for dpkg --root.
  uid=\$(awk -F: '\$1 == "hearth" { print \$3 }' "\$root/etc/passwd")
  gid=\$(awk -F: '\$1 == "hearth" { print \$3 }' "\$root/etc/group")
  mkdir -p "\$root/var/lib/hearth"
  chown "\$uid:\$gid" "\$root/var/lib/hearth"
  chmod 0700 "\$root/var/lib/hearth"
  # Configurations hold tokens and passwords: root writes them, the services read them.
  chown "0:\$gid" "\$root/etc/hearth"
  chmod 0750 "\$root/etc/hearth"
  for f in $configs; do
    chown "0:\$gid" "\$root\$f"
    chmod 0640 "\$root\$f"
  done
  if [ -z "\$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # An upgrade restarts a running service; a first install starts nothing.
    systemctl try-restart $pkg.service || true
  fi
fi
exit 0
EOF
  cat >"$dir/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ] && [ "\$1" = remove ]; then
  systemctl disable --now $pkg.service || true
fi
exit 0
EOF
  cat >"$dir/DEBIAN/postrm" <<EOF
#!/bin/sh
# On purge of the last Hearth service package: the state (credentials, databases, the
# coordinator's CA) and the hearth user go too.
set -e
root="\${DPKG_ROOT:-}"
if [ -z "\$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
if [ "\$1" = purge ]; then
  for other in hearth-coordinator hearth-hub hearth-agent; do
    [ "\$other" != $pkg ] && [ -e "\$root/usr/bin/\$other" ] && exit 0
  done
  rm -rf "\$root/var/lib/hearth"
  rmdir "\$root/etc/hearth" 2>/dev/null || true
  if grep -q '^hearth:' "\$root/etc/passwd" 2>/dev/null; then
    if [ -z "\$root" ] && command -v deluser >/dev/null 2>&1; then
      deluser --system --quiet hearth || true
    else
      userdel \${root:+--prefix "\$root"} hearth || true
    fi
  fi
  if grep -q '^hearth:' "\$root/etc/group" 2>/dev/null; then
    groupdel \${root:+--prefix "\$root"} hearth 2>/dev/null || true
  fi
fi
exit 0
EOF
  chmod 0755 "$dir/DEBIAN/postinst" "$dir/DEBIAN/prerm" "$dir/DEBIAN/postrm"
}

copyright() {
  mkdir -p "$1/usr/share/doc/$2"
  cat >"$1/usr/share/doc/$2/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hearth
Source: $(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml)

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
}

# package <name> <arch> <depends> <description> -- files are already staged in $stage/<name>
finish() {
  local pkg=$1 parch=$2 depends=$3 desc=$4 dir=$stage/$1
  local size
  size=$(du -sk --exclude=DEBIAN "$dir" | cut -f1)
  cat >"$dir/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $parch
Maintainer: Hearth developers <hearth@example.invalid>
Section: net
Priority: optional
Installed-Size: $size
${depends:+Depends: $depends
}Homepage: $(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml)
Description: $desc
EOF
  find "$dir" -type d -exec chmod 0755 {} +
  dpkg-deb --root-owner-group -Zxz --build "$dir" "$deb/${pkg}_${version}_${parch}.deb" >/dev/null
  echo "$deb/${pkg}_${version}_${parch}.deb"
}

# hearth-data: the vendored data sets (task files, train/test splits), architecture-free.
d=$stage/hearth-data
mkdir -p "$d/DEBIAN" "$d/usr/share/hearth/data"
for set in data/*/task.toml; do
  cp -r "$(dirname "$set")" "$d/usr/share/hearth/data/"
done
cp data/README.md data/provenance.json "$d/usr/share/hearth/data/"
copyright "$d" hearth-data
finish hearth-data all "" "Hearth smart-home hub: data sets
 The real data sets Hearth's device agents replay as if sensed and its coordinator
 evaluates new model versions on (PLAID, faces, digits, GunPoint, BasicMotions), with
 their task files."

for b in "${bins[@]}"; do
  d=$stage/$b
  mkdir -p "$d/DEBIAN" "$d/usr/bin"
  install -m 0755 "$out/$b" "$d/usr/bin/$b"
  copyright "$d" "$b"
  depends="libc6 (>= $(glibc_of "$out/$b"))"
  configs=""
  case "$b" in
    hearth-coordinator) configs="/etc/hearth/coordinator.toml" ;;
    hearth-hub) configs="/etc/hearth/hub.toml /etc/hearth/rules.toml" ;;
    hearth-agent) configs="/etc/hearth/agent.toml" ;;
  esac
  if [[ -n "$configs" ]]; then
    mkdir -p "$d/etc/hearth" "$d/usr/lib/systemd/system"
    for f in $configs; do
      install -m 0640 "deploy/config/$(basename "$f")" "$d$f"
      echo "$f" >>"$d/DEBIAN/conffiles"
    done
    install -m 0644 "deploy/systemd/$b.service" "$d/usr/lib/systemd/system/$b.service"
    write_scripts "$b" "$d" "$configs"
  fi
  case "$b" in
    hearth-coordinator)
      depends+=", hearth-data (= $version)"
      desc="Hearth smart-home hub: federated-learning coordinator
 Enrols devices (its own small CA, mutual TLS), runs federated rounds over gRPC and
 publishes signed model versions. Configure /etc/hearth/coordinator.toml, then
 systemctl enable --now hearth-coordinator." ;;
    hearth-hub)
      desc="Hearth smart-home hub: MQTT hub
 Embedded MQTT broker (or Mosquitto), event validation, rules that drive actuators,
 device credentials (hearth-hub provision-device). Configure /etc/hearth/hub.toml and
 rules.toml, then systemctl enable --now hearth-hub." ;;
    hearth-agent)
      depends+=", hearth-data (= $version)"
      desc="Hearth smart-home hub: device agent
 Runs a small model on a device's sensor data, publishes events over MQTT and learns
 locally in federated rounds. Enrol with hearth-agent enroll, then
 systemctl enable --now hearth-agent." ;;
    hearth-compress)
      desc="Hearth smart-home hub: model compression toolkit
 Quantisation, pruning, low-rank, distillation and int8 export of Hearth's and imported
 ONNX models, with a measurement table (command-line tool, no service)." ;;
  esac
  finish "$b" "$arch" "$depends" "$desc"
done
