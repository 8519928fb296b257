//! End-to-end tests of the `hearth-compress` binary: baselines trained in-test for every data
//! set in `data/`, chained recipes, the vendored BlazeFace detector, and usage errors (exit 64).

use hearth_compress::measure::{load_for_tract, GenericRunner};
use hearth_model::{accuracy, Classifier, OnnxModel, Split, Task};
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

/// A table row, cells by header.
#[derive(Debug)]
struct Row {
    step: String,
    bytes: usize,
    params: usize,
    nonzeros: usize,
    accuracy: Option<f32>,
    max_diff: Option<f32>,
    mean_diff: Option<f32>,
    decision: Option<f32>,
    latency_us: f64,
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
    let opt = |s: &str| {
        if s == "-" {
            None
        } else {
            Some(s.parse::<f32>().unwrap())
        }
    };
    lines[2..]
        .iter()
        .map(|l| {
            let c = cells(l);
            Row {
                step: c[col("step")].clone(),
                bytes: c[col("bytes")].parse().unwrap(),
                params: c[col("params")].parse().unwrap(),
                nonzeros: c[col("nonzeros")].parse().unwrap(),
                accuracy: opt(&c[col("accuracy")]),
                max_diff: opt(&c[col("max_diff")]),
                mean_diff: opt(&c[col("mean_diff")]),
                decision: opt(&c[col("decision_agree")]),
                latency_us: c[col("latency_us")].parse().unwrap(),
            }
        })
        .collect()
}

fn train_baseline(task: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{task}.onnx"));
    let mut args = vec!["train", task, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "train {task}: {stdout}{stderr}");
    assert!(stdout.contains("test accuracy"), "{stdout}");
    out
}

fn test_set(task: Task) -> hearth_model::Dataset {
    task.load(&workspace().join("data"), Split::Test).unwrap()
}

/// Runs `hearth-compress model --data data --recipe recipe -o out`, which must succeed;
/// returns stdout, stderr and the parsed table.
fn compress_ok(
    model: &Path,
    data: &str,
    recipe: &str,
    out: &Path,
    latency_runs: u32,
) -> (String, String, Vec<Row>) {
    let runs = latency_runs.to_string();
    let (code, stdout, stderr) = run(&[
        model.to_str().unwrap(),
        "--data",
        data,
        "--recipe",
        recipe,
        "-o",
        out.to_str().unwrap(),
        "--latency-runs",
        &runs,
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    println!("{stdout}");
    let mut rows = parse_table(&stdout);
    // Every recipe starts with graph normalisation (tests/normalise.rs); these models are
    // already in normal form, so it changes no output. The rows below index the steps.
    let norm = rows.remove(1);
    assert_eq!(norm.step, "normalise", "{stdout}");
    assert!(norm.max_diff.unwrap() < 1e-3, "{norm:?}");
    (stdout, stderr, rows)
}

/// The vendored BlazeFace detector.
fn blazeface() -> PathBuf {
    workspace().join("data/models/face_detection_front_128x128_barracuda.onnx")
}

fn compress(model: &Path, data: &str, recipe: &str, out: &Path) -> Vec<Row> {
    let (stdout, _, rows) = compress_ok(model, data, recipe, out, 5);
    assert_eq!(rows[0].step, "original");
    assert_eq!(rows.len(), recipe.split(';').count() + 1, "{stdout}");
    for r in &rows {
        assert!(r.latency_us > 0.0, "{r:?}");
        assert!(r.nonzeros <= r.params, "{r:?}");
    }
    rows
}

#[test]
fn digits_distill_prune_finetune_int4_package() {
    let dir = tempfile::tempdir().unwrap();
    let model = train_baseline("digits", dir.path(), &["--epochs", "20"]);
    let out = dir.path().join("digits.pkg");
    let rows = compress(
        &model,
        "data/digits",
        "distill:hidden=16,T=4,alpha=0.7,epochs=10;prune:0.8;finetune:3;quant:int4-per-channel;export:package",
        &out,
    );
    let (orig, last) = (&rows[0], rows.last().unwrap());
    let acc0 = orig.accuracy.unwrap();
    assert!(acc0 > 0.9, "{orig:?}");
    assert_eq!(orig.max_diff, Some(0.0));
    // Distillation halves the hidden layer: 64·16+16+16·10+10 parameters.
    assert_eq!(rows[1].params, 64 * 16 + 16 + 16 * 10 + 10);
    // 80% of the Gemm weights (1184) pruned; biases stay.
    assert!(rows[2].nonzeros <= 1210 - 947, "{:?}", rows[2]);
    // Fine-tuning with masks recovers accuracy and keeps the zeros.
    assert!(rows[3].accuracy.unwrap() > rows[2].accuracy.unwrap());
    assert_eq!(rows[3].nonzeros, rows[2].nonzeros);
    let acc = last.accuracy.unwrap();
    assert!(acc > acc0 - 0.08, "final {acc} vs {acc0}");
    assert!(last.bytes * 5 < orig.bytes, "{last:?} vs {orig:?}");
    // The package on disk decodes to a model tract runs with the reported accuracy.
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), last.bytes);
    let decoded = hearth_compress::package::decode_package(&bytes).unwrap();
    let a = accuracy(&Classifier::new(&decoded).unwrap(), &test_set(Task::Digits)).unwrap();
    assert!((a - acc).abs() < 1e-3, "{a} vs {acc}");
}

