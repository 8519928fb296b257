//! Engineer B's compression toolkit on real data: codebooks on trained layers, mixed
//! precision + quantization-aware fine-tuning, int8 QOperator export (integer kernels in
//! tract), and the compact package.

use hearth_compress::codebook::{assign_levels, codebook_mse, KMEANS_MAX_ITERS};
use hearth_compress::qonnx::{export_int8_with, matmul_kernels};
use hearth_compress::quant::Dequant;
use hearth_compress::{
    auto_mixed_precision, decode_package, encode_package, export_int8, fake_quantize,
    gaussian_quantile_levels, kmeans_levels, plan_uses_integer_kernels, qat_finetune,
    quantize_tensor, uniform_plan, Budget, CodebookKind, Granularity, Int8Options, QuantScheme,
    Schemes,
};
use hearth_model::{
    accuracy, train, Classifier, Dataset, OnnxModel, Split, Task, Tensor, TrainConfig, Weights,
};
use std::path::PathBuf;
use std::time::Instant;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn load(task: Task) -> (Dataset, Dataset) {
    (
        task.load(&data_dir(), Split::Train).unwrap(),
        task.load(&data_dir(), Split::Test).unwrap(),
    )
}

/// Trains the task's MLP (optionally with other hidden widths); returns model, train, test.
fn trained(task: Task, hidden: Option<Vec<usize>>) -> (OnnxModel, Dataset, Dataset) {
    let (tr, te) = load(task);
    let mut spec = task.default_spec();
    if let Some(h) = hidden {
        spec.hidden = h;
    }
    let model = OnnxModel::build_mlp(&spec, 0);
    let (w, _) = train(&model, &tr, &TrainConfig::default()).unwrap();
    let mut m = model;
    m.set_weights(&w).unwrap();
    (m, tr, te)
}

fn acc(m: &OnnxModel, ds: &Dataset) -> f32 {
    accuracy(&Classifier::new(m).unwrap(), ds).unwrap()
}

