//! The compact model package decoder (`hearth_compress::package::decode_package`). The input
//! is used twice: as a whole package, and as a package *body* behind a valid header and
//! sha256, so the fuzzer reaches the manifest and payload parsers past the checksum.
#![no_main]

use hearth_compress::package::decode_package;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = decode_package(data);
    let body = data.get(37..).unwrap_or(data);
    let mut wrapped = Vec::with_capacity(body.len() + 37);
    wrapped.extend_from_slice(b"HPKG\x01");
    wrapped.extend_from_slice(&Sha256::digest(body));
    wrapped.extend_from_slice(body);
    let _ = decode_package(&wrapped);
});
