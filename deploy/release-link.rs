// The link options of Hearth's shipped binaries' release builds, in one place: included by the
// build scripts of device-agent, hub, coordinator and compress (`include!`).
//
// Release builds for glibc Linux (amd64, arm64) link with `-z pack-relative-relocs` (DT_RELR; GNU
// ld >= 2.38, lld): a position-independent executable keeps one 24-byte `.rela.dyn` entry per
// pointer to relocate at start (vtables and other tables of pointers; the agent had ~43 000: 1.03
// MB of its 17.06 MB), which DT_RELR stores as a bitmap of a few KB. The code, the address-space
// randomisation and the relocation work at start are unchanged. The binaries then need glibc >=
// 2.36 (Debian 12, Raspberry Pi OS bookworm; scripts/package.sh writes it into Depends). Dev and
// test builds are not affected. `HEARTH_RELR=0` links without it (a build machine with an older
// glibc or binutils, for binaries that must run on glibc < 2.36).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../deploy/release-link.rs");
    println!("cargo:rerun-if-env-changed=HEARTH_RELR");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("HEARTH_RELR") != "0"
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
