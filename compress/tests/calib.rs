//! Calibration data for any input: image folders (PNG, JPEG; class sub-folders label them)
//! and `.npy` files, prepared as the model expects (resize, mean/std, NCHW/NHWC), through
//! the library and the CLI (`--calib*` options and the recipe's `[calibration]` table).

mod common;
use common::{init, value_info};
use hearth_compress::calib::{self, CalibSpec, Layout};
use hearth_model::OnnxModel;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;
use tract_onnx::pb;

/// A `w × h` PNG of one colour.
fn solid(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(f, w, h);
    e.set_color(png::ColorType::Rgb);
    e.set_depth(png::BitDepth::Eight);
    let mut wr = e.write_header().unwrap();
    let data: Vec<u8> = (0..w * h).flat_map(|_| rgb).collect();
    wr.write_image_data(&data).unwrap();
}

fn class_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    solid(&dir.join("a/1.png"), 10, 6, [255, 0, 128]);
    // An 8×8 pure green JPEG (made by ffmpeg; JPEG is lossy).
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/green.jpg"),
        dir.join("a/2.jpg"),
    )
    .unwrap();
    solid(&dir.join("b/3.png"), 5, 5, [51, 102, 204]);
    std::fs::write(dir.join("b/notes.txt"), "not an image").unwrap();
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn an_image_folder_is_resized_normalised_and_laid_out_for_the_input() {
    let dir = tempfile::tempdir().unwrap();
    class_folder(dir.path());
    let mut spec = CalibSpec::new(dir.path());
    spec.mean = vec![0.5, 0.25, 0.0];
    spec.std = vec![0.5, 0.25, 2.0];
    // NCHW [1, 3, 4, 8].
    let ds = calib::load(&spec, &[1, 3, 4, 8]).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.classes, vec!["a", "b"]);
    assert_eq!(ds.y, vec![0, 0, 1]);
    assert_eq!(ds.input_len, 96);
    let s = ds.sample(0);
    // r = 1.0 → (1 − 0.5)/0.5 = 1; g = 0 → (0 − 0.25)/0.25 = −1; b = 128/255 → /2.
    assert!(
        s[..32].iter().all(|&v| close(v, 1.0, 1e-5)),
        "{:?}",
        &s[..4]
    );
    assert!(s[32..64].iter().all(|&v| close(v, -1.0, 1e-5)));
    assert!(s[64..].iter().all(|&v| close(v, 128.0 / 255.0 / 2.0, 1e-5)));
    // The JPEG decodes (lossy: close to pure green).
    let j = ds.sample(1);
    assert!(
        j[..32].iter().all(|&v| close(v, -1.0, 0.05)),
        "{:?}",
        &j[..4]
    );
    assert!(
        j[32..64].iter().all(|&v| close(v, 3.0, 0.2)),
        "{:?}",
        &j[32..36]
    );
    // NHWC [1, 4, 8, 3]: the same values, channel last.
    let nhwc = calib::load(&spec, &[1, 4, 8, 3]).unwrap();
    let t = nhwc.sample(0);
    assert!(close(t[0], 1.0, 1e-5) && close(t[1], -1.0, 1e-5) && close(t[3], 1.0, 1e-5));
    // Given explicitly, the layout wins over the guess.
    spec.layout = Some(Layout::Nhwc);
    assert!(
        calib::load(&spec, &[1, 3, 4, 8]).is_err(),
        "8 channels, 3 means"
    );
    // One grey channel: luma, one mean.
    let grey = calib::load(
        &CalibSpec {
            mean: vec![0.5],
            std: vec![0.5],
            ..CalibSpec::new(dir.path())
        },
        &[1, 1, 5, 5],
    )
    .unwrap();
    assert_eq!(grey.input_len, 25);
    let luma = grey.sample(2)[0];
    assert!(luma > -0.5 && luma < 0.0, "{luma}");
    // Limits and errors.
    let mut few = CalibSpec::new(dir.path());
    few.limit = 2;
    assert_eq!(calib::load(&few, &[1, 3, 4, 8]).unwrap().len(), 2);
    let empty = tempfile::tempdir().unwrap();
    assert!(calib::load(&CalibSpec::new(empty.path()), &[1, 3, 4, 8]).is_err());
}

/// Little-endian f4 `.npy` bytes of `shape`.
fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    for v in data {
        b.extend(v.to_le_bytes());
    }
    b
}