#[test]
fn faces_prune_finetune_kmeans_package() {
    let dir = tempfile::tempdir().unwrap();
    let model = train_baseline("faces", dir.path(), &["--epochs", "30"]);
    let out = dir.path().join("faces.pkg");
    let rows = compress(
        &model,
        "data/faces",
        "prune:0.7;finetune:5;quant:kmeans4;export:package",
        &out,
    );
    let (orig, last) = (&rows[0], rows.last().unwrap());
    let acc0 = orig.accuracy.unwrap();
    assert!(acc0 >= 0.9, "{orig:?}");
    assert!(last.accuracy.unwrap() >= acc0 - 0.06, "{last:?}");
    assert!(last.bytes * 8 < orig.bytes, "{last:?} vs {orig:?}");
    assert!(
        (last.nonzeros as f32) < 0.35 * last.params as f32,
        "{last:?}"
    );
    let decoded = hearth_compress::package::decode_package(&std::fs::read(&out).unwrap()).unwrap();
    let a = accuracy(&Classifier::new(&decoded).unwrap(), &test_set(Task::Faces)).unwrap();
    assert!((a - last.accuracy.unwrap()).abs() < 1e-3);
}

#[test]
fn plaid_neurons_prune_finetune_int8_qoperator() {
    let dir = tempfile::tempdir().unwrap();
    let model = train_baseline("plaid", dir.path(), &["--hidden", "128", "--epochs", "20"]);
    let out = dir.path().join("plaid.int8.onnx");
    let rows = compress(
        &model,
        "data/plaid",
        "prune-neurons:0.25;prune:0.5;finetune:3;quant:int8-per-channel;export:int8-qoperator",
        &out,
    );
    let (orig, last) = (&rows[0], rows.last().unwrap());
    let acc0 = orig.accuracy.unwrap();
    assert!(acc0 > 0.5, "{orig:?}");
    // Neuron pruning really shrinks the graph: 128 → 96 hidden units.
    let in_len = Task::Plaid.input_len();
    assert_eq!(rows[1].params, in_len * 96 + 96 + 96 * 11 + 11);
    assert!(last.accuracy.unwrap() > acc0 - 0.1, "{last:?} vs {orig:?}");
    assert!(last.bytes * 3 < orig.bytes, "{last:?} vs {orig:?}");
    let m = OnnxModel::load(&out).unwrap();
    assert!(hearth_compress::qonnx::plan_uses_integer_kernels(&m).unwrap());
    let a = accuracy(&Classifier::new(&m).unwrap(), &test_set(Task::Plaid)).unwrap();
    assert!((a - last.accuracy.unwrap()).abs() < 1e-3);
}

