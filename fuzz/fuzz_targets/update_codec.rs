//! The update codec (`hearth_model::update::decode_update`): what every agent uploads and the
//! coordinator decodes. Anything decoded must re-encode (dense, raw f32) to the same values.
#![no_main]

use hearth_model::update::{decode_update, encode_update, CodecConfig};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = decode_update(data) else { return };
    for t in w.values() {
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
        assert!(t.data.iter().all(|v| v.is_finite()));
    }
    // Round trip at 32 bits, dense: exact.
    let cfg = CodecConfig {
        bits: 32,
        topk_fraction: 1.0, entropy: true, compact: false };
    let mut residual = Default::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let bytes = encode_update(&w, &mut residual, &cfg, &mut rng).expect("re-encode");
    assert_eq!(decode_update(&bytes).expect("decode re-encoded"), w);
});
