//! Writes the binary seed corpora of the fuzz targets (`<dir>/<target>/…`, see `fuzz/`) from
//! the real encoders: updates as agents send them, packages as `hearth-compress` writes them,
//! the coordinator's aggregate and optimizer state and the agent's federation state. Run by
//! `scripts/fuzz.sh` (`cargo run -p hearth-compress --example fuzz_seeds -- <dir>`); the text
//! seeds (task files, rules, data files, event payloads) are copied from the repository.
//!
//! It lives in the main workspace, not in `fuzz/`: cargo-fuzz builds every bin of its crate
//! with coverage instrumentation that only links beside libFuzzer, and here the encoders it
//! calls are compiled (and linted) with the rest, so it cannot drift from their API.

use hearth_agent::state::{FedState, PendingUpdate};
use hearth_compress::codebook::CodebookKind;
use hearth_compress::package::{encode_package, Schemes};
use hearth_compress::quant::{Granularity, QuantScheme};
use hearth_coordinator::aggregate::{weights_to_bytes, Aggregate};
use hearth_coordinator::config::ServerOptimizer;
use hearth_coordinator::optimizer::ServerState;
use hearth_model::onnx::{MlpSpec, OnnxModel};
use hearth_model::update::{encode_update, CodecConfig};
use rand::SeedableRng;
use std::path::Path;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), bytes).expect("seed file");
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: fuzz_seeds <corpus dir>");
    let dir = Path::new(&dir);
    let spec = MlpSpec {
        task: "seed".into(),
        input_len: 6,
        hidden: vec![5],
        classes: vec!["a".into(), "b".into(), "c".into()],
    };
    let model = OnnxModel::build_mlp(&spec, 3);
    let w = model.weights();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (bits, topk) in [(8, 1.0), (4, 0.3), (2, 0.1), (32, 1.0), (32, 0.5)] {
        let mut residual = Default::default();
        let cfg = CodecConfig {
            bits,
            topk_fraction: topk,
            entropy: true,
            compact: false,
        };
        let b = encode_update(&w, &mut residual, &cfg, &mut rng).expect("encode");
        write(dir, "update_codec", &format!("b{bits}_k{topk}"), &b);
    }
    let names: Vec<String> = w.keys().cloned().collect();
    let schemes: [(&str, QuantScheme); 4] = [
        (
            "affine4",
            QuantScheme::Affine {
                bits: 4,
                granularity: Granularity::PerChannel,
            },
        ),
        (
            "sym8",
            QuantScheme::Symmetric {
                bits: 8,
                granularity: Granularity::PerTensor,
            },
        ),
        ("pow2", QuantScheme::PowerOfTwo { bits: 4 }),
        (
            "codebook",
            QuantScheme::Codebook {
                bits: 2,
                kind: CodebookKind::KMeans,
            },
        ),
    ];
    write(
        dir,
        "package",
        "raw",
        &encode_package(&model, &Schemes::new(), None).expect("package"),
    );
    for (label, s) in schemes {
        let sc: Schemes = names.iter().map(|n| (n.clone(), s)).collect();
        // Half the weights pruned, so the sparse layouts appear.
        let masks = w
            .iter()
            .map(|(n, t)| {
                let data = (0..t.len()).map(|i| (i % 2) as f32).collect();
                (
                    n.clone(),
                    hearth_model::tensor::Tensor::new(t.shape.clone(), data),
                )
            })
            .collect();
        let p = encode_package(&model, &sc, Some(&masks)).expect("package");
        write(dir, "package", label, &p);
    }
    let mut agg = Aggregate::new(&w);
    agg.fold(&w, 2.0).expect("fold");
    let st = |tag: u8, name: &str, b: Vec<u8>| {
        let mut v = vec![tag];
        v.extend(b);
        write(dir, "state_files", name, &v);
    };
    st(0, "aggregate", agg.to_bytes());
    st(
        1,
        "optimizer",
        ServerState {
            optimizer: ServerOptimizer::FedAdam,
            steps: 3,
            m: Some(w.clone()),
            v: Some(w.clone()),
        }
        .to_bytes(),
    );
    st(2, "weights", weights_to_bytes(&w));
    let mut fed = FedState::default();
    fed.join(4);
    fed.residual = Some(w.clone());
    fed.pending = Some(PendingUpdate {
        round_id: 5,
        base_version: 2,
        deadline_unix_ms: 9,
        acked: false,
        num_samples: 10,
        train_loss: 0.5,
        payload: vec![1, 2, 3],
        residual: w.clone(),
        eval: (4, 0.7, 0.75),
    });
    st(3, "fedstate", fed.encode());
}
