//! Binary state read back from disk or the store: the coordinator's running aggregate,
//! its server-optimizer state and kept updates, and the agent's federation state file.
//! The first byte picks the decoder.
#![no_main]

use hearth_coordinator::aggregate::{weights_from_bytes, Aggregate};
use hearth_coordinator::optimizer::ServerState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = Aggregate::from_bytes(rest);
        }
        1 => {
            let _ = ServerState::from_bytes(rest);
        }
        2 => {
            let _ = weights_from_bytes(rest);
        }
        _ => {
            let _ = hearth_agent::state::FedState::decode(rest);
        }
    }
});
