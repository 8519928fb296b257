//! "Configuration alone": data sets Hearth has no code for (UCR GunPoint, UEA BasicMotions —
//! multivariate), given only as their `.ts` files and a task file copied into a directory of
//! their own, run a whole home end to end: coordinator and agents name nothing but the task
//! file's path, a federated round completes over real gRPC, the coordinator's evaluation
//! reports held-out accuracy, and the real `hearth-compress` binary compresses the federated
//! result with `--task <that file>`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hearth_demo::{default_data_dir, AgentGroup, Home, HomeOptions};

/// Copies `data/<set>/` (the task file and its data files, nothing else) to `<dir>/<set>/`
/// and returns the copied task file.
fn copy_set(set: &str, dir: &Path) -> PathBuf {
    let src = default_data_dir().join(set);
    let dst = dir.join("sets").join(set);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst.join("task.toml")
}

/// The `hearth-compress` binary of this build. A workspace test run (`scripts/test.sh`) has
/// built it already, for `compress/tests`; it is built here only when this package's tests run
/// alone. Calling cargo when the binary exists would rebuild it with this package's feature set
/// (minutes on a fresh clone, past the test's time limit in CI).
fn compress_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/hearth-compress
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("hearth-compress");
    if bin.is_file() {
        return bin;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut child = Command::new(env!("CARGO"))
        .args(["build", "--offline", "-p", "hearth-compress", "--bin"])
        .arg("hearth-compress")
        .current_dir(workspace)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cargo runs");
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("building hearth-compress took longer than 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "cargo build -p hearth-compress failed");
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

/// Runs a home of three agents on `task` (a path), one round, and checks evaluation and
/// compression. Returns (accuracy before, after).
async fn round_on(set: &str, count: usize, floor: f32) -> (f32, f32) {
    let dir = tempfile::tempdir().unwrap();
    let task = copy_set(set, dir.path());
    let spec = hearth_model::TaskSpec::from_file(&task).unwrap();
    let mut o = HomeOptions::demo(
        // Agents and coordinator must not fall back on the vendored directory: point the
        // data directory at an empty one, so only the task file's path can be resolved.
        dir.path().join("no-data"),
        dir.path().join("state"),
    );
    std::fs::create_dir_all(&o.data_dir).unwrap();
    o.groups = vec![AgentGroup {
        prefix: format!("{set}-dev"),
        task: task.display().to_string(),
        count,
    }];
    o.replay_rate_hz = 20.0;
    let home = Home::start(&o).await.expect("home starts from a task file");
    assert_eq!(home.models(), std::slice::from_ref(&spec.name));
    for (d, _, a) in &home.agents {
        assert_eq!(
            a.classes(),
            spec.classes,
            "{d} runs the task file's classes"
        );
    }
    let s = home
        .refresh_over_mqtt(&spec.name, Duration::from_secs(180))
        .await
        .expect("round completes");
    assert_eq!(s.updates as usize, count, "every agent contributed");
    let v = home.versions(&spec.name).await.unwrap();
    let (a1, a2) = (v[0].eval_accuracy, v[1].eval_accuracy);
    eprintln!("{set}: held-out accuracy v1 {a1:.3} -> v2 {a2:.3}");
    assert!(a2 >= floor, "{set} v2 held-out accuracy {a2} (v1 {a1})");

    // The federated model as an agent stored it, compressed with the task file alone.
    let (d, _, _) = &home.agents[0];
    let model = o
        .state_dir
        .join(d)
        .join(format!("model-{}.onnx", spec.name));
    assert!(model.is_file(), "{} missing", model.display());
    let out = dir.path().join("compressed.onnx");
    let bin = tokio::task::spawn_blocking(compress_bin).await.unwrap();
    let run = tokio::task::spawn_blocking({
        let (task, model, out) = (task.clone(), model.clone(), out.clone());
        move || {
            Command::new(bin)
                .arg(&model)
                .arg("--task")
                .arg(&task)
                .args(["--recipe", "prune:0.5;quant:int8-per-channel", "-o"])
                .arg(&out)
                .args(["--latency-runs", "2"])
                .output()
                .expect("hearth-compress runs")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "hearth-compress failed: {stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{stdout}");
    // The table's accuracy column is measured on the task file's test split.
    assert!(stdout.contains("acc"), "{stdout}");
    let compressed = hearth_model::OnnxModel::load(&out).unwrap();
    assert_eq!(compressed.task(), Some(spec.name.as_str()));
    home.shutdown().await.unwrap();
    (a1, a2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gunpoint_round_by_task_file_alone() {
    // 2 classes, 50 train series: chance is 0.5.
    round_on("gunpoint", 3, 0.6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basicmotions_round_by_task_file_alone() {
    // 4 classes, 6 channels, 40 train series: chance is 0.25.
    round_on("basicmotions", 3, 0.4).await;
}
