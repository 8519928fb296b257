//! Which compute kernels run on this machine: tract's instruction-set probe and the matrix
//! kernels it may choose from, and the dense engine's float and int8 kernels. Printed for the
//! aarch64 suite's report (`scripts/test-aarch64.sh` runs it under qemu as a Pi 4 and a Pi 5);
//! fails when either engine would fall back to portable code on aarch64 or on an AVX2 x86-64.
use hearth_dense::{DenseNet, FloatLayer, Int8Chain, QLinearLayer};
use tract_onnx::tract_core::tract_linalg::{isa, mmm_routines};

#[test]
fn tract_and_the_dense_engine_use_this_cpus_vector_kernels() {
    let native = isa::native();
    let kernels: Vec<String> = mmm_routines::runnable_for(&native)
        .iter()
        .map(|k| k.name().to_string())
        .collect();
    let (outputs, inputs) = (64, 387);
    let float = DenseNet::float(
        &[FloatLayer {
            inputs,
            outputs,
            weight: vec![0.5; outputs * inputs],
            bias: vec![0.0; outputs],
            relu: true,
        }],
        true,
    )
    .unwrap();
    let int8 = DenseNet::int8(
        &Int8Chain {
            in_scale: 0.05,
            in_zero: 0,
            layers: vec![QLinearLayer {
                inputs,
                outputs,
                weight: vec![3; outputs * inputs],
                weight_scale: vec![0.01; outputs],
                bias: vec![0; outputs],
                out_scale: 0.5,
                out_zero: -2,
            }],
        },
        true,
    )
    .unwrap();
    println!(
        "tract: ISA {} ({native:?}); {} runnable matrix kernels: {}",
        native.nickname(),
        kernels.len(),
        kernels.join(", ")
    );
    println!(
        "dense engine: float {}, int8 {} ({} weight bytes for {} int8 parameters)",
        float.kernel(),
        int8.kernel(),
        int8.weight_bytes(),
        outputs * inputs
    );
    if cfg!(target_arch = "aarch64") {
        assert!(
            kernels.iter().any(|k| k.starts_with("arm64")),
            "tract has no arm64 kernel here"
        );
        assert_eq!(float.kernel(), "f32-neon");
        assert!(int8.kernel().starts_with("neon-"), "{}", int8.kernel());
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(kernels
            .iter()
            .any(|k| k.contains("fma") || k.contains("avx")));
        assert!(int8.kernel().ends_with("vpmaddwd"), "{}", int8.kernel());
    }
}