#[test]
fn npy_inputs_are_used_as_stored_or_normalised_per_channel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    let data: Vec<f32> = (0..5 * 24).map(|i| i as f32).collect();
    std::fs::write(&path, npy(&[5, 2, 3, 4], &data)).unwrap();
    let ds = calib::load(&CalibSpec::new(&path), &[1, 2, 3, 4]).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.x, data);
    assert!(ds.classes.is_empty());
    let norm = calib::load(
        &CalibSpec {
            mean: vec![1.0, 2.0],
            std: vec![2.0, 4.0],
            layout: Some(Layout::Nchw),
            ..CalibSpec::new(&path)
        },
        &[1, 2, 3, 4],
    )
    .unwrap();
    // Sample 0, channel 0 (NCHW: first 12 values), channel 1 (next 12).
    assert_eq!(norm.sample(0)[0], (0.0 - 1.0) / 2.0);
    assert_eq!(norm.sample(0)[12], (12.0 - 2.0) / 4.0);
    // A single input of the model's shape is one sample; other shapes are refused.
    std::fs::write(&path, npy(&[1, 2, 3, 4], &data[..24])).unwrap();
    assert_eq!(
        calib::load(&CalibSpec::new(&path), &[1, 2, 3, 4])
            .unwrap()
            .len(),
        1
    );
    std::fs::write(&path, npy(&[7], &data[..7])).unwrap();
    assert!(calib::load(&CalibSpec::new(&path), &[1, 2, 3, 4]).is_err());
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// A small image classifier: [1,3,4,8] → Conv 3→8 (1×1) → Relu → Conv 8→8 (1×1) → Relu →
/// GlobalAveragePool → Flatten → Gemm 8→2 → Softmax.
fn tiny_cnn(dir: &Path) -> PathBuf {
    let w1: Vec<f32> = (0..24).map(|i| ((i * 7 % 5) as f32 - 2.0) / 3.0).collect();
    let w2: Vec<f32> = (0..64).map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0).collect();
    let w3: Vec<f32> = (0..16).map(|i| ((i * 5 % 3) as f32 - 1.0) / 2.0).collect();
    let mut gemm = node("Gemm", &["f", "w3", "b3"], "logits");
    gemm.attribute.push(pb::AttributeProto {
        name: "transB".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    });
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "tiny".into(),
            node: vec![
                node("Conv", &["input", "w1", "b1"], "c1"),
                node("Relu", &["c1"], "r1"),
                node("Conv", &["r1", "w2", "b2"], "c2"),
                node("Relu", &["c2"], "r2"),
                node("GlobalAveragePool", &["r2"], "p"),
                node("Flatten", &["p"], "f"),
                gemm,
                node("Softmax", &["logits"], "probs"),
            ],
            initializer: vec![
                init("w1", &[8, 3, 1, 1], &w1),
                init("b1", &[8], &[0.1; 8]),
                init("w2", &[8, 8, 1, 1], &w2),
                init("b2", &[8], &[0.05; 8]),
                init("w3", &[2, 8], &w3),
                init("b3", &[2], &[0.0, 0.1]),
            ],
            input: vec![value_info("input", &[1, 3, 4, 8])],
            output: vec![value_info("probs", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = dir.join("tiny.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    assert!(OnnxModel::load(&path).is_ok());
    path
}

fn run(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-compress"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run hearth-compress");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_takes_calibration_images_from_flags_or_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_cnn(dir.path());
    let images = dir.path().join("images");
    class_folder(&images);
    let out = dir.path().join("out.onnx");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let recipe = "prune-channels:0.5,recover=ls;export:int8-qoperator";
    // Recovery and int8 calibration need data: without it, exit 64 before any work.
    let (code, _, err) = run(
        &[m, "--recipe", recipe, "-o", o, "--latency-runs", "1"],
        dir.path(),
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("calibration"), "{err}");
    let (code, stdout, err) = run(
        &[
            m,
            "--recipe",
            recipe,
            "-o",
            o,
            "--latency-runs",
            "1",
            "--calib",
            images.to_str().unwrap(),
            "--calib-mean",
            "0.5",
            "--calib-std",
            "0.25",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}\n{stdout}");
    assert!(err.contains("calibration: 3 samples"), "{err}");
    assert!(err.contains("2 classes: a, b"), "{err}");
    assert!(stdout.contains("prune-channels 50% l1 +ls"), "{stdout}");
    assert!(stdout.contains("least squares refitted"), "{stdout}");
    // Labels from the class folders give an accuracy column.
    let original = stdout
        .lines()
        .find(|l| l.starts_with("| original"))
        .unwrap();
    let acc = original.split('|').nth(6).unwrap().trim();
    assert!(
        acc.parse::<f32>().is_ok(),
        "accuracy cell {acc:?} in {original}"
    );
    // The same from the recipe's [calibration] table (relative to the working directory).
    let toml = dir.path().join("recipe.toml");
    std::fs::write(
        &toml,
        "[calibration]\nsource = \"images\"\nmean = [0.5, 0.5, 0.5]\nstd = 0.25\nlayout = \"nchw\"\n\n\
         [[step]]\nkind = \"prune-channels\"\nfraction = 0.5\nrecover = \"ls\"\n",
    )
    .unwrap();
    let (code, stdout, err) = run(
        &[
            m,
            "--recipe",
            toml.to_str().unwrap(),
            "-o",
            o,
            "--latency-runs",
            "1",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}\n{stdout}");
    assert!(err.contains("calibration: 3 samples"), "{err}");
    // Calibration options without a source are a usage error.
    let (code, _, err) = run(
        &[
            m,
            "--recipe",
            "prune-channels:0.5",
            "-o",
            o,
            "--calib-mean",
            "0.5",
        ],
        dir.path(),
    );
    assert_eq!(code, 64, "{err}");
}
