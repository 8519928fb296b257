//! The `hearth-agent` binary: configuration errors exit 64, the default
//! configuration round-trips, and SIGTERM shuts an actuator down cleanly.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{start_broker, Sub};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-agent");

/// Sends SIGTERM to `child` and waits (bounded) for it to exit; kills it on timeout.
async fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn bad_configuration_exits_64() {
    let out = Command::new(BIN)
        .args(["--device", "bad/name"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device"));

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = Command::new(BIN)
        .args(["--task", "audio"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = Command::new(BIN)
        .args(["actuator", "--name", "porch light"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    // Broker URL rules and TLS settings are configuration errors too.
    for args in [
        &["--mqtt", "mqtt://agent:pw@hub:0"][..],
        &["--mqtt", "mqtts://hub"][..],
        &[
            "--mqtt",
            "mqtts://hub",
            "--mqtt-ca-file",
            "/nonexistent/ca.pem",
        ][..],
        &["actuator", "--name", "lamp", "--mqtt", "mqtts://hub"][..],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("pw@"), "a password was printed: {err}");
    }
}

#[test]
fn bad_flags_exit_64_help_and_version_exit_0() {
    let code = |args: &[&str]| Command::new(BIN).args(args).output().unwrap().status.code();
    assert_eq!(code(&["--no-such-flag"]), Some(64));
    assert_eq!(code(&["--replay-rate-hz", "fast"]), Some(64));
    assert_eq!(code(&["actuator"]), Some(64), "missing --name");
    assert_eq!(code(&["--help"]), Some(0));
    assert_eq!(code(&["--version"]), Some(0));
}

#[test]
fn default_config_round_trips() {
    let out = Command::new(BIN)
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let c = hearth_agent::Config::from_toml_str(&text).unwrap();
    assert_eq!(c, hearth_agent::Config::default());
    assert!(text.contains("# coordinator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_publishes_offline_and_exits_zero() {
    let port = start_broker();
    let mut sub = Sub::connect(port, "observer", &["zigbee2mqtt/porch_light/availability"]).await;
    let mut child = Command::new(BIN)
        .args([
            "actuator",
            "--name",
            "porch_light",
            "--mqtt",
            &format!("mqtt://127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let online = sub
        .wait_for(Duration::from_secs(20), |m| m.text() == "online")
        .await;
    if online.is_none() {
        let _ = child.kill();
        panic!("actuator never came online");
    }
    let status = terminate(&mut child).await;
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "exit status {status}, log:\n{log}");
    sub.wait_for(Duration::from_secs(10), |m| m.text() == "offline")
        .await
        .expect("offline published");
    // Retained: a newcomer sees it too.
    let mut late = Sub::connect(port, "late", &["zigbee2mqtt/porch_light/availability"]).await;
    let m = late.next(Duration::from_secs(10)).await.expect("retained");
    assert!(m.retain);
    assert_eq!(m.text(), "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_with_flag_overrides_publishes_events_then_stops_on_sigterm() {
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    // The file sets some values; flags override others.
    let cfg_path = state.path().join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "device = \"from-file\"\ntask = \"faces\"\nreplay_rate_hz = 0\nbootstrap_epochs = 1\n\
             data_dir = \"{}\"\n[partition]\nindex = 0\ncount = 2\n",
            common::data_dir().display()
        ),
    )
    .unwrap();
    let mut sub = Sub::connect(port, "observer", &["hearth/digit-pad/#"]).await;
    let mut child = Command::new(BIN)
        .args(["--config", cfg_path.to_str().unwrap()])
        .args([
            "--device",
            "digit-pad",
            "--task",
            "digits",
            "--replay-limit",
            "12",
            "--min-event-score",
            "0",
        ])
        .args(["--mqtt", &format!("mqtt://127.0.0.1:{port}")])
        .args(["--state-dir", state.path().join("state").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let mut events = 0;
    while events < 12 {
        let Some(m) = sub
            .wait_for(Duration::from_secs(30), |m| m.topic.contains("/event/"))
            .await
        else {
            let _ = child.kill();
            let log = std::fs::read_to_string(state.path().join("agent.log")).unwrap_or_default();
            panic!("only {events} events; agent log:\n{log}");
        };
        assert_eq!(m.topic, "hearth/digit-pad/event/digit");
        let ev = hearth_proto::mqtt::Event::parse(&m.payload).unwrap();
        assert!(ev.class.starts_with("digit_"), "{}", ev.class);
        events += 1;
    }
    let status = terminate(&mut child).await;
    assert!(status.success(), "exit status {status}");
    sub.wait_for(Duration::from_secs(10), |m| {
        m.topic == "hearth/digit-pad/availability" && m.text() == "offline"
    })
    .await
    .expect("offline published");
}

/// `hearth-agent enroll --token … --ca-file …` against a TLS coordinator: the key is made on
/// the device, the issued certificate lands in credentials.json (0600) and names the client;
/// the token is one-time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_subcommand_gets_a_client_certificate_by_csr() {
    let db = tempfile::tempdir().unwrap();
    let cfg = hearth_coordinator::Config {
        db_path: db.path().join("coord.db"),
        data_dir: common::data_dir(),
        admin_token: "admin-secret-token-0123456789".into(),
        enrollment_tokens: vec!["token-enroll-cli-01".into()],
        models: vec![hearth_coordinator::ModelConfig {
            name: "faces".into(),
            task: "faces".into(),
            init: None,
            eval: false,
            seed: 1,
        }],
        ..hearth_coordinator::Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = hearth_coordinator::start(cfg, listener).await.unwrap();
    let dev = tempfile::tempdir().unwrap();
    let ca = dev.path().join("ca.pem");
    std::fs::write(&ca, coord.ca_pem().unwrap()).unwrap();
    let state = dev.path().join("state");
    let run = |token: &str| {
        let mut c = Command::new(BIN);
        c.args(["--device", "porch-cam", "--coordinator", &coord.endpoint()])
            .arg("--data-dir")
            .arg(common::data_dir())
            .arg("--state-dir")
            .arg(&state)
            .args(["enroll", "--token", token, "--ca-file"])
            .arg(&ca)
            .env_remove("HEARTH_ENROLLMENT_TOKEN");
        // The binary's own enrolment timeout (15 s) bounds this call.
        async move {
            tokio::task::spawn_blocking(move || c.output().unwrap())
                .await
                .unwrap()
        }
    };
    let out = run("token-enroll-cli-01").await;
    assert!(out.status.success(), "{out:?}");
    let path = state.join("credentials.json");
    let creds: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let id = creds["client_id"].as_str().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    let der = hearth_coordinator::pki::pem_to_der(creds["cert_pem"].as_str().unwrap()).unwrap();
    assert_eq!(
        hearth_coordinator::pki::common_name(&der).as_deref(),
        Some(id)
    );
    assert!(creds["key_pem"].as_str().unwrap().contains("PRIVATE KEY"));
    assert!(creds.get("client_key").is_none(), "no shared key over TLS");
    let rec = coord.coordinator().store().client(id).unwrap().unwrap();
    assert_eq!(rec.device_name, "porch-cam");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "credentials readable by others");
    }
    // The token was used up: a second enrolment is refused with a clear message.
    let again = run("token-enroll-cli-01").await;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already used"),
        "{again:?}"
    );
    coord.shutdown().await.unwrap();
}

#[test]
fn wipe_empties_the_sample_store() {
    use hearth_agent::samples::{SampleStore, StoreConfig};
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SampleStore::open(dir.path(), StoreConfig::default()).unwrap();
        for i in 0..3u16 {
            s.insert(&format!("ev{i}"), &[1.0, 2.0], i).unwrap();
        }
        s.flush().unwrap();
    }
    let out = Command::new(BIN)
        .args(["--state-dir"])
        .arg(dir.path())
        .arg("wipe")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("wiped 3 stored samples"), "{stdout}");
    assert!(!SampleStore::path(dir.path()).exists());
    let s = SampleStore::open(dir.path(), StoreConfig::default()).unwrap();
    assert!(s.is_empty());
    drop(s);
    // Wiping an empty store is fine too.
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(dir.path())
        .arg("wipe")
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `metrics_listen`: a bad address is a configuration error (64), a taken port is "unavailable"
/// (69), as for every binary's listeners.
#[test]
fn metrics_listen_bad_exits_64_taken_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let write = |name: &str, listen: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "device = \"m\"\nmqtt = \"mqtt://127.0.0.1:1\"\ndata_dir = \"{data}\"\nstate_dir = \"{}\"\nbootstrap_epochs = 0\nmetrics_listen = \"{listen}\"\n",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        p
    };
    let out = Command::new(BIN)
        .arg("--config")
        .arg(write("bad.toml", "localhost"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics_listen"));
    let out = Command::new(BIN)
        .arg("--config")
        .arg(write(
            "taken.toml",
            &taken.local_addr().unwrap().to_string(),
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
}