#[test]
fn blazeface_prune_int8_reports_output_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blazeface.onnx");
    let (stdout, stderr, rows) = compress_ok(
        &blazeface(),
        "data/faces",
        "prune:0.02;quant:int8-per-channel",
        &out,
        3,
    );
    assert!(stderr.contains("ConstantOfShape"), "{stderr}");
    assert!(stdout.contains("agreement: sigmoid"), "{stdout}");
    assert_eq!(rows.len(), 3);
    let (orig, last) = (&rows[0], &rows[2]);
    assert!(orig.accuracy.is_none() && last.accuracy.is_none());
    assert_eq!(orig.max_diff, Some(0.0));
    assert!((90_000..130_000).contains(&orig.params), "{orig:?}");
    // 2% of the conv weights pruned (and int8 rounds a few more to zero).
    assert!(rows[1].nonzeros as f32 <= 0.981 * orig.nonzeros as f32);
    assert!(last.nonzeros <= rows[1].nonzeros);
    // Bounds from measured runs (max 0.41, mean 0.017, decisions 0.98 on 50 faces images).
    let (max, mean, dec) = (
        last.max_diff.unwrap(),
        last.mean_diff.unwrap(),
        last.decision.unwrap(),
    );
    assert!(max > 0.0 && max < 0.6, "{last:?}");
    assert!(mean < 0.03, "{last:?}");
    assert!(dec >= 0.9, "{last:?}");
    // The written model loads (with the fix) and runs.
    let m = load_for_tract(&out).unwrap();
    let r = GenericRunner::new(&m).unwrap();
    assert_eq!(r.run(&vec![0.0; 128 * 128 * 3]).unwrap().len(), 4);
}

#[test]
fn blazeface_int8_package_shrinks_and_decodes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blazeface.hpkg");
    let (_, _, rows) = compress_ok(
        &blazeface(),
        "data/faces",
        "quant:int8-per-channel;export:package",
        &out,
        3,
    );
    assert_eq!(rows.len(), 3);
    let (orig, quant, pkg) = (&rows[0], &rows[1], &rows[2]);
    // The weights (~400 KB in f32) shrink ~4x to int8 codes plus a scale per output channel;
    // the graph itself (nodes, names, int64 shape constants: ~40 KB of the 442 KB file) is kept
    // verbatim, so the whole file shrinks less: measured 2.73x.
    let bytes = std::fs::metadata(&out).unwrap().len() as f32;
    let ratio = orig.bytes as f32 / bytes;
    assert!(
        ratio > 2.6,
        "package {bytes} B vs {} B: {ratio:.2}x",
        orig.bytes
    );
    assert_eq!(pkg.bytes as f32, bytes);
    // The decoded model is exactly the fake-quantized one: same agreement figures.
    assert_eq!(pkg.max_diff, quant.max_diff, "{pkg:?} vs {quant:?}");
    assert_eq!(pkg.mean_diff, quant.mean_diff);
    assert!(pkg.decision.unwrap() >= 0.9, "{pkg:?}");
}

#[test]
fn blazeface_int8_qoperator_runs_integer_convs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blazeface-int8.onnx");
    let (_, _, rows) = compress_ok(&blazeface(), "data/faces", "export:int8-qoperator", &out, 2);
    let (orig, int8) = (&rows[0], &rows[1]);
    // Measured 3.06x, mean diff 0.012, decisions 50/50 on the faces test images.
    assert!(orig.bytes as f32 / int8.bytes as f32 > 3.0, "{int8:?}");
    assert!(int8.mean_diff.unwrap() < 0.05, "{int8:?}");
    assert!(int8.decision.unwrap() >= 0.9, "{int8:?}");
    let m = load_for_tract(&out).unwrap();
    assert_eq!(hearth_compress::qconv::qlinear_conv_count(&m), 37);
    let kernels = hearth_compress::qconv::plan_matmul_kernels(&m).unwrap();
    assert!(!kernels.is_empty() && kernels.iter().all(|k| k.is_integer()));
}

