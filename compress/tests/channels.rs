//! Structured channel pruning of conv graphs: a real vendored CNN shrinks and still runs in
//! tract; channels tied by a residual `Add` are removed together (built graph, checked
//! against masking the same channels); least-squares recovery brings the pruned model's
//! outputs closer to the original's; the CLI step.

mod common;
use common::{init, value_info};
use hearth_compress::channels::{analyse, prune_channels, ChannelCriterion};
use hearth_compress::measure::GenericRunner;
use hearth_compress::normalise::{self, normalise, probe_inputs};
use hearth_compress::reconstruct::reconstruct;
use hearth_model::OnnxModel;
use prost::Message;
use std::path::{Path, PathBuf};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn no_progress(_: u64, _: u64) {}

fn conv_shapes(m: &OnnxModel) -> Vec<Vec<usize>> {
    let g = m.proto().graph.as_ref().unwrap();
    let w = m.weights();
    g.node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .map(|n| w[&n.input[1]].shape.clone())
        .collect()
}

fn outputs(r: &GenericRunner, x: &[f32]) -> Vec<f32> {
    r.run(x).unwrap().into_iter().flat_map(|o| o.data).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// PaddleOCR's text-direction classifier (MobileNetV3: depthwise convs, squeeze-excitation
/// `Mul`s, residual `Add`s, a final `MatMul` after `Reshape`), as shipped, normalised.
fn paddle_cls() -> OnnxModel {
    let raw = OnnxModel::load(&workspace().join("data/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"))
        .unwrap();
    let pinned = normalise::pin_input_shape(&raw, &[1, 3, 48, 192]).unwrap();
    normalise(&pinned).unwrap().0
}

#[test]
fn channel_pruning_shrinks_a_real_cnn_and_it_still_runs() {
    let m = paddle_cls();
    let a = analyse(&m).unwrap();
    assert!(a.removable_count() > 500, "{}", a.removable_count());
    let (p, report) = prune_channels(&m, 0.5, ChannelCriterion::L1, &[], &no_progress).unwrap();
    eprintln!("{report}");
    let (b0, b1) = (m.to_bytes().len(), p.to_bytes().len());
    eprintln!("bytes {b0} -> {b1}");
    assert!(b1 * 10 < b0 * 5, "file did not shrink enough: {b0} -> {b1}");
    assert!(
        report.conv_channels.1 * 10 < report.conv_channels.0 * 6,
        "{report}"
    );
    // Every conv whose output reaches nothing but rewritten ops lost channels; the graph
    // output (2 classes) is unchanged and tract runs the smaller model.
    let before = conv_shapes(&m);
    let after = conv_shapes(&p);
    assert_eq!(before.len(), after.len());
    let shrunk = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x[0] > y[0])
        .count();
    assert!(
        shrunk * 10 >= before.len() * 8,
        "{shrunk} of {}",
        before.len()
    );
    let (ra, rb) = (
        GenericRunner::new(&m).unwrap(),
        GenericRunner::new(&p).unwrap(),
    );
    for x in probe_inputs(&[1, 3, 48, 192], 3, 1) {
        let (ya, yb) = (outputs(&ra, &x), outputs(&rb, &x));
        assert_eq!(ya.len(), 2);
        assert_eq!(yb.len(), 2);
        assert!(
            (yb.iter().sum::<f32>() - 1.0).abs() < 1e-4,
            "softmax: {yb:?}"
        );
    }
}

