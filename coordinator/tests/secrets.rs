//! Secrets never reach the logs: the real `hearth-coordinator` binary runs at
//! `RUST_LOG=trace`; a device enrols with a known token, uses its client key, an admin call
//! carries the admin token, and refused calls carry wrong ones. Neither the enrollment
//! token, the admin token nor the client key (nor the wrong ones) appears on stdout/stderr.
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hearth_proto::v1::{federation_client::FederationClient, FetchModelRequest};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-coordinator");
const ENROLL: &str = "enrol-secret-token-5f3a9c";
const WRONG: &str = "wrong-secret-token-77c1e0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_keys_never_appear_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let port = free_port();
    std::fs::write(
        &p,
        format!(
            "db_path = {db:?}\ndata_dir = {data:?}\ninsecure = true\nenrollment_tokens = [{ENROLL:?}]\n\
             [[model]]\nname = \"digits\"\ntask = \"digits\"\neval = false\n",
            db = dir.path().join("db"),
            data = data_dir(),
        ),
    )
    .unwrap();
    let out = dir.path().join("out.log");
    let err = dir.path().join("err.log");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&p)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("HEARTH_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = child.try_wait().unwrap();
        if exited.is_some() || start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "not listening ({exited:?}):\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ch = channel(([127, 0, 0, 1], port).into()).await;
    // Refusals (wrong enrollment token, wrong admin token, wrong client key) are logged.
    assert!(enroll(&ch, WRONG, "dev").await.is_err());
    assert!(hearth_proto::v1::admin_client::AdminClient::new(ch.clone())
        .list_versions(with_admin(
            hearth_proto::v1::ListVersionsRequest {
                model: "digits".into()
            },
            WRONG
        ))
        .await
        .is_err());
    let c = enroll(&ch, ENROLL, "dev").await.unwrap();
    let wrong_key = Creds {
        id: c.id.clone(),
        key: WRONG.into(),
    };
    assert!(fetch(&ch, &wrong_key, "digits", 0, 0).await.is_err());
    // Successful calls with every secret.
    let (bytes, ..) = fetch(&ch, &c, "digits", 0, 0).await.unwrap();
    assert!(!bytes.is_empty());
    let mut s = FederationClient::new(ch.clone())
        .fetch_model(with_client(
            FetchModelRequest {
                model: "digits".into(),
                version: 1,
                offset: 0,
            },
            &c,
        ))
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    let r = start_round(&ch, "digits", 1, 1, 300).await;
    assert!(r.round_id >= 1);
    let payload = vec![9u8; 64];
    let _ = upload(&ch, &c, "digits", r.round_id, 1, 5, &payload).await;
    drop(ch);
    // SIGTERM, bounded wait.
    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(15), "no exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Stdio::null();
    let log = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    // The log is a real trace (the wire was logged), and the refusals are in it.
    assert!(log.contains("TRACE"), "not a trace log:\n{log}");
    assert!(log.contains("refused") || log.contains("WARN"), "{log}");
    for (what, secret) in [
        ("enrollment token", ENROLL),
        ("admin token", ADMIN),
        ("client key", c.key.as_str()),
        ("wrong token", WRONG),
    ] {
        assert!(
            !log.contains(secret),
            "the {what} appears in the log ({} bytes)",
            log.len()
        );
    }
}
