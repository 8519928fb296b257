//! Task files (`data/<set>/task.toml` → `hearth_model::task::TaskSpec`): parsed by the agent,
//! the coordinator and the compression CLI. A spec that parses must answer its derived sizes
//! and run its preprocessing chain on a small input without panicking.
#![no_main]

use hearth_model::task::TaskSpec;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = TaskSpec::from_toml_str(text, Path::new("/nonexistent/fuzz/task.toml")) else {
        return;
    };
    let _ = spec.mlp_spec();
    let channels = spec.input.channels().min(16);
    let raw: Vec<Vec<f32>> = (0..channels)
        .map(|c| {
            (0..64)
                .map(|i| (i as f32 * 0.37 + c as f32).sin())
                .collect()
        })
        .collect();
    let _ = spec.preprocess(&raw);
});