fn median_latency_us(m: &OnnxModel, x: &[f32], runs: usize) -> f64 {
    let c = Classifier::new(m).unwrap();
    for _ in 0..20 {
        c.predict(x).unwrap();
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            c.predict(x).unwrap();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn batch_latency_us(m: &OnnxModel, ds: &Dataset, n: usize, runs: usize) -> f64 {
    let c = Classifier::new(m).unwrap();
    let x = &ds.x[..n * ds.input_len];
    c.predict_batch(x, n).unwrap();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            c.predict_batch(x, n).unwrap();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn kmeans_beats_uniform_on_a_trained_layer_and_indices_round_trip() {
    let (m, _, _) = trained(Task::Digits, None);
    let w = m.weights()["fc0.weight"].clone();
    for bits in [2u8, 3, 4] {
        let uniform = fake_quantize(
            &w,
            &QuantScheme::Affine {
                bits,
                granularity: Granularity::PerTensor,
            },
        );
        let u = mse(&w.data, &uniform.data);
        let km = kmeans_levels(&w.data, 1 << bits, KMEANS_MAX_ITERS);
        let k = codebook_mse(&w.data, &km);
        let g = codebook_mse(&w.data, &gaussian_quantile_levels(&w.data, 1 << bits));
        eprintln!("fc0 {bits} bits: uniform mse {u:.3e}, k-means {k:.3e}, gaussian {g:.3e}");
        assert!(k <= u, "bits {bits}: k-means {k} vs uniform {u}");
        // Codebook indices round trip: codes -> levels -> codes.
        for kind in [CodebookKind::KMeans, CodebookKind::GaussianQuantile] {
            let q = quantize_tensor(&w, &QuantScheme::Codebook { bits, kind });
            let Dequant::Levels(levels) = &q.dequant else {
                panic!("not a codebook")
            };
            let d = q.dequantize();
            assert_eq!(assign_levels(&d.data, levels), q.codes);
            assert_eq!(d, fake_quantize(&w, &QuantScheme::Codebook { bits, kind }));
        }
    }
}

#[test]
fn int8_export_runs_integer_kernels_and_keeps_accuracy() {
    for task in [Task::Digits, Task::Faces, Task::Plaid] {
        let (m, tr, te) = trained(task, None);
        let q = export_int8(&m, &tr).unwrap();
        assert!(plan_uses_integer_kernels(&q).unwrap(), "{task}");
        assert!(!plan_uses_integer_kernels(&m).unwrap(), "{task}");
        let kernels = matmul_kernels(&q).unwrap();
        assert_eq!(kernels.len(), m.dense_layers().unwrap().len());
        let (a, b) = (acc(&m, &te), acc(&q, &te));
        eprintln!(
            "{task}: f32 {a:.4} int8 {b:.4} (loss {:.2} points); kernels {:?}",
            100.0 * (a - b),
            kernels
                .iter()
                .map(|k| (k.inputs.clone(), k.kernels.clone()))
                .collect::<Vec<_>>()
        );
        // ≤ 1 point, or a single test sample on the 50-sample faces set (2 points).
        let tolerance = (0.01f32).max(1.0 / te.len() as f32) + 1e-6;
        assert!(a - b <= tolerance, "{task}: f32 {a} int8 {b}");
    }
}

#[test]
fn int8_export_is_3_9x_smaller_on_the_wide_plaid_mlp() {
    let (m, tr, te) = trained(Task::Plaid, Some(vec![256, 128]));
    let f32_bytes = m.to_bytes().len();
    for per_channel in [true, false] {
        let q = export_int8_with(&m, &tr, &Int8Options { per_channel }).unwrap();
        let q_bytes = q.to_bytes().len();
        let ratio = f32_bytes as f64 / q_bytes as f64;
        let (a, b) = (acc(&m, &te), acc(&q, &te));
        let x = te.sample(0);
        let (lf, lq) = (median_latency_us(&m, x, 200), median_latency_us(&q, x, 200));
        let (bf, bq) = (
            batch_latency_us(&m, &te, 256, 15),
            batch_latency_us(&q, &te, 256, 15),
        );
        eprintln!("  batch 256 median: f32 {bf:.0} us, int8 {bq:.0} us");
        eprintln!(
            "plaid 387-256-128-11 per_channel={per_channel}: f32 {f32_bytes} B, int8 {q_bytes} B, \
             ratio {ratio:.3}; accuracy f32 {a:.4} int8 {b:.4}; tract batch-1 latency median \
             f32 {lf:.1} us, int8 {lq:.1} us"
        );
        assert!(plan_uses_integer_kernels(&q).unwrap());
        // Per-layer weight scales: ≥ 3.9x. Per-channel adds one f32 scale per output unit
        // (1.5 KB here), measured 3.88x.
        assert!(
            ratio >= if per_channel { 3.85 } else { 3.9 },
            "ratio {ratio}"
        );
        if std::env::var("HEARTH_DUMP_PLAN").is_ok() {
            use tract_onnx::prelude::*;
            let plan = tract_onnx::onnx()
                .model_for_proto_model(q.proto())
                .unwrap()
                .with_input_fact(0, f32::fact([1, 387]).into())
                .unwrap()
                .into_optimized()
                .unwrap();
            for n in plan.nodes() {
                eprintln!(
                    "  {} {} -> {:?}",
                    n.name,
                    n.op().name(),
                    n.outputs[0].fact.datum_type
                );
            }
        }
        assert!(a - b <= 0.01 + 1e-6, "f32 {a} int8 {b}");
    }
}

#[test]
fn mixed_precision_meets_size_and_accuracy_budgets() {
    let (m, _, te) = trained(Task::Digits, None);
    let candidates = [
        QuantScheme::Affine {
            bits: 8,
            granularity: Granularity::PerChannel,
        },
        QuantScheme::Affine {
            bits: 4,
            granularity: Granularity::PerChannel,
        },
        QuantScheme::Symmetric {
            bits: 2,
            granularity: Granularity::PerChannel,
        },
        QuantScheme::PowerOfTwo { bits: 4 },
        QuantScheme::Codebook {
            bits: 2,
            kind: CodebookKind::KMeans,
        },
        QuantScheme::Codebook {
            bits: 3,
            kind: CodebookKind::GaussianQuantile,
        },
    ];
    let float_bytes = 4 * m.weights().values().map(Tensor::len).sum::<usize>();
    let budget = float_bytes / 8;
    let p = auto_mixed_precision(&m, &te, &candidates, Budget::SizeBytes(budget)).unwrap();
    eprintln!(
        "size budget {budget} B: {} B ({:.2}x), accuracy {:.4} -> {:.4}, {:?}",
        p.total_bytes,
        p.compression_ratio(),
        p.baseline_accuracy,
        p.accuracy,
        p.layers
            .iter()
            .map(|l| (l.name.clone(), l.bits, l.scheme.map(|s| s.to_string())))
            .collect::<Vec<_>>()
    );
    assert!(p.total_bytes <= budget);
    assert!(p.total_bytes >= p.schemes.len());
    assert_eq!(p.accuracy, acc(&p.apply(&m).unwrap(), &te));
    let floor = p.baseline_accuracy - 0.01;
    let f = auto_mixed_precision(&m, &te, &candidates, Budget::AccuracyFloor(floor)).unwrap();
    eprintln!(
        "accuracy floor {floor:.4}: {} B ({:.2}x), accuracy {:.4}, bits {:?}",
        f.total_bytes,
        f.compression_ratio(),
        f.accuracy,
        f.layers.iter().map(|l| l.bits).collect::<Vec<_>>()
    );
    assert!(f.accuracy >= floor);
    assert!(f.total_bytes < float_bytes / 4, "{} bytes", f.total_bytes);
    // An impossible budget is an error, not a wrong plan.
    assert!(auto_mixed_precision(&m, &te, &candidates, Budget::SizeBytes(10)).is_err());
}

#[test]
fn qat_recovers_accuracy_lost_at_low_bits() {
    let (m, tr, te) = trained(Task::Digits, None);
    for scheme in [
        QuantScheme::Symmetric {
            bits: 2,
            granularity: Granularity::PerChannel,
        },
        QuantScheme::Affine {
            bits: 2,
            granularity: Granularity::PerChannel,
        },
    ] {
        let ptq = uniform_plan(&m, &te, scheme).unwrap();
        let cfg = TrainConfig {
            epochs: 8,
            learning_rate: 0.005,
            ..Default::default()
        };
        let qat = qat_finetune(&m, &tr, &ptq, &cfg).unwrap();
        let qat_acc = acc(&ptq.apply(&qat).unwrap(), &te);
        // The control: the same fine-tuning without fake quantization, then quantized. What
        // QAT gains over it is what training through the quantizer buys, not extra epochs.
        let (w, _) = train(&m, &tr, &cfg).unwrap();
        let mut tuned = m.clone();
        tuned.set_weights(&w).unwrap();
        let control_acc = acc(&ptq.apply(&tuned).unwrap(), &te);
        let lost = ptq.baseline_accuracy - ptq.accuracy;
        eprintln!(
            "{scheme}: float {:.4}, post-training {:.4} (lost {lost:.4}), QAT {:.4}, \
             float fine-tune then quantize {control_acc:.4}",
            ptq.baseline_accuracy, ptq.accuracy, qat_acc
        );
        assert!(
            lost >= 0.03,
            "{scheme}: PTQ lost only {lost}: nothing for QAT to recover"
        );
        assert!(
            qat_acc - ptq.accuracy >= 0.5 * lost,
            "{scheme}: QAT {qat_acc} recovers less than half of what PTQ lost ({} -> {})",
            ptq.baseline_accuracy,
            ptq.accuracy
        );
        assert!(
            qat_acc >= control_acc + 0.01,
            "{scheme}: QAT {qat_acc} is no better than fine-tuning in float ({control_acc})"
        );
    }
}

/// Magnitude masks per tensor (1 keep / 0 prune), `sparsity` of each weight pruned.
fn magnitude(w: &Weights, names: &[String], sparsity: f32) -> Weights {
    names
        .iter()
        .map(|n| {
            let t = &w[n];
            let mut mags: Vec<f32> = t.data.iter().map(|v| v.abs()).collect();
            mags.sort_by(f32::total_cmp);
            let k = ((t.len() as f32 * sparsity) as usize).min(t.len() - 1);
            let thr = mags[k];
            let data = t.data.iter().map(|v| f32::from(v.abs() >= thr)).collect();
            (n.clone(), Tensor::new(t.shape.clone(), data))
        })
        .collect()
}

#[test]
fn package_round_trips_exactly_and_is_10x_smaller() {
    let (m, tr, te) = trained(Task::Plaid, Some(vec![256, 128]));
    let names: Vec<String> = m
        .dense_layers()
        .unwrap()
        .into_iter()
        .map(|l| l.weight)
        .collect();
    let masks = magnitude(&m.weights(), &names, 0.8);
    let four = QuantScheme::Affine {
        bits: 4,
        granularity: Granularity::PerChannel,
    };
    let schemes: Schemes = names.iter().map(|n| (n.clone(), four)).collect();
    // Fine-tune the pruned model with its masks and 4-bit fake quantization (A's hooks).
    let plan = uniform_plan(&m, &te, four).unwrap();
    let cfg = TrainConfig {
        epochs: 10,
        masks: Some(masks.clone()),
        fake_quant: Some(plan.fake_quant()),
        ..Default::default()
    };
    let (w, _) = train(&m, &tr, &cfg).unwrap();
    let mut tuned = m.clone();
    tuned.set_weights(&w).unwrap();

    let pkg = encode_package(&tuned, &schemes, Some(&masks)).unwrap();
    let back = decode_package(&pkg).unwrap();
    // Exact: decoded weights equal fake_quantize(masked weights), bit for bit.
    let dw = back.weights();
    for (name, t) in tuned.weights() {
        let masked: Vec<f32> = match masks.get(&name) {
            Some(k) => t
                .data
                .iter()
                .zip(&k.data)
                .map(|(v, k)| if *k == 0.0 { 0.0 } else { *v })
                .collect(),
            None => t.data.clone(),
        };
        let masked = Tensor::new(t.shape.clone(), masked);
        let expect = match schemes.get(&name) {
            Some(s) => fake_quantize(&masked, s),
            None => masked,
        };
        let bits = |x: &Tensor| x.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dw[&name]), bits(&expect), "{name}");
    }
    let fp32 = m.to_bytes().len();
    let ratio = fp32 as f64 / pkg.len() as f64;
    let (a_float, a_tuned, a_pkg) = (acc(&m, &te), acc(&tuned, &te), acc(&back, &te));
    eprintln!(
        "plaid 387-256-128-11, 80% sparse 4-bit: fp32 ONNX {fp32} B, package {} B, ratio \
         {ratio:.2}; accuracy float {a_float:.4}, fine-tuned float {a_tuned:.4}, package {a_pkg:.4}",
        pkg.len()
    );
    assert!(ratio >= 10.0, "ratio {ratio}");
    assert!(
        a_pkg >= a_float - 0.05,
        "package accuracy {a_pkg} vs float {a_float}"
    );

    // Every dequantizer kind and raw tensors round trip, dense or sparse.
    let mut mixed = Schemes::new();
    mixed.insert(
        names[0].clone(),
        QuantScheme::Codebook {
            bits: 4,
            kind: CodebookKind::KMeans,
        },
    );
    mixed.insert(names[1].clone(), QuantScheme::PowerOfTwo { bits: 5 });
    mixed.insert(
        names[2].clone(),
        QuantScheme::Symmetric {
            bits: 8,
            granularity: Granularity::PerTensor,
        },
    );
    for mk in [None, Some(&masks)] {
        let p = encode_package(&m, &mixed, mk).unwrap();
        let d = decode_package(&p).unwrap();
        for (name, t) in d.weights() {
            let src = &m.weights()[&name];
            let masked: Vec<f32> = match mk.and_then(|k| k.get(&name)) {
                Some(k) => src
                    .data
                    .iter()
                    .zip(&k.data)
                    .map(|(v, k)| if *k == 0.0 { 0.0 } else { *v })
                    .collect(),
                None => src.data.clone(),
            };
            let masked = Tensor::new(src.shape.clone(), masked);
            let expect = mixed
                .get(&name)
                .map_or(masked.clone(), |s| fake_quantize(&masked, s));
            assert_eq!(t, expect, "{name}");
        }
        Classifier::new(&d).unwrap();
    }

    // Malformed input: errors, never panics.
    assert!(decode_package(&[]).is_err());
    assert!(decode_package(b"HPKG").is_err());
    for cut in (0..pkg.len()).step_by(pkg.len() / 97 + 1) {
        assert!(decode_package(&pkg[..cut]).is_err(), "truncated at {cut}");
    }
    let mut flipped = pkg.clone();
    flipped[pkg.len() / 2] ^= 0x10;
    assert!(
        decode_package(&flipped).is_err(),
        "sha256 must catch a flipped bit"
    );
    // Tampering with a recomputed sha256 reaches the parser: it must not panic either.
    use sha2::{Digest, Sha256};
    let small = encode_package(&m, &mixed, Some(&masks)).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..400 {
        let mut b = small.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = 37 + (state as usize) % (b.len() - 37);
            b[i] ^= (state >> 32) as u8 | 1;
        }
        let digest = Sha256::digest(&b[37..]);
        b[5..37].copy_from_slice(&digest);
        let _ = decode_package(&b);
    }
}
