//! The real `hearth-hub` binary: its default configuration, routing through an external
//! broker, `refresh` against a real coordinator, and its exit codes (64 for bad flags and
//! configuration, 69 for an unavailable port or coordinator). Child processes are killed by
//! PID when dropped; every wait is bounded.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{free_port, Proc, RULES};

use hearth_edge::broker::BrokerSettings;
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{RoundState, RoundStatusRequest};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const BIN: &str = env!("CARGO_BIN_EXE_hearth-hub");
const ADMIN: &str = "cli-test-admin-token-0123456789";
const WAIT: Duration = Duration::from_secs(15);

/// Runs in a fresh directory of its own: the default credential store is relative.
fn hub() -> Command {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let cwd = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hub-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&cwd).unwrap();
    let mut c = Command::new(BIN);
    c.current_dir(cwd);
    c.env_remove("HEARTH_HUB_CONFIG")
        .env_remove("HEARTH_ADMIN_TOKEN")
        .env("RUST_LOG", "warn");
    c
}

/// Runs the hub to completion (it must exit by itself), bounded.
fn run(args: &[&str]) -> Output {
    let mut child = Proc(
        hub()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    child.wait_exit(WAIT);
    let Proc(c) = &mut child;
    let mut out = Output {
        status: c.wait().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    c.stdout
        .take()
        .unwrap()
        .read_to_end(&mut out.stdout)
        .unwrap();
    c.stderr
        .take()
        .unwrap()
        .read_to_end(&mut out.stderr)
        .unwrap();
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn default_config_parses_back_as_a_valid_config() {
    let out = run(&["--print-default-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let c = hearth_hub::Config::from_toml(&text).unwrap();
    c.validate().unwrap();
    assert_eq!(c, hearth_hub::Config::default());
    assert!(
        text.contains("ca_file"),
        "the mqtts option is documented: {text}"
    );
}

#[test]
fn provision_and_deprovision_device_and_refresh_request_signs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("mqtt");
    let d = store.to_str().unwrap();
    let o = run(&[
        "--credentials-dir",
        d,
        "provision-device",
        "kitchen-plug",
        "--mqtt-url",
        "mqtts://hub.lan",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let pw_file = store.join("devices/kitchen-plug.password");
    assert!(out.contains(pw_file.to_str().unwrap()), "{out}");
    assert!(
        out.contains("mqtt = \"mqtts://kitchen-plug@hub.lan:8883\""),
        "{out}"
    );
    let pw = std::fs::read_to_string(&pw_file).unwrap();
    assert!(
        !out.contains(pw.trim()),
        "the password is not printed: {out}"
    );
    let f = hearth_edge::passwd::PasswordFile::load(&store.join("passwd")).unwrap();
    assert!(f.verify("kitchen-plug", pw.trim()));
    let acl = std::fs::read_to_string(store.join("acl")).unwrap();
    assert!(
        acl.contains("user kitchen-plug\ntopic write hearth/kitchen-plug/#"),
        "{acl}"
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Once only, unless rotated; reserved and malformed names are refused.
    for args in [
        &["provision-device", "kitchen-plug"][..],
        &["provision-device", "federation"][..],
        &["provision-device", "a/b"][..],
        &["provision-device", "x", "--role", "root"][..],
    ] {
        let o = run(&[&["--credentials-dir", d][..], args].concat());
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    let o = run(&[
        "--credentials-dir",
        d,
        "provision-device",
        "kitchen-plug",
        "--rotate",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read_to_string(&pw_file).unwrap(), pw);

    // Deprovisioned: the login, the ACL entries and the issued file go; once only.
    let o = run(&["--credentials-dir", d, "deprovision-device", "kitchen-plug"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = hearth_edge::passwd::PasswordFile::load(&store.join("passwd")).unwrap();
    assert!(!f.contains("kitchen-plug") && f.contains(hearth_hub::auth::HUB_USER));
    let acl = std::fs::read_to_string(store.join("acl")).unwrap();
    assert!(!acl.contains("kitchen-plug"), "{acl}");
    assert!(!pw_file.exists());
    for name in ["kitchen-plug", "hearth-hub", "federation"] {
        let o = run(&["--credentials-dir", d, "deprovision-device", name]);
        assert_eq!(o.status.code(), Some(64), "{name}: {}", stderr(&o));
    }

    // An admin's signed refresh request, checked with the store's key.
    let o = run(&["--credentials-dir", d, "refresh-request", "plaid"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let req: hearth_proto::mqtt::RefreshRequest = serde_json::from_slice(&o.stdout).unwrap();
    let key = hearth_hub::CredentialStore::open(&store)
        .unwrap()
        .refresh_key()
        .unwrap();
    let v = hearth_hub::auth::RefreshVerifier::new(&key);
    assert_eq!(v.verify(&req, hearth_hub::auth::now_ms()), Ok(()));
}

#[test]
fn bad_flags_and_configs_exit_64() {
    let o = run(&["--no-such-flag"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let o = run(&["--metrics-listen", "not-an-address"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("--broker"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, "actuator_bsae = \"x\"\n").unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("actuator_bsae"), "{}", stderr(&o));

    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"x\"\n[rule.when]\nmin_score = 80\n[rule.then]\nactuator = \"a\"\npayload = { state = \"ON\" }\n").unwrap();
    let o = run(&["--rules", rules.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));

    for (args, says) in [
        (&["--broker", "http://127.0.0.1:1"][..], "scheme"),
        (&["--broker", "mqtts://127.0.0.1:1"][..], "CA file"),
        (
            &[
                "--broker",
                "mqtts://127.0.0.1:1",
                "--ca-file",
                "/nonexistent/ca.pem",
            ][..],
            "cannot read CA file",
        ),
        (
            &["--ca-file", "/x.pem"][..],
            "--ca-file needs an external broker",
        ),
        (&["refresh", "plaid"][..], "needs --coordinator"),
        (
            &[
                "refresh",
                "a/b",
                "--coordinator",
                "http://127.0.0.1:1",
                "--admin-token",
                "t",
            ][..],
            "not a valid model name",
        ),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn unavailable_coordinator_or_broker_port_exits_69() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = run(&[
        "refresh",
        "digits",
        "--coordinator",
        &url,
        "--admin-token",
        ADMIN,
    ]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach"), "{}", stderr(&o));

    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(
        &cfg,
        format!("[broker]\nlisten = \"{}\"\n", held.local_addr().unwrap()),
    )
    .unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot bind embedded MQTT broker"),
        "{}",
        stderr(&o)
    );

    // An external broker nobody answers for.
    std::fs::write(&cfg, "connect_timeout_secs = 1\n").unwrap();
    let broker = format!("mqtt://127.0.0.1:{}", free_port());
    let o = run(&["--config", cfg.to_str().unwrap(), "--broker", &broker]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));

    // A home aggregator whose upstream coordinator does not answer its enrolment.
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[mqtt_auth]\ndir = \"{}\"\n[broker]\nlisten = \"127.0.0.1:0\"\n\
             [federation.aggregate]\nmodels = [\"digits\"]\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"http://127.0.0.1:{}\"\nenrollment_token = \"home-token\"\n\
             admin_token = \"home-admin-token-0123456789\"\n",
            dir.path().join("state").display(),
            dir.path().join("mqtt").display(),
            free_port()
        ),
    )
    .unwrap();
    let o = run(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("upstream coordinator"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_aggregator_section_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    let head = "[federation.aggregate]\nmodels = [\"digits\"]\n";
    for (body, says) in [
        ("", "federation.aggregate.upstream"),
        (
            "upstream = \"https://127.0.0.1:1\"\n",
            "federation.aggregate.upstream_ca_file",
        ),
        (
            "upstream = \"https://127.0.0.1:1\"\nupstream_ca_file = \"/nonexistent/ca.pem\"\n",
            "does not exist",
        ),
        (
            "upstream = \"http://127.0.0.1:1\"\n",
            "federation.aggregate.admin_token",
        ),
        (
            "upstream = \"http://127.0.0.1:1\"\nadmin_token = \"0123456789abcdefg\"\n\
             min_clients = 4\nmax_clients = 2\n",
            "min_clients <= max_clients",
        ),
        (
            "upstream = \"http://127.0.0.1:1\"\nadmin_token = \"0123456789abcdefg\"\n\
             min_clients = 1\n",
            "a round of one update",
        ),
        (
            "upstream = \"http://127.0.0.1:1\"\nadmin_token = \"0123456789abcdefg\"\n\
             min_clients = 5\n[federation.aggregate.aggregation]\ncombine = \"krum\"\n",
            "krum_select",
        ),
        ("modles = []\n", "modles"),
    ] {
        std::fs::write(&cfg, format!("{head}{body}")).unwrap();
        let o = run(&["--config", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(64), "{body}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{body}: {}", stderr(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_through_an_external_broker_and_stops_on_sigterm() {
    let broker = hearth_edge::broker::start(
        &BrokerSettings::on("127.0.0.1:0".parse().unwrap()),
        Duration::from_secs(10),
    )
    .unwrap();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut hub = Proc(
        hub()
            .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
            .args(["--rules", rules.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // A listener for commands, and an agent that publishes a person at the door until the
    // hub (once connected and subscribed) routes one to the porch light.
    let mut o = MqttOptions::new("cli-test-listener", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (listener, mut lel) = AsyncClient::new(o, 16);
    listener
        .subscribe("zigbee2mqtt/+/set", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ltask = tokio::spawn(async move {
        for _ in 0..100_000 {
            match lel.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let (agent, mut ael) =
        AsyncClient::new(MqttOptions::new("cli-test-agent", "127.0.0.1", port), 16);
    let atask = tokio::spawn(async move {
        for _ in 0..100_000 {
            if ael.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let event =
        r#"{"class":"person","score":0.93,"model":"door-cam@7","ts":"2026-11-30T18:00:00.000Z"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    let (topic, payload) = loop {
        assert!(hub.0.try_wait().unwrap().is_none(), "the hub exited");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no command routed in time"
        );
        agent
            .publish(
                "hearth/door-cam/event/detection",
                QoS::AtLeastOnce,
                false,
                event,
            )
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            break m;
        }
    };
    assert_eq!(topic, "zigbee2mqtt/porch_light/set");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["state"], "ON");
    assert!(v["hearth_id"].is_string(), "{v}");

    // SIGTERM: a clean stop, exit 0.
    let killed = Command::new("kill")
        .args(["-TERM", &hub.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || hub.wait_exit(WAIT))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    ltask.abort();
    atask.abort();
}

fn coordinator_config(db: &Path) -> hearth_coordinator::Config {
    hearth_coordinator::Config {
        db_path: db.to_path_buf(),
        data_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../data"),
        admin_token: ADMIN.into(),
        models: vec![hearth_coordinator::ModelConfig {
            name: "digits".into(),
            task: "digits".into(),
            init: None,
            eval: false,
            seed: 1,
        }],
        ..hearth_coordinator::Config::default()
    }
}

/// `hearth-hub refresh digits --coordinator <url> --admin-token <token>`, off the runtime.
async fn refresh(url: &str, ca_file: &Path, token: &str) -> Output {
    let (url, token) = (url.to_string(), token.to_string());
    let ca = ca_file.to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        run(&[
            "refresh",
            "digits",
            "--coordinator",
            &url,
            "--coordinator-ca-file",
            &ca,
            "--admin-token",
            &token,
        ])
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_opens_a_round_on_a_real_coordinator() {
    let db = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hearth_coordinator::run(
        coordinator_config(&db.path().join("db")),
        listener,
        async {
            let _ = stop_rx.await;
        },
    ));
    // TLS: the coordinator's CA is created in pki/ beside the database.
    let url = format!("https://{addr}");
    let ca_file = db.path().join("pki").join("ca.pem");
    let start = std::time::Instant::now();
    while !ca_file.exists() {
        assert!(start.elapsed() < WAIT, "no CA certificate");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = refresh(&url, &ca_file, ADMIN).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("for digits is open"), "{said}");

    // The coordinator agrees: the latest round of the model is open.
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let ch = hearth_coordinator::client::connect(&url, Some(&ca), None)
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    let mut req = tonic::Request::new(RoundStatusRequest {
        model: "digits".into(),
        round_id: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let status = admin.get_round_status(req).await.unwrap().into_inner();
    assert_eq!(status.state(), RoundState::Open);
    assert!(status.round_id >= 1);
    assert!(
        said.contains(&format!("round {} ", status.round_id)),
        "{said}"
    );

    // A wrong token is refused: exit 69 with the coordinator's answer.
    let out = refresh(&url, &ca_file, "wrong-token-0123456789").await;
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, server)
        .await
        .expect("coordinator stops in time")
        .unwrap()
        .unwrap();
}

const RULES_V2: &str = r#"
[[rule]]
name = "porch light"
[rule.when]
device = "door-cam"
class = "person"
min_score = 0.8
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = { state = "ON", event_id = "{{ id }}", note = "seen \"{{ class }}\" at {{ score }}" }
[[rule.action]]
kind = "delay"
secs = 5
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = { state = "OFF" }

[[rule]]
name = "tv must be on"
[rule.when]
class = "person"
[[rule.condition]]
kind = "state"
device = "tv"
equals = "ON"
[rule.then]
actuator = "tv_pause"
payload = { state = "ON" }
"#;

#[test]
fn rules_test_prints_what_would_fire_and_check_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, RULES_V2).unwrap();
    let f = file.to_str().unwrap();
    let ev =
        r#"{"id":"e-7","class":"person","score":0.9,"model":"m@1","ts":"2026-11-30T18:00:00Z"}"#;
    let out = run(&[
        "rules",
        "test",
        f,
        "--event",
        ev,
        "--topic",
        "hearth/door-cam/event/detection",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let want = format!(
        "event hearth/door-cam/event/detection {ev}\n\
         FIRES \"porch light\" (line 3)\n  \
         publish zigbee2mqtt/porch_light/set {{\"event_id\":\"e-7\",\"note\":\"seen \\\"person\\\" at 0.9\",\"state\":\"ON\"}}\n  \
         wait 5s\n  \
         publish zigbee2mqtt/porch_light/set {{\"state\":\"OFF\"}}\n\
         no    \"tv must be on\" (line 21): tv.state is not \"ON\" (now: unknown)\n\
         1 of 2 rules would fire\n"
    );
    assert_eq!(text, want);

    // With the tv's state given, the second rule fires too; another device, only it.
    let out = run(&[
        "rules",
        "test",
        f,
        "--event",
        ev,
        "--topic",
        "hearth/garden-cam/event/detection",
        "--state",
        r#"tv={"state":"ON"}"#,
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("no    \"porch light\" (line 3): device `garden-cam` is not `door-cam`"),
        "{text}"
    );
    assert!(text.contains("FIRES \"tv must be on\" (line 21)\n  publish zigbee2mqtt/tv_pause/set {\"state\":\"ON\"}\n"), "{text}");

    // An event the privacy guard would drop, and an invalid file: exit 64 with the line.
    let out = run(&["rules", "test", f, "--event", r#"{"class":"person"}"#]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("privacy guard"), "{}", stderr(&out));
    std::fs::write(
        &file,
        RULES_V2.replace("kind = \"delay\"", "kind = \"sleep\""),
    )
    .unwrap();
    for args in [
        vec!["rules", "test", f, "--event", ev],
        vec!["rules", "check", f],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        let e = stderr(&out);
        assert!(e.contains(&format!("{f}:13: rule \"porch light\": action.kind `sleep` must be command, scene, delay or refresh")), "{e}");
    }
    // The hub refuses to start on it too.
    let out = run(&["--rules", f, "--broker", "mqtt://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains(":13:"), "{}", stderr(&out));
    std::fs::write(&file, RULES_V2).unwrap();
    let out = run(&["rules", "check", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 rules, valid"));
}

/// `rules test` takes a camera track event as the hub's guard does (Frigate's fields, the
/// camera = the topic's device) and matches and renders its head's verdict.
#[test]
fn rules_test_takes_camera_events_and_their_sub_label() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(
        &file,
        r#"
[[rule]]
name = "stranger at the door"
[rule.when]
device = "door-cam"
label = "face"
sub_label = "none"
[rule.then]
actuator = "porch_light"
payload = { state = "ON", brightness = 254, seen = "{{ sub_label }} {{ sub_score }}" }

[[rule]]
name = "resident"
[rule.when]
sub_label = "person"
min_sub_score = 0.8
[rule.then]
actuator = "porch_light"
payload = { state = "ON", brightness = 60 }
"#,
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let cam = |camera: &str, sub: &str| {
        format!(
            r#"{{"type":"new","id":"1-1","camera":"{camera}","label":"face","score":0.9,"top_score":0.9,"box":[0.2,0.2,0.6,0.6],"start_time":1800000000.0,"end_time":null,"model":"blazeface@1"{sub}}}"#
        )
    };
    let test = |ev: &str| {
        run(&[
            "rules",
            "test",
            f,
            "--event",
            ev,
            "--topic",
            "hearth/door-cam/event/detection",
        ])
    };
    let out = test(&cam("door-cam", r#","sub_label":"none","sub_score":0.75"#));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("FIRES \"stranger at the door\" (line 3)\n  publish zigbee2mqtt/porch_light/set {\"brightness\":254,\"seen\":\"none 0.75\",\"state\":\"ON\"}\n"),
        "{text}"
    );
    assert!(
        text.contains("no    \"resident\" (line 13): sub_label `none` is not `person`"),
        "{text}"
    );
    assert!(text.ends_with("1 of 2 rules would fire\n"), "{text}");
    // Without a head verdict neither fires, and the reason says so.
    let out = test(&cam("door-cam", ""));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("no head verdict (sub_label) on the event")
            && text.ends_with("0 of 2 rules would fire\n"),
        "{text}"
    );
    // A camera event naming another camera than the topic's device is what the guard drops.
    let out = test(&cam(
        "garden-cam",
        r#","sub_label":"none","sub_score":0.75"#,
    ));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("privacy guard"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules_and_history_is_listed() {
    let broker = hearth_edge::broker::start(
        &BrokerSettings::on("127.0.0.1:0".parse().unwrap()),
        Duration::from_secs(10),
    )
    .unwrap();
    let port = broker.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let metrics_port = free_port();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "client_id = \"sighup-hub\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             [rules_engine]\nreload_secs = 0\nhistory = \"{}\"\n[broker]\nurl = \"mqtt://127.0.0.1:{port}\"\n",
            dir.path().join("history").display()
        ),
    )
    .unwrap();
    let mut hub = Proc(
        hub()
            .args([
                "--config",
                config.to_str().unwrap(),
                "--rules",
                rules.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (listener, mut lel) =
        AsyncClient::new(MqttOptions::new("sighup-listener", "127.0.0.1", port), 16);
    listener
        .subscribe("zigbee2mqtt/+/set", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ltask = tokio::spawn(async move {
        for _ in 0..100_000 {
            match lel.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.topic.clone());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let (agent, mut ael) =
        AsyncClient::new(MqttOptions::new("sighup-agent", "127.0.0.1", port), 16);
    let atask = tokio::spawn(async move {
        for _ in 0..100_000 {
            if ael.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let event =
        r#"{"class":"person","score":0.93,"model":"door-cam@7","ts":"2026-11-30T18:00:00.000Z"}"#;
    let mut first_command = async |want: &str| {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no command to {want} in time"
            );
            agent
                .publish(
                    "hearth/door-cam/event/detection",
                    QoS::AtLeastOnce,
                    false,
                    event,
                )
                .await
                .unwrap();
            if let Ok(Some(t)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                if t == want {
                    return;
                }
            }
        }
    };
    first_command("zigbee2mqtt/porch_light/set").await;
    // The file changes; without polling (reload_secs = 0) only SIGHUP reloads it.
    std::fs::write(&rules, RULES.replace("porch_light", "garden_light")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.signal("-HUP");
    first_command("zigbee2mqtt/garden_light/set").await;
    assert!(
        hub.0.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the hub"
    );

    // While the hub holds the history database, `rules history` reads it over HTTP.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            run(&[
                "--config",
                config.to_str().unwrap(),
                "rules",
                "history",
                "--rule",
                "porch light",
                "--json",
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().count() >= 1, "{text}");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["rule"], "porch light");
        let topic = v["commands"][0]["topic"].as_str().unwrap().to_string();
        assert!(
            topic == "zigbee2mqtt/porch_light/set" || topic == "zigbee2mqtt/garden_light/set",
            "{v}"
        );
    }
    hub.signal("-TERM");
    let status = tokio::task::spawn_blocking(move || hub.wait_exit(WAIT))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Stopped: read from the database itself.
    let out = run(&["--config", config.to_str().unwrap(), "rules", "history"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"porch light\" (event hearth/door-cam/event/detection)"),
        "{text}"
    );
    assert!(text.contains("zigbee2mqtt/garden_light/set"), "{text}");
    ltask.abort();
    atask.abort();
}
