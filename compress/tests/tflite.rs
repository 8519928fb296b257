//! `hearth-compress` on real TensorFlow Lite models (the `mediapipe` 0.10.14 wheel's, vendored
//! with provenance in data/models/): each is translated to ONNX, normalised and compressed
//! with int8 per-channel into a package; a real model with an operator Hearth does not
//! translate exits 64 naming it, before any step and without writing anything.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-compress"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("run hearth-compress");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (step, bytes, max_diff, decision_agree) of each table row.
fn rows(stdout: &str) -> Vec<(String, usize, f32, f32)> {
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    assert!(lines.len() >= 3, "no table in:\n{stdout}");
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let head = cells(lines[0]);
    let col = |name: &str| head.iter().position(|h| h == name).expect(name);
    lines[2..]
        .iter()
        .map(|l| {
            let c = cells(l);
            (
                c[col("step")].clone(),
                c[col("bytes")].parse().unwrap(),
                c[col("max_diff")].parse().unwrap(),
                c[col("decision_agree")].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn vendored_tflite_models_translate_and_compress() {
    let dir = tempfile::tempdir().unwrap();
    // (model, smallest package ratio, largest max_diff after int8 relative to the output scale)
    for (stem, min_ratio) in [("face_detection_short_range", 2.8), ("hand_recrop", 2.0)] {
        let out = dir.path().join(format!("{stem}.hpkg"));
        let model = format!("data/models/{stem}.tflite");
        let (code, stdout, stderr) = run(&[
            &model,
            "--data",
            "data/faces",
            "--recipe",
            "quant:int8-per-channel;export:package",
            "-o",
            out.to_str().unwrap(),
            "--latency-runs",
            "1",
            "--agreement-samples",
            "20",
        ]);
        assert_eq!(code, 0, "{stem}: {stdout}{stderr}");
        assert!(stderr.contains("translated TFLite"), "{stderr}");
        println!("{stem}\n{stdout}");
        let r = rows(&stdout);
        assert_eq!(r.len(), 4, "{stdout}");
        assert_eq!(r[1].0, "normalise");
        assert!(
            r[1].2 < 1e-4,
            "{stem}: normalise changed the outputs: {:?}",
            r[1]
        );
        let ratio = r[0].1 as f32 / r[3].1 as f32;
        assert!(ratio >= min_ratio, "{stem}: {ratio:.2}x");
        assert!(r[3].3 >= 0.9, "{stem}: decision agreement {:?}", r[3]);
        assert!(out.exists());
    }
}

#[test]
fn unsupported_tflite_operator_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("selfie.hpkg");
    let (code, stdout, stderr) = run(&[
        "data/models/selfie_segmentation.tflite",
        "--recipe",
        "quant:int8-per-channel;export:package",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.contains("Convolution2DTransposeBias (custom)"),
        "{stderr}"
    );
    assert!(stderr.contains("RESIZE_BILINEAR"), "{stderr}");
    assert!(!stdout.contains('|'), "a step ran: {stdout}");
    assert!(!out.exists());
}

#[test]
fn a_truncated_tflite_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(workspace().join("data/models/hand_recrop.tflite")).unwrap();
    let cut = dir.path().join("cut.tflite");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = dir.path().join("o.onnx");
    let (code, stdout, stderr) = run(&[
        cut.to_str().unwrap(),
        "--recipe",
        "quant:int8",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("not a valid TFLite model"), "{stderr}");
}
