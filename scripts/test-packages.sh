#!/usr/bin/env bash
# Tests the Debian packages of one architecture (built by ./scripts/package.sh) by installing
# them with dpkg into a scratch root and running the installed binaries from there:
#
#   ./scripts/test-packages.sh [amd64|arm64]     # arm64 binaries run under qemu-aarch64
#
# 1. dpkg --root <scratch> --force-script-chrootless -i: the maintainer scripts run (they
#    honour DPKG_ROOT) and create the hearth user in the scratch root's /etc/passwd, never
#    the host's. --force-depends: the scratch root has no libc6 package (the binaries run
#    with the host's libc, or the cross libc under qemu).
# 2. Checks: binaries for the right machine in /usr/bin, configs in /etc/hearth registered as
#    conffiles and readable by root and the hearth group only, the hearth system user, the
#    state directory /var/lib/hearth (0700, owned by hearth), the hardened units, the data.
# 3. Runs them: --print-default-config of each service, then the README's home (coordinator,
#    enrolment token, hub, device login, agent enrolment, agent) from the packaged configs
#    (absolute paths moved under the scratch root, free ports) until the hub receives the
#    agent's first event, and a clean shutdown (SIGTERM, exit 0) of all three.
# 4. dpkg --purge: the user, /var/lib/hearth and /etc/hearth are gone.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:-$(dpkg --print-architecture)}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
services=(hearth-coordinator hearth-hub hearth-agent)
debs=(target/deb/hearth-data_"${version}"_all.deb)
for p in "${services[@]}" hearth-compress; do debs+=(target/deb/"${p}_${version}_${arch}".deb); done
for d in "${debs[@]}"; do
  [[ -f "$d" ]] || { echo "error: $d missing: run ./scripts/package.sh $arch first" >&2; exit 66; }
done
case "$arch" in
  amd64) machine="X86-64" runner="" slow=1 ;;
  arm64)
    source deploy/aarch64-env.sh
    # A Raspberry Pi 4's CPU (no dotprod: the fallback int8 kernel).
    machine="AArch64" runner="qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu" slow=5 ;;
  *) echo "usage: $0 [amd64|arm64]" >&2; exit 64 ;;
esac

root=$(mktemp -d /tmp/hearth-pkg-root.XXXXXX)
trap 'rm -rf "$root"' EXIT
failures=0
check() { # check <description> <command...>
  local what=$1; shift
  if "$@"; then echo "ok   $what"; else echo "FAIL $what"; failures=$((failures + 1)); fi
}

# A scratch root: an empty dpkg database and the account files useradd --prefix edits.
mkdir -p "$root"/var/lib/dpkg/{info,updates,triggers} "$root/etc"
touch "$root/var/lib/dpkg/status"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
echo 'root:*:20000:0:99999:7:::' >"$root/etc/shadow"
echo 'root:*::' >"$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
cp /etc/login.defs "$root/etc/"
[[ "$arch" == "$(dpkg --print-architecture)" ]] || dpkg --root="$root" --add-architecture "$arch"
dpkg=(dpkg --root="$root" --force-script-chrootless --force-depends)

echo "== install into $root"
"${dpkg[@]}" -i "${debs[@]}" 2>&1 | grep -v -e '^(Reading database' -e 'dependency problems' -e 'depends on libc6' -e 'Package libc6 is not installed' || true
for p in hearth-data "${services[@]}" hearth-compress; do
  check "$p installed" test "$(dpkg-query --root="$root" -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed
done

echo "== files"
uid=$(awk -F: '$1 == "hearth" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "hearth" { print $3 }' "$root/etc/group")
check "hearth system user (uid ${uid:-none} < 1000, no login shell)" \
  bash -c "[[ -n '$uid' && '$uid' -lt 1000 ]] && grep -q '^hearth:.*:/var/lib/hearth:/usr/sbin/nologin$' '$root/etc/passwd'"
