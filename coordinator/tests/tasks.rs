//! A model whose task is a task file (a data set added by configuration alone): the
//! coordinator builds version 1 from the file's model spec and classes and evaluates it on the
//! file's held-out split; a model fetched from it names its task and classes.

mod common;

use common::{data_dir, fetch, listener, versions, Tls, ADMIN};
use hearth_coordinator::{start, Config, ModelConfig};
use hearth_model::OnnxModel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_file_model_is_built_and_evaluated_on_its_held_out_split() {
    let dir = tempfile::tempdir().unwrap();
    let task = data_dir().join("basicmotions/task.toml");
    let cfg = Config {
        db_path: dir.path().join("db"),
        data_dir: dir.path().to_path_buf(), // not needed: the task is a path
        admin_token: ADMIN.into(),
        enrollment_tokens: vec!["enroll-wrist".into()],
        models: vec![ModelConfig {
            name: "wrist".into(),
            task: task.to_str().unwrap().into(),
            init: None,
            eval: true,
            seed: 1,
        }],
        ..Config::default()
    };
    let server = start(cfg, listener().await).await.unwrap();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let v = versions(&ch, "wrist").await.unwrap();
    assert_eq!(v.len(), 1);
    // Evaluated (an untrained model: about chance on 4 classes, but a real accuracy).
    assert!((0.0..=1.0).contains(&v[0].eval_accuracy), "{:?}", v[0]);
    let creds = tls.enroll("enroll-wrist", "wrist-1").await.unwrap();
    let (bytes, _, _, _) = fetch(&ch, &creds, "wrist", 0, 0).await.unwrap();
    let model = OnnxModel::from_bytes(&bytes).unwrap();
    assert_eq!(model.task(), Some("basicmotions"));
    assert_eq!(
        model.classes(),
        ["standing", "running", "walking", "badminton"]
    );
    assert_eq!(model.input_len(), 48);
    server.shutdown().await.unwrap();
}