fn node(op: &str, inputs: &[&str], output: &str, ints: &[(&str, Vec<i64>)]) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        attribute: ints
            .iter()
            .map(|(k, v)| {
                if *k == "group" {
                    pb::AttributeProto {
                        name: (*k).into(),
                        r#type: pb::attribute_proto::AttributeType::Int as i32,
                        i: v[0],
                        ..Default::default()
                    }
                } else {
                    pb::AttributeProto {
                        name: (*k).into(),
                        r#type: pb::attribute_proto::AttributeType::Ints as i32,
                        ints: v.clone(),
                        ..Default::default()
                    }
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Filters of `out` channels whose L1 norms are `norms` (every weight of channel o equal).
fn filters(norms: &[f32], per: usize, seed: u32) -> Vec<f32> {
    norms
        .iter()
        .enumerate()
        .flat_map(|(o, &n)| {
            (0..per).map(move |k| {
                let s = if (o as u32 + k as u32 + seed).is_multiple_of(3) {
                    -1.0
                } else {
                    1.0
                };
                s * n / per as f32
            })
        })
        .collect()
}

/// input [1,3,8,8] → A: Conv 3→8 (3×3) → Relu = x; DW: depthwise 3×3 on x → B: Conv 1×1
/// 8→8 = y; z = Add(x, y); z2 = Concat(z, zeros [1,2,8,8]) on channels; C: Conv 1×1 10→4 →
/// output. Channel i of A and of B are tied by the Add. A's weak channels are 0–3 (by far),
/// B's are 4–7 (slightly): tied, channels 0–3 go from both; untied, A and B would lose
/// different channels.
fn tied_graph() -> OnnxModel {
    let a_norms = [0.01, 0.02, 0.01, 0.02, 1.0, 1.1, 0.9, 1.0];
    let b_norms = [0.9, 0.95, 0.9, 0.95, 1.1, 1.05, 1.1, 1.05];
    let c: Vec<f32> = (0..40)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    let dw: Vec<f32> = (0..72).map(|i| ((i * 5 % 9) as f32 - 4.0) / 8.0).collect();
    let bias: Vec<f32> = (0..8).map(|i| i as f32 / 20.0).collect();
    let pads = ("pads", vec![1, 1, 1, 1]);
    let nodes = vec![
        node(
            "Conv",
            &["input", "a.w", "a.b"],
            "a",
            std::slice::from_ref(&pads),
        ),
        node("Relu", &["a"], "x", &[]),
        node("Conv", &["x", "dw.w"], "dw", &[pads, ("group", vec![8])]),
        node("Conv", &["dw", "b.w", "b.b"], "y", &[]),
        node("Add", &["x", "y"], "z", &[]),
        node("ConstantOfShape", &["zshape"], "zeros", &[]),
        pb::NodeProto {
            attribute: vec![pb::AttributeProto {
                name: "axis".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            }],
            ..node("Concat", &["z", "zeros"], "z2", &[])
        },
        node("Conv", &["z2", "c.w"], "output", &[]),
    ];
    let mut zero_value = node("ConstantOfShape", &[], "", &[]).attribute;
    zero_value.push(pb::AttributeProto {
        name: "value".into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(init("", &[1], &[0.0])),
        ..Default::default()
    });
    let mut nodes = nodes;
    nodes[5].attribute = zero_value;
    let inits = vec![
        init("a.w", &[8, 3, 3, 3], &filters(&a_norms, 27, 0)),
        init("a.b", &[8], &bias),
        init("dw.w", &[8, 1, 3, 3], &dw),
        init("b.w", &[8, 8, 1, 1], &filters(&b_norms, 8, 1)),
        init("b.b", &[8], &bias),
        init("c.w", &[4, 10, 1, 1], &c),
        hearth_model::onnx::raw_initializer(
            "zshape",
            &[4],
            DataType::Int64,
            [1i64, 2, 8, 8]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "tied".into(),
            node: nodes,
            initializer: inits,
            input: vec![value_info("input", &[1, 3, 8, 8])],
            output: vec![value_info("output", &[1, 4, 8, 8])],
            ..Default::default()
        }),
        ..Default::default()
    };
    OnnxModel::from_bytes(&proto.encode_to_vec()).unwrap()
}

/// `m` with output channels `chans` of the convs `convs` (weights and biases) set to zero.
fn masked(m: &OnnxModel, convs: &[(&str, Option<&str>)], chans: &[usize]) -> OnnxModel {
    let mut w = m.weights();
    for (wn, bn) in convs {
        for name in std::iter::once(*wn).chain(*bn) {
            let t = w.get_mut(name).unwrap();
            let per = t.data.len() / t.shape[0];
            for &c in chans {
                t.data[c * per..(c + 1) * per].fill(0.0);
            }
        }
    }
    let mut out = m.clone();
    out.set_weights(&w).unwrap();
    out
}

#[test]
fn channels_tied_by_a_residual_add_are_removed_together() {
    let m = tied_graph();
    let (p, report) = prune_channels(&m, 0.5, ChannelCriterion::L1, &[], &no_progress).unwrap();
    eprintln!("{report}");
    assert_eq!(report.removable, 8, "{report}");
    assert_eq!(report.removed, 4, "{report}");
    let w = p.weights();
    let shape = |prefix: &str| -> Vec<usize> {
        let g = p.proto().graph.as_ref().unwrap();
        let n = g.node.iter().find(|n| n.output[0] == prefix).unwrap();
        w[&n.input[1]].shape.clone()
    };
    assert_eq!(shape("a"), vec![4, 3, 3, 3]);
    assert_eq!(shape("dw"), vec![4, 1, 3, 3]);
    assert_eq!(shape("y"), vec![4, 4, 1, 1]);
    // C reads the 4 kept channels and the 2 zero channels (not removable: no conv makes them).
    assert_eq!(shape("output"), vec![4, 6, 1, 1]);
    // The pruned model computes exactly what the original does with channels 0-3 of A and
    // B masked (both sides of the Add).
    let reference = masked(
        &m,
        &[("a.w", Some("a.b")), ("b.w", Some("b.b"))],
        &[0, 1, 2, 3],
    );
    let (rp, rr) = (
        GenericRunner::new(&p).unwrap(),
        GenericRunner::new(&reference).unwrap(),
    );
    for x in probe_inputs(&[1, 3, 8, 8], 4, 3) {
        let d = max_diff(&outputs(&rp, &x), &outputs(&rr, &x));
        assert!(d < 1e-4, "pruned vs masked: {d}");
    }
}

#[test]
fn least_squares_recovery_brings_outputs_closer_to_the_original() {
    let m = tied_graph();
    let (p, report) = prune_channels(&m, 0.5, ChannelCriterion::L1, &[], &no_progress).unwrap();
    let calib = probe_inputs(&[1, 3, 8, 8], 12, 5);
    let (r, rep) = reconstruct(&m, &p, &report.kept, &calib).unwrap();
    eprintln!("{rep}");
    assert!(rep.refitted >= 1, "{rep}");
    let held_out = probe_inputs(&[1, 3, 8, 8], 6, 99);
    let ro = GenericRunner::new(&m).unwrap();
    let (rp, rr) = (
        GenericRunner::new(&p).unwrap(),
        GenericRunner::new(&r).unwrap(),
    );
    let (mut ep, mut er) = (0.0f32, 0.0f32);
    for x in &held_out[1..] {
        let y = outputs(&ro, x);
        ep += outputs(&rp, x)
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>();
        er += outputs(&rr, x)
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>();
    }
    eprintln!("held-out squared error: pruned {ep:.4}, refitted {er:.4}");
    assert!(er < ep * 0.8, "refit {er} vs pruned {ep}");
    assert!(r.to_bytes().len().abs_diff(p.to_bytes().len()) < 200);
}

#[test]
fn sensitivity_ranks_by_output_change() {
    let m = tied_graph();
    let calib = probe_inputs(&[1, 3, 8, 8], 4, 7);
    let (p, report) =
        prune_channels(&m, 0.5, ChannelCriterion::Sensitivity, &calib, &no_progress).unwrap();
    assert_eq!(report.removed, 4, "{report}");
    assert!(GenericRunner::new(&p).is_ok());
    assert!(prune_channels(&m, 0.5, ChannelCriterion::Sensitivity, &[], &no_progress).is_err());
}