check "hearth group" test -n "$gid"
check "/var/lib/hearth owned by hearth, 0700" test "$(stat -c '%u %a' "$root/var/lib/hearth")" = "$uid 700"
check "/etc/hearth root:hearth 0750" test "$(stat -c '%u %g %a' "$root/etc/hearth")" = "0 $gid 750"
declare -A conf=([hearth-coordinator]="coordinator.toml" [hearth-hub]="hub.toml rules.toml" [hearth-agent]="agent.toml")
for p in "${services[@]}"; do
  for b in $p hearth-compress; do
    check "/usr/bin/$b is an executable for $machine" \
      bash -c "[[ -x '$root/usr/bin/$b' ]] && readelf -h '$root/usr/bin/$b' | grep -q 'Machine:.*$machine'"
  done
  for f in ${conf[$p]}; do
    check "/etc/hearth/$f is a conffile of $p" \
      bash -c "dpkg-query --root='$root' -W -f='\${Conffiles}' $p | grep -q '^ /etc/hearth/$f '"
    check "/etc/hearth/$f is the shipped one, root:hearth 0640" \
      bash -c "cmp -s '$root/etc/hearth/$f' deploy/config/$f && [[ \$(stat -c '%u %g %a' '$root/etc/hearth/$f') == '0 $gid 640' ]]"
  done
  check "$p.service is the hardened unit from deploy/systemd" \
    cmp -s "$root/usr/lib/systemd/system/$p.service" "deploy/systemd/$p.service"
done
# The glibc each binary needs (its newest GLIBC_x.y; a DT_RELR binary, deploy/release-link.rs,
# needs 2.36) must be what its package's Depends asks for, or apt would install it where it
# cannot start.
need_glibc() {
  readelf -V "$1" | grep -o 'GLIBC_[0-9A-Z_.]*' | sed -e 's/^GLIBC_ABI_DT_RELR$/2.36/' -e 's/^GLIBC_//' \
    | grep '^[0-9]' | sort -uV | tail -1
}
for b in "${services[@]}" hearth-compress; do
  need=$(need_glibc "$root/usr/bin/$b")
  dep=$(dpkg-query --root="$root" -W -f='${Depends}' "$b" | grep -o 'libc6 (>= [0-9.]*' | grep -o '[0-9.]*$' || true)
  check "$b Depends: libc6 (>= ${dep:-none}) covers the glibc it needs ($need)" \
    dpkg --compare-versions "${dep:-0}" ge "$need"
done
check "the data sets are in /usr/share/hearth/data" test -f "$root/usr/share/hearth/data/plaid/task.toml"

echo "== run the installed binaries${runner:+ under $runner}"
for b in "${services[@]}"; do
  check "$b --print-default-config" bash -c "$runner '$root/usr/bin/$b' --print-default-config | grep -q ."
done
check "hearth-compress --help" bash -c "$runner '$root/usr/bin/hearth-compress' --help | grep -q '^Usage: hearth-compress'"
check "a home from the packaged configs: first event, clean shutdown" \
  python3 - "$root" "$runner" "$slow" <<'EOF'
import sys, time
from pathlib import Path
sys.path.insert(0, "scripts")
from hearth_home import Home, wait_for

root, runner, slow = Path(sys.argv[1]), sys.argv[2].split(), float(sys.argv[3])
home = Home(root / "usr/bin", runner, root, root / "etc/hearth", slow)
try:
    home.start_coordinator()
    home.start_hub()
    t0 = time.monotonic()
    agent = home.add_agent("plug-1", 0, 3)
    wait_for("the agent's first event at the hub", lambda: home.events() >= 1, 120 * slow, home.services)
    print(f"     first event {time.monotonic() - agent.started:.2f} s after the agent started")
    codes = home.stop_all()
    print(f"     exit codes: {codes}")
    ok = all(c == 0 for c in codes.values())
    if not ok:
        for s in home.services:
            print(f"--- {s.name}\n{s.log_tail()}")
    sys.exit(0 if ok else 1)
except Exception as e:
    print(f"     {e}")
    for s in home.services:
        print(f"--- {s.name}\n{s.log_tail()}")
    home.kill_all()
    sys.exit(1)
EOF

echo "== purge"
# The device password files were made by the "user" (the run above), not by a package: dpkg
# leaves such files (and so /etc/hearth) alone, as it should; remove them first.
rm -f "$root"/etc/hearth/*.password
"${dpkg[@]}" --purge hearth-agent hearth-hub hearth-coordinator hearth-compress hearth-data >/dev/null 2>&1 || true
check "packages gone" bash -c "! dpkg-query --root='$root' -W -f='\${db:Status-Status}\n' hearth-hub 2>/dev/null | grep -q installed"
check "hearth user and group removed" bash -c "! grep -q '^hearth:' '$root/etc/passwd' '$root/etc/group'"
check "/var/lib/hearth removed" test ! -e "$root/var/lib/hearth"
check "/etc/hearth removed" test ! -e "$root/etc/hearth"

if ((failures)); then echo "$failures check(s) failed" >&2; exit 1; fi
echo "all package checks passed ($arch)"
