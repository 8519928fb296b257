//! The data formats a task file points at (`hearth_model::formats`): UCR/UEA `.ts`, CSV,
//! `.npy` and `.npz`. The first byte picks the parser.
#![no_main]

use hearth_model::formats::{csv, npy, ts};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz");
    match which % 5 {
        0 => {
            let _ = npy::parse(rest);
        }
        1 => {
            let _ = npy::parse_npz(rest, "x");
        }
        2 => {
            if let Ok(t) = std::str::from_utf8(rest) {
                let _ = ts::parse(t, path);
            }
        }
        3 => {
            if let Ok(t) = std::str::from_utf8(rest) {
                let _ = csv::parse(t, path, &csv::CsvOptions::default());
            }
        }
        _ => {
            if let Ok(t) = std::str::from_utf8(rest) {
                let opts = csv::CsvOptions {
                    header: false,
                    label_column: String::new(),
                };
                let _ = csv::parse(t, path, &opts);
            }
        }
    }
});
