//! Build script: only the release link options shared by the shipped binaries
//! (`deploy/release-link.rs`).
include!("../deploy/release-link.rs");
