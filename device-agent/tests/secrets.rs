//! Secrets never reach the agent's logs: the real `hearth-agent` binary runs at
//! `RUST_LOG=trace` with a password in its broker URL, enrols with a known token (against a
//! TLS coordinator in this process: enrolment by CSR), downloads the model and takes part in
//! a round. Neither the enrollment token, the device's private key nor the broker password
//! appears on its stdout/stderr; its credentials file and state directory are private
//! (0600 / 0700).
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{data_dir, start_broker};
use hearth_agent::state::StateDir;
use hearth_coordinator::{Config as CoordConfig, ModelConfig, RoundDefaults};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{RoundState, RoundStatusRequest, StartRoundRequest};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-agent");
const ADMIN: &str = "admin-secret-token-0123456789";
const TOKEN: &str = "enrol-secret-token-a41f77";
const MQTT_PASSWORD: &str = "mqtt-secret-pass-3c9e";

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keys_and_passwords_never_appear_in_the_log() {
    let broker = start_broker();
    let dir = tempfile::tempdir().unwrap();
    let coord = hearth_coordinator::start(
        CoordConfig {
            db_path: dir.path().join("coord.db"),
            data_dir: data_dir(),
            admin_token: ADMIN.into(),
            enrollment_tokens: vec![TOKEN.into()],
            round: RoundDefaults {
                min_clients: 1,
                max_clients: 1,
                deadline_secs: 120,
                local_epochs: 1,
                ..RoundDefaults::default()
            },
            models: vec![ModelConfig {
                name: "faces".into(),
                task: "faces".into(),
                init: None,
                eval: false,
                seed: 1,
            }],
            ..CoordConfig::default()
        },
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let coordinator = common::Coord::of(&coord);
    let url = coordinator.url.clone();
    let ca = coordinator.write_ca(&dir.path().join("coordinator-ca.pem"));
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"secretive\"\ntask = \"faces\"\n\
             mqtt = \"mqtt://secretive:{MQTT_PASSWORD}@127.0.0.1:{broker}\"\n\
             coordinator = {url:?}\ncoordinator_ca_file = {ca:?}\nenrollment_token = {TOKEN:?}\ndata_dir = {data:?}\n\
             state_dir = {state:?}\nreplay_rate_hz = 5\nbootstrap_epochs = 1\n\
             [partition]\nindex = 0\ncount = 2\nalpha = 0.5\nseed = 11\n",
            data = data_dir(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(dir.path().join("agent.out")).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("agent binary starts");
    let _ = Stdio::null();
    // Enrolled and holding version 1, then one round with its upload.
    let deadline = Instant::now() + Duration::from_secs(90);
    let creds = loop {
        assert!(Instant::now() < deadline, "agent did not enrol and fetch");
        assert!(child.try_wait().unwrap().is_none(), "agent exited");
        let s = StateDir::open(&state).unwrap();
        if let (Ok(Some(c)), Ok(Some(_))) = (s.load_credentials(), s.load_model("faces")) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut admin = AdminClient::new(coordinator.channel().await);
    let round = admin
        .start_round(authed(StartRoundRequest {
            model: "faces".into(),
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 120,
            reason: "secrets test".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .round_id;
    loop {
        assert!(Instant::now() < deadline, "round did not complete");
        let st = admin
            .get_round_status(authed(RoundStatusRequest {
                model: "faces".into(),
                round_id: round,
            }))
            .await
            .unwrap()
            .into_inner();
        if st.state == RoundState::Completed as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    coord.shutdown().await.unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap()
        + &std::fs::read_to_string(dir.path().join("agent.out")).unwrap();
    assert!(log.contains("TRACE"), "not a trace log:\n{log}");
    // Over TLS the secret the device holds is its private key: every line of its PEM.
    assert!(creds.client_key.is_empty() && !creds.cert_pem.is_empty());
    let mut secrets = vec![
        ("enrollment token", TOKEN),
        ("broker password", MQTT_PASSWORD),
    ];
    secrets.extend(
        creds
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(|l| ("private key", l)),
    );
    assert!(secrets.len() > 2, "the private key is a PEM");
    for (what, secret) in secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret),
            "the {what} appears in the agent log ({} bytes)",
            log.len()
        );
    }
    for (path, want) in [
        (state.join("credentials.json"), 0o600),
        (state.clone(), 0o700),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o077,
            0,
            "{} is {mode:o}, want {want:o}",
            path.display()
        );
    }
}