/// Data sets Hearth does not convert (sktime's `.ts` files as they are), by their task files
/// alone: `train` by path and by name, then a recipe given only `--task`, and a model of
/// another task refused.
#[test]
fn new_tasks_train_and_compress_from_their_task_files() {
    let dir = tempfile::tempdir().unwrap();
    for (task, by) in [
        ("gunpoint", "data/gunpoint/task.toml"),
        ("basicmotions", "basicmotions"),
    ] {
        let model = dir.path().join(format!("{task}.onnx"));
        let m = model.to_str().unwrap();
        let (code, stdout, stderr) = run(&["train", by, "-o", m, "--epochs", "200"]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains(&format!("trained {task}")), "{stdout}");
        let loaded = OnnxModel::load(&model).unwrap();
        assert_eq!(loaded.task(), Some(task));
        let file = format!("data/{task}/task.toml");
        let out = dir.path().join(format!("{task}.int8.onnx"));
        let recipe = "prune:0.5;finetune:20;quant:int8-per-channel;export:int8-qoperator";
        let args = [
            m,
            "--task",
            &file,
            "--recipe",
            recipe,
            "-o",
            out.to_str().unwrap(),
        ];
        let (code, stdout, stderr) = run(&[&args[..], &["--latency-runs", "3"]].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        let rows = parse_table(&stdout);
        assert_eq!(rows[1].step, "normalise");
        let (acc0, last) = (rows[0].accuracy.unwrap(), rows.last().unwrap());
        eprintln!(
            "{task}: accuracy {acc0} -> {:?} ({} -> {} bytes)",
            last.accuracy, rows[0].bytes, last.bytes
        );
        assert!(acc0 >= 0.85, "{task}: {acc0}");
        assert!(last.accuracy.unwrap() >= acc0 - 0.05, "{task}: {last:?}");
        assert!(out.exists());
        // The model names its task: another task's data is refused.
        let other = [
            "--task",
            "data/faces/task.toml",
            "--recipe",
            "quant:int8",
            "-o",
        ];
        let x = dir.path().join("x.onnx");
        let (code, _, stderr) = run(&[&[m][..], &other, &[x.to_str().unwrap()]].concat());
        assert_eq!(code, 64, "{stderr}");
        assert!(stderr.contains(&format!("is a {task} model")), "{stderr}");
    }
}

#[test]
fn usage_errors_exit_64() {
    let blaze = "data/models/face_detection_front_128x128_barracuda.onnx";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    let out = out.to_str().unwrap();
    let bad_task = dir.path().join("task.toml");
    let text = std::fs::read_to_string(workspace().join("data/gunpoint/task.toml")).unwrap();
    std::fs::write(&bad_task, text.replace("hidden = [32]", "hidden = [0]")).unwrap();
    for (args, needle) in [
        (
            vec![blaze, "--recipe", "prune:1.5", "-o", out],
            "bad recipe",
        ),
        (
            vec![blaze, "--recipe", "shrink:0.5", "-o", out],
            "unknown step kind",
        ),
        (
            vec![blaze, "--recipe", "quant:int9", "-o", out],
            "bits must be",
        ),
        (
            vec![blaze, "--recipe", "export:float;prune:0.1", "-o", out],
            "must be the last step",
        ),
        (vec![blaze, "-o", out], "missing --recipe"),
        (
            vec![
                blaze,
                "--data",
                "data/faces",
                "--recipe",
                "prune-neurons:0.5",
                "-o",
                out,
            ],
            "cannot apply to this model",
        ),
        (
            vec![
                blaze,
                "--data",
                "data/nope",
                "--recipe",
                "quant:int8",
                "-o",
                out,
            ],
            "data/nope/task.toml",
        ),
        (
            vec![
                blaze,
                "--task",
                bad_task.to_str().unwrap(),
                "--recipe",
                "quant:int8",
                "-o",
                out,
            ],
            "field `model.hidden`",
        ),
        (
            vec![
                blaze,
                "--task",
                "data/gunpoint/task.toml",
                "--data",
                "data/faces",
                "-o",
                out,
            ],
            "cannot be used with",
        ),
        (vec!["--no-such-flag"], "unexpected argument"),
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 64, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!Path::new(out).exists());
    }
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("RECIPE") && stdout.contains("int8-qoperator"));
}
