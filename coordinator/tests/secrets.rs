//! Secrets never reach the logs: the real `hearth-coordinator` binary runs at
//! `RUST_LOG=trace` over TLS; a device enrols by CSR with a known token and calls with its
//! certificate, an admin call carries the admin token, and refused calls carry wrong ones.
//! Neither the enrollment token, the admin token, the wrong ones, nor a private key (the
//! client's, the CA's, the server's) appears on stdout/stderr.
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
            "db_path = {db:?}\ndata_dir = {data:?}\nenrollment_tokens = [{ENROLL:?}]\n\
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
    let tls = tls_when_ready(([127, 0, 0, 1], port).into(), &dir.path().join("pki")).await;
    let ch = tls.ch.clone();
    // Refusals (wrong enrollment token, wrong admin token, no client certificate) are logged.
    assert!(tls.enroll(WRONG, "dev").await.is_err());
    assert!(hearth_proto::v1::admin_client::AdminClient::new(ch.clone())
        .list_versions(with_admin(
            hearth_proto::v1::ListVersionsRequest {
                model: "digits".into()
            },
            WRONG
        ))
        .await
        .is_err());
    let c = tls.enroll(ENROLL, "dev").await.unwrap();
    let wrong_key = Creds {
        id: c.id.clone(),
        key: WRONG.into(),
        tls: None,
    };
    assert!(fetch(&ch, &wrong_key, "digits", 0, 0).await.is_err());
    // Successful calls with every secret.
    let (bytes, ..) = fetch(&ch, &c, "digits", 0, 0).await.unwrap();
    assert!(!bytes.is_empty());
    let mut s = FederationClient::new(c.channel(&ch))
        .fetch_model(with_client(
            FetchModelRequest {
                model: "digits".into(),
                version: 1,
                offset: 0,
                have_version: 0,
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
    drop((ch, tls, c.tls.clone()));
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
    // A private key would show as its PEM base64: every line of each is looked for.
    let client_key = c.tls.as_ref().unwrap().cert.key_pem.clone();
    let ca_key = std::fs::read_to_string(dir.path().join("pki/ca.key")).unwrap();
    let server_key = std::fs::read_to_string(dir.path().join("pki/server.key")).unwrap();
    let mut secrets = vec![
        ("enrollment token", ENROLL),
        ("admin token", ADMIN),
        ("wrong token", WRONG),
    ];
    for (what, pem) in [
        ("client private key", &client_key),
        ("CA private key", &ca_key),
        ("server private key", &server_key),
    ] {
        let body: Vec<&str> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect();
        assert!(!body.is_empty(), "{what} is a PEM");
        secrets.extend(body.into_iter().map(|l| (what, l)));
    }
    for (what, secret) in secrets {
        assert!(
            !log.contains(secret),
            "the {what} appears in the log ({} bytes)",
            log.len()
        );
    }
}
