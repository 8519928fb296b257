//! int8 QOperator export of BlazeFace (imported conv graph) against the float model.

use hearth_compress::measure::{
    adapt_inputs, agreement, latency_us, load_for_tract, GenericRunner,
};
use hearth_compress::qconv::{export_int8_conv, plan_matmul_kernels, qlinear_conv_count};
use hearth_compress::OutputTransform;
use hearth_model::{OnnxModel, Split, Task};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn conv_count(m: &OnnxModel) -> usize {
    m.proto()
        .graph
        .as_ref()
        .map_or(0, |g| g.node.iter().filter(|n| n.op_type == "Conv").count())
}

#[test]
fn blazeface_int8_conv_export_runs_integer_kernels_and_agrees() {
    let float =
        load_for_tract(&root().join("data/models/face_detection_front_128x128_barracuda.onnx"))
            .unwrap();
    let float_runner = GenericRunner::new(&float).unwrap();
    let shape = float_runner.input_shape().to_vec();
    let train = Task::Faces
        .load(&root().join("data"), Split::Train)
        .unwrap();
    let test = Task::Faces.load(&root().join("data"), Split::Test).unwrap();
    let calib: Vec<Vec<f32>> = adapt_inputs(&train, &shape)
        .unwrap()
        .into_iter()
        .take(20)
        .collect();
    let eval = adapt_inputs(&test, &shape).unwrap();
    assert_eq!(eval.len(), 50);

    let int8 = export_int8_conv(&float, &calib).unwrap();
    let convs = conv_count(&float);
    assert!(convs > 30, "{convs} convs");
    assert_eq!(conv_count(&int8), 0);
    assert_eq!(qlinear_conv_count(&int8), convs);

    // Every matrix product of tract's optimised int8 plan is an integer kernel, and there
    // is one per conv at least; the float plan has none.
    let kernels = plan_matmul_kernels(&int8).unwrap();
    let integer = kernels.iter().filter(|k| k.is_integer()).count();
    eprintln!(
        "int8 plan: {} matmuls, {integer} integer, e.g. {:?}",
        kernels.len(),
        kernels.first()
    );
    assert!(kernels.len() >= convs, "{} matmuls", kernels.len());
    assert_eq!(integer, kernels.len());
    assert!(plan_matmul_kernels(&float)
        .unwrap()
        .iter()
        .all(|k| !k.is_integer()));

    let (fb, ib) = (float.to_bytes().len(), int8.to_bytes().len());
    eprintln!(
        "size: float {fb} B, int8 {ib} B ({:.2}x)",
        fb as f64 / ib as f64
    );
    assert!(fb >= 3 * ib, "float {fb} B vs int8 {ib} B");

    let int8_runner = GenericRunner::new(&int8).unwrap();
    let scores: Vec<String> = float_runner
        .run(&eval[0])
        .unwrap()
        .into_iter()
        .filter(|o| o.shape.last() == Some(&1))
        .map(|o| o.name)
        .collect();
    assert_eq!(scores.len(), 2, "{scores:?}");
    let ag = agreement(
        &int8_runner,
        &float_runner,
        &eval,
        Some(&scores),
        OutputTransform::Sigmoid,
    )
    .unwrap();
    eprintln!(
        "face scores int8 vs float on {} images: decision agreement {:.3}, mean |d| {:.4}, max |d| {:.4}",
        ag.samples, ag.decision_agreement, ag.mean_abs_diff, ag.max_abs_diff
    );
    assert_eq!(ag.samples, 50);
    assert!(ag.decision_agreement >= 0.9, "{ag:?}");
    assert!(ag.mean_abs_diff < 0.05, "{ag:?}");

    let lf = latency_us(&float_runner, &eval[0], 10).unwrap();
    let li = latency_us(&int8_runner, &eval[0], 10).unwrap();
    eprintln!("tract latency batch 1: float {lf:.0} us, int8 {li:.0} us");
}
