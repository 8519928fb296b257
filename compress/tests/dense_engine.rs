//! Hearth's dense engine against tract on the vendored data: the same models (float MLPs as
//! trained, structurally pruned, and their int8 QOperator exports, per tensor and per
//! channel) give the same outputs, and `Classifier` picks the dense engine for exactly the
//! models it runs.

use hearth_compress::{export_int8, export_int8_with, prune_neurons, Int8Options};
use hearth_model::{
    train, Classifier, Dataset, Engine, MlpSpec, OnnxModel, Split, Task, TrainConfig,
};
use prost::Message;
use std::path::PathBuf;

fn load(task: Task) -> (Dataset, Dataset) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    (
        task.load(&dir, Split::Train).unwrap(),
        task.load(&dir, Split::Test).unwrap(),
    )
}

fn trained(task: Task, tr: &Dataset, epochs: u32) -> OnnxModel {
    let spec = MlpSpec {
        hidden: vec![64, 32],
        ..task.default_spec()
    };
    let mut m = OnnxModel::build_mlp(&spec, 7);
    let cfg = TrainConfig {
        epochs,
        seed: 7,
        ..Default::default()
    };
    let (w, _) = train(&m, tr, &cfg).unwrap();
    m.set_weights(&w).unwrap();
    m
}

fn argmax(p: &[f32]) -> usize {
    hearth_model::infer::argmax(p).unwrap()
}

/// Max |Δ| between the engines over the test rows, and the share of equal argmaxes.
fn compare(m: &OnnxModel, ds: &Dataset) -> (f32, f32) {
    let dense = Classifier::with_engine(m, Engine::Dense).unwrap();
    let tract = Classifier::with_engine(m, Engine::Tract).unwrap();
    assert_eq!(dense.engine(), Engine::Dense);
    assert_eq!(tract.engine(), Engine::Tract);
    let (mut max_diff, mut same) = (0.0f32, 0usize);
    for x in ds.x.chunks_exact(ds.input_len) {
        let a = dense.predict(x).unwrap();
        let b = tract.predict(x).unwrap();
        assert_eq!(a.len(), b.len());
        for (u, v) in a.iter().zip(&b) {
            max_diff = max_diff.max((u - v).abs());
        }
        same += usize::from(argmax(&a) == argmax(&b));
    }
    (max_diff, same as f32 / ds.len() as f32)
}

#[test]
fn float_and_pruned_models_match_tract() {
    for task in [Task::Digits, Task::Plaid] {
        let (tr, te) = load(task);
        let m = trained(task, &tr, 3);
        assert_eq!(Classifier::new(&m).unwrap().engine(), Engine::Dense);
        let (diff, agree) = compare(&m, &te);
        println!("{task:?} f32: max |Δp| {diff:.2e}, argmax agreement {agree}");
        assert!(diff < 1e-5, "{task:?}: {diff}");
        assert_eq!(agree, 1.0);
        let pruned = prune_neurons(&m, 0.5).unwrap();
        let (diff, agree) = compare(&pruned, &te);
        assert!(diff < 1e-5, "{task:?} pruned: {diff}");
        assert_eq!(agree, 1.0);
    }
}

#[test]
fn int8_exports_match_tract() {
    for task in [Task::Digits, Task::Faces] {
        let (tr, te) = load(task);
        let m = trained(task, &tr, 3);
        for per_channel in [false, true] {
            let q = if per_channel {
                export_int8_with(&m, &tr, &Int8Options { per_channel })
            } else {
                export_int8(&m, &tr)
            }
            .unwrap();
            let d = hearth_model::dense::engine_for(&q);
            if per_channel {
                // The per-channel export is MatMulInteger + float ops: tract runs it.
                assert!(d.is_none());
                assert_eq!(Classifier::new(&q).unwrap().engine(), Engine::Tract);
                assert!(Classifier::with_engine(&q, Engine::Dense).is_err());
                continue;
            }
            assert!(d.is_some_and(|d| d.is_int8()));
            let (diff, agree) = compare(&q, &te);
            println!("{task:?} int8: max |Δp| {diff:.2e}, argmax agreement {agree}");
            // Same integer arithmetic and rounding: only the float softmax may differ.
            assert!(diff < 1e-5, "{task:?} int8: {diff}");
            assert_eq!(agree, 1.0, "{task:?} int8 agreement");
        }
    }
}

#[test]
fn other_graphs_stay_in_tract() {
    let (tr, _) = load(Task::Digits);
    let m = trained(Task::Digits, &tr, 1);
    // A graph whose output is the logits, not the probabilities, still runs densely.
    let mut proto = m.proto().clone();
    let g = proto.graph.as_mut().unwrap();
    let softmax = g.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    let logits = g.node[softmax].input[0].clone();
    g.node.remove(softmax);
    g.output[0].name = logits;
    let no_softmax = OnnxModel::from_bytes(&proto.encode_to_vec()).unwrap();
    let c = Classifier::new(&no_softmax).unwrap();
    assert_eq!(c.engine(), Engine::Dense);
    let x = &tr.x[..tr.input_len];
    let p = c.predict(x).unwrap();
    assert!(
        p.iter().any(|v| *v < 0.0 || *v > 1.0),
        "logits, not probabilities"
    );
    // An op outside the chain (here a Sigmoid on the logits) sends the model to tract.
    let g = proto.graph.as_mut().unwrap();
    let last = g.output[0].name.clone();
    g.node.push(tract_onnx::pb::NodeProto {
        op_type: "Sigmoid".into(),
        name: "sig".into(),
        input: vec![last],
        output: vec!["sig_out".into()],
        ..Default::default()
    });
    g.output[0].name = "sig_out".into();
    let other = OnnxModel::from_bytes(&proto.encode_to_vec()).unwrap();
    assert!(hearth_model::dense::engine_for(&other).is_none());
    assert_eq!(Classifier::new(&other).unwrap().engine(), Engine::Tract);
}
