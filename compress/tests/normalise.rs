//! Graph normalisation and the models people bring: real ONNX models shipped inside registry
//! packages (vendored under `data/models/` with provenance), exporters' habits (weights in
//! `Constant` nodes, unfused BatchNormalization), steps that would change nothing (exit 64)
//! and ops tract cannot run (exit 64, named before any step).

mod common;
use common::{init, value_info};
use hearth_compress::measure::GenericRunner;
use hearth_compress::normalise::{self, check_equivalence, normalise, probe_inputs};
use hearth_model::OnnxModel;
use prost::Message;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models() -> PathBuf {
    workspace().join("data/models")
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

/// A table row: step label and the numeric cells used here.
#[derive(Debug)]
struct Row {
    step: String,
    bytes: usize,
    params: usize,
    max_diff: Option<f32>,
    decision: Option<f32>,
    note: String,
}

fn parse_table(stdout: &str) -> Vec<Row> {
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
    let opt = |s: &str| (s != "-").then(|| s.parse::<f32>().unwrap());
    lines[2..]
        .iter()
        .map(|l| {
            let c = cells(l);
            Row {
                step: c[col("step")].clone(),
                bytes: c[col("bytes")].parse().unwrap(),
                params: c[col("params")].parse().unwrap(),
                max_diff: opt(&c[col("max_diff")]),
                decision: opt(&c[col("decision_agree")]),
                note: c[col("note")].clone(),
            }
        })
        .collect()
}

/// PaddleOCR's text-direction classifier as the rapidocr-onnxruntime wheel ships it:
/// paddle2onnx, opset 11, every weight a `Constant` node, 35 unfused BatchNormalization.
const PADDLE_CLS: &str = "ch_ppocr_mobile_v2.0_cls_infer.onnx";
/// The input shape PaddleOCR feeds it (the graph leaves height and width symbolic).
const PADDLE_CLS_SHAPE: [usize; 4] = [1, 3, 48, 192];

fn op_count(m: &OnnxModel, op: &str) -> usize {
    m.proto()
        .graph
        .as_ref()
        .map_or(0, |g| g.node.iter().filter(|n| n.op_type == op).count())
}

#[test]
fn constant_weights_and_unfused_batchnorms_normalise_to_the_same_outputs() {
    let raw = OnnxModel::load(&models().join(PADDLE_CLS)).unwrap();
    assert!(raw.weights().is_empty(), "weights are Constant nodes");
    assert_eq!(op_count(&raw, "BatchNormalization"), 35);
    let model = normalise::pin_input_shape(&raw, &PADDLE_CLS_SHAPE).unwrap();
    let (norm, report) = normalise(&model).unwrap();
    eprintln!("{report}");
    assert_eq!(report.constants, 308, "{report}");
    assert_eq!(report.batchnorms, 35, "{report}");
    assert_eq!(report.batchnorms_left, 0, "{report}");
    assert!(report.identities >= 1, "{report}");
    assert_eq!(op_count(&norm, "Constant"), 0);
    assert_eq!(op_count(&norm, "BatchNormalization"), 0);
    assert_eq!(op_count(&norm, "Identity"), 0);
    assert_eq!(op_count(&norm, "Conv"), 53);
    // Every conv weight is an initializer now: 127 220 f32 parameters.
    let params: usize = norm.weights().values().map(|t| t.len()).sum();
    assert!(params > 120_000, "{params}");
    let inputs = probe_inputs(&PADDLE_CLS_SHAPE, 6, 7);
    let eq = check_equivalence(&model, &norm, &inputs).unwrap();
    eprintln!("{eq:?}");
    assert!(eq.ok(), "{eq:?}");
    assert!(eq.max_abs_diff < 1e-4, "{eq:?}");
    // Normalising again changes nothing.
    let (again, r2) = normalise(&norm).unwrap();
    assert!(!r2.changed(), "{r2}");
    assert_eq!(again, norm);
}

/// The report: `quant:int8-per-channel` on this model saw 0 parameters and wrote an
/// unchanged file. After normalisation it quantizes the 54 weight tensors (53 convs and the
/// classifier's MatMul) and the package is > 3x smaller with the decisions kept.
#[test]
fn constant_weight_model_compresses_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cls.hpkg");
    let model = models().join(PADDLE_CLS);
    let (code, stdout, stderr) = run(&[
        model.to_str().unwrap(),
        "--input-shape",
        "1,3,48,192",
        "--data",
        "data/faces",
        "--recipe",
        "quant:int8-per-channel;export:package",
        "-o",
        out.to_str().unwrap(),
        "--latency-runs",
        "2",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    println!("{stdout}");
    let rows = parse_table(&stdout);
    let labels: Vec<&str> = rows.iter().map(|r| r.step.as_str()).collect();
    assert_eq!(
        labels,
        [
            "original",
            "normalise",
            "quant sym8/channel",
            "export package"
        ]
    );
    let (orig, norm, quant, pkg) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    assert_eq!(orig.params, 0, "Constant-node weights are not initializers");
    assert!(norm.params > 120_000, "{norm:?}");
    assert!(
        norm.note.contains("308 Constant→initializer") && norm.note.contains("35 BatchNorm"),
        "{norm:?}"
    );
    assert!(norm.max_diff.unwrap() < 1e-4, "{norm:?}");
    assert!(quant.note.starts_with("54 tensors"), "{quant:?}");
    let written = std::fs::metadata(&out).unwrap().len() as usize;
    assert_eq!(written, pkg.bytes);
    let ratio = orig.bytes as f32 / written as f32;
    assert!(ratio >= 3.0, "{ratio:.2}x: {pkg:?}");
    // Measured 47/50 (0.94) on the faces test images (out of domain for a text-direction
    // classifier: its probabilities sit within 0.02 of 0.5 on several of them); ONNX Runtime's
    // pre-processing + quantize_dynamic keeps 40/50 on the same inputs (bench/ort_imported.py).
    assert!(pkg.decision.unwrap() >= 0.9, "{pkg:?}");
    // The package decodes to a model tract runs with the original's input and outputs.
    let decoded = hearth_compress::package::decode_package(&std::fs::read(&out).unwrap()).unwrap();
    let r = GenericRunner::new(&decoded).unwrap();
    assert_eq!(r.input_shape(), &PADDLE_CLS_SHAPE);
    assert_eq!(
        r.run(&vec![0.1; r.input_len()]).unwrap()[0].shape,
        vec![1, 2]
    );
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

/// A one-input graph written to `dir/name.onnx`.
fn write_model(
    dir: &Path,
    name: &str,
    input: pb::ValueInfoProto,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    output: pb::ValueInfoProto,
) -> PathBuf {
    let proto = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: name.into(),
            node: nodes,
            initializer: inits,
            input: vec![input],
            output: vec![output],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = dir.join(format!("{name}.onnx"));
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

/// A recipe that finds nothing to do exits 64 with the reason, before writing anything;
/// marked `?` it runs and says it skipped.
#[test]
fn steps_that_change_nothing_exit_64_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = out.to_str().unwrap();
    // No weights at all: input → Relu → output.
    let relu = write_model(
        dir.path(),
        "relu",
        value_info("x", &[1, 8]),
        vec![node("Relu", &["x"], "y")],
        vec![],
        value_info("y", &[1, 8]),
    );
    // A MatMul weight but no Conv (and not a Gemm/Relu classifier).
    let w: Vec<f32> = (0..64 * 10)
        .map(|i| ((i % 7) as f32 - 3.0) / 10.0)
        .collect();
    let matmul = write_model(
        dir.path(),
        "matmul",
        value_info("x", &[1, 64]),
        vec![node("MatMul", &["x", "w"], "y")],
        vec![init("w", &[64, 10], &w)],
        value_info("y", &[1, 10]),
    );
    let relu = relu.to_str().unwrap();
    let matmul = matmul.to_str().unwrap();
    let blaze = "data/models/face_detection_front_128x128_barracuda.onnx";
    for (args, needle) in [
        (
            vec![relu, "--recipe", "quant:int8-per-channel", "-o", o],
            "no weight tensors found",
        ),
        (
            vec![relu, "--recipe", "prune:0.5", "-o", o],
            "no weight tensors found",
        ),
        (
            vec![
                matmul,
                "--data",
                "data/digits",
                "--recipe",
                "export:int8-qoperator",
                "-o",
                o,
            ],
            "no Conv to quantize",
        ),
        // Pruning 0% leaves every byte as it was.
        (
            vec![blaze, "--recipe", "prune:0.0", "-o", o],
            "byte-identical",
        ),
    ] {
        let (code, stdout, stderr) = run(&[&args[..], &["--latency-runs", "1"]].concat());
        assert_eq!(code, 64, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(stderr.contains("changes nothing"), "{stderr}");
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
    // Marked as allowed to change nothing: runs, says so, writes the (unchanged) model.
    for recipe in ["quant?:int8-per-channel", "quant:int8,allow_noop=true"] {
        let (code, stdout, stderr) = run(&[relu, "--recipe", recipe, "-o", o]);
        assert_eq!(code, 0, "{recipe}: {stdout}{stderr}");
        let rows = parse_table(&stdout);
        assert_eq!(rows.len(), 3, "{stdout}");
        assert!(
            rows[2].note.contains("skipped: no weight tensors found"),
            "{stdout}"
        );
        assert!(out.exists());
        std::fs::remove_file(&out).unwrap();
    }
}

/// An op tract has no translation for is named before any step runs, exit 64.
#[test]
fn an_op_tract_cannot_run_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let w: Vec<f32> = (0..9).map(|i| i as f32).collect();
    let det = write_model(
        dir.path(),
        "det",
        value_info("x", &[3, 3]),
        vec![node("Add", &["x", "w"], "s"), node("Det", &["s"], "d")],
        vec![init("w", &[3, 3], &w)],
        value_info("d", &[]),
    );
    let (code, stdout, stderr) = run(&[
        det.to_str().unwrap(),
        "--recipe",
        "quant:int8-per-channel",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("tract cannot run op Det"), "{stderr}");
    assert!(stderr.contains("node \"d\""), "{stderr}");
    assert!(stdout.is_empty(), "no step ran: {stdout}");
    assert!(!out.exists());
}

/// Reads `"key": "value"` from a flat JSON object.
fn json_str(text: &str, key: &str) -> String {
    let at = text.find(&format!("\"{key}\"")).expect(key);
    let rest = &text[at + key.len() + 2..];
    let start = rest.find('"').unwrap() + 1;
    let end = start + rest[start..].find('"').unwrap();
    rest[start..end].to_string()
}

/// Every vendored real model: its bytes match its provenance, it loads, normalises to the
/// same outputs, and int8 per-channel quantization packs it > 2.5x smaller with its decisions
/// kept.
#[test]
fn each_vendored_real_model_normalises_and_compresses_with_int8() {
    let dir = tempfile::tempdir().unwrap();
    // (file, provenance stem, extra args, smallest size ratio)
    let cases: [(&str, &str, &[&str], f32); 4] = [
        (
            "face_detection_front_128x128_barracuda.onnx",
            "blazeface",
            &["--data", "data/faces"],
            2.6,
        ),
        (
            PADDLE_CLS,
            "ch_ppocr_mobile_v2.0_cls_infer",
            &["--data", "data/faces", "--input-shape", "1,3,48,192"],
            3.0,
        ),
        ("embedding_model.onnx", "embedding_model", &[], 3.5),
        (
            "silero_vad_16k_sequence.onnx",
            "silero_vad_16k_sequence",
            &[],
            3.5,
        ),
    ];
    for (file, stem, extra, min_ratio) in cases {
        let path = models().join(file);
        let bytes = std::fs::read(&path).unwrap();
        let prov = std::fs::read_to_string(models().join(format!("{stem}.provenance.json")))
            .unwrap_or_else(|e| panic!("{stem}.provenance.json: {e}"));
        assert_eq!(
            hex(&sha2::Sha256::digest(&bytes)),
            json_str(&prov, "file_sha256"),
            "{file}"
        );
        assert_eq!(json_str(&prov, "file"), file);
        let out = dir.path().join(format!("{stem}.hpkg"));
        let args = [
            &[path.to_str().unwrap()][..],
            extra,
            &[
                "--recipe",
                "quant:int8-per-channel;export:package",
                "-o",
                out.to_str().unwrap(),
                "--latency-runs",
                "1",
            ],
        ]
        .concat();
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 0, "{file}: {stdout}{stderr}");
        println!("{file}\n{stdout}");
        let rows = parse_table(&stdout);
        assert_eq!(rows.len(), 4, "{file}: {stdout}");
        let (orig, norm, pkg) = (&rows[0], &rows[1], &rows[3]);
        assert_eq!(norm.step, "normalise");
        assert!(norm.note.contains("max abs diff"), "{norm:?}");
        assert!(norm.max_diff.unwrap() < 1e-3, "{file}: {norm:?}");
        assert!(norm.params > 0, "{file}: {norm:?}");
        let ratio = orig.bytes as f32 / pkg.bytes as f32;
        assert!(ratio >= min_ratio, "{file}: {ratio:.2}x {pkg:?}");
        assert!(pkg.decision.unwrap() >= 0.9, "{file}: {pkg:?}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// BatchNormalization after a Gemm (transB = 1, with bias and beta ≠ 1) and after a
/// bias-less Conv fold away with the same outputs.
#[test]
fn batchnorm_folds_into_gemm_and_conv() {
    let ch = 4usize;
    let bn = |p: &str| {
        vec![
            init(&format!("{p}.s"), &[ch], &[1.5, 0.5, -1.0, 2.0]),
            init(&format!("{p}.b"), &[ch], &[0.1, -0.2, 0.3, 0.0]),
            init(&format!("{p}.m"), &[ch], &[0.5, 0.0, -0.5, 1.0]),
            init(&format!("{p}.v"), &[ch], &[1.0, 4.0, 0.25, 2.0]),
        ]
    };
    let w: Vec<f32> = (0..ch * 6).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut gemm = node("Gemm", &["x", "gw", "gb"], "g");
    gemm.attribute = vec![
        pb::AttributeProto {
            name: "transB".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        },
        pb::AttributeProto {
            name: "beta".into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f: 0.5,
            ..Default::default()
        },
    ];
    let mut inits = vec![
        init("gw", &[ch, 6], &w),
        init("gb", &[ch], &[1.0, -1.0, 0.5, 0.0]),
    ];
    inits.extend(bn("g"));
    let dir = tempfile::tempdir().unwrap();
    let p = write_model(
        dir.path(),
        "gemm_bn",
        value_info("x", &[1, 6]),
        vec![
            gemm,
            node(
                "BatchNormalization",
                &["g", "g.s", "g.b", "g.m", "g.v"],
                "y",
            ),
        ],
        inits,
        value_info("y", &[1, ch as i64]),
    );
    let cw: Vec<f32> = (0..ch * 2 * 9).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut inits = vec![init("cw", &[ch, 2, 3, 3], &cw)];
    inits.extend(bn("c"));
    let q = write_model(
        dir.path(),
        "conv_bn",
        value_info("x", &[1, 2, 5, 5]),
        vec![
            node("Conv", &["x", "cw"], "c"),
            node(
                "BatchNormalization",
                &["c", "c.s", "c.b", "c.m", "c.v"],
                "y",
            ),
        ],
        inits,
        value_info("y", &[1, ch as i64, 3, 3]),
    );
    for (path, shape) in [(p, vec![1, 6]), (q, vec![1, 2, 5, 5])] {
        let m = OnnxModel::load(&path).unwrap();
        let (n, r) = normalise(&m).unwrap();
        assert_eq!(r.batchnorms, 1, "{}: {r}", path.display());
        assert_eq!(op_count(&n, "BatchNormalization"), 0);
        let eq = check_equivalence(&m, &n, &probe_inputs(&shape, 5, 3)).unwrap();
        assert!(eq.max_abs_diff < 1e-5, "{}: {eq:?}", path.display());
    }
}

/// Identity, a Cast to the type the tensor has, a Reshape to the shape it has and a
/// Reshape → Reshape chain all go, with the same outputs.
#[test]
fn identity_noop_cast_and_reshape_chains_go() {
    let shape = |name: &str, v: &[i64]| {
        hearth_model::onnx::raw_initializer(
            name,
            &[v.len()],
            DataType::Int64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let mut cast = node("Cast", &["x"], "c");
    cast.attribute.push(pb::AttributeProto {
        name: "to".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: DataType::Float as i64,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        "chains",
        value_info("x", &[1, 4]),
        vec![
            node("Identity", &["x"], "i"),
            cast,
            node("Reshape", &["c", "s14"], "r0"),
            node("Reshape", &["r0", "s22"], "r1"),
            node("Reshape", &["r1", "s41"], "r2"),
            node("Relu", &["r2"], "y"),
        ],
        vec![
            shape("s14", &[1, 4]),
            shape("s22", &[2, 2]),
            shape("s41", &[4, 1]),
        ],
        value_info("y", &[4, 1]),
    );
    let m = OnnxModel::load(&path).unwrap();
    let (n, r) = normalise(&m).unwrap();
    eprintln!("{r}");
    assert_eq!(r.casts, 1, "{r}");
    assert!(r.reshapes >= 2, "{r}");
    assert_eq!(r.identities, 1, "{r}");
    assert_eq!(op_count(&n, "Cast"), 0);
    assert_eq!(op_count(&n, "Identity"), 0);
    assert_eq!(op_count(&n, "Reshape"), 1);
    let eq = check_equivalence(&m, &n, &probe_inputs(&[1, 4], 4, 1)).unwrap();
    assert_eq!(eq.max_abs_diff, 0.0);
}

/// The normalised graph is checked against the original before any step: a BatchNorm whose
/// folding changes the outputs beyond tolerance (here the original loses precision: it adds
/// a bias of 1e6 to inputs in [-1, 1] and subtracts it again in f32) stops the run, exit 1,
/// nothing written.
#[test]
fn outputs_changed_by_normalisation_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        "bn_far",
        value_info("x", &[1, 1, 2, 2]),
        vec![
            node("Conv", &["x", "w", "b"], "c"),
            node("BatchNormalization", &["c", "s", "bb", "m", "v"], "y"),
        ],
        vec![
            init("w", &[1, 1, 1, 1], &[1.0]),
            init("b", &[1], &[1e6]),
            init("s", &[1], &[1.0]),
            init("bb", &[1], &[0.0]),
            init("m", &[1], &[1e6]),
            init("v", &[1], &[1.0]),
        ],
        value_info("y", &[1, 1, 2, 2]),
    );
    let out = dir.path().join("out.onnx");
    let (code, stdout, stderr) = run(&[
        path.to_str().unwrap(),
        "--recipe",
        "quant:int8-per-channel",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("normalisation changed the outputs")
            && stderr.contains("1 BatchNorm folded"),
        "{stderr}"
    );
    assert!(!out.exists());
}
