//! The production broker for real: Debian's Mosquitto started with `deploy/mosquitto/
//! mosquitto.conf` (adapted to a temp dir, a free loopback port and certificates made by
//! rcgen), logins and ACLs written by the hub's credential store (what `hearth-hub
//! provision-device` writes), the hub itself connected over `mqtts://` with its password file.
//!
//! Legitimate flows work (a device's event reaches the hub, the hub's command reaches the
//! actuator, the actuator reads its own commands, an admin's refresh reaches the hub), and a
//! device cannot publish under another device's topics, cannot publish commands, cannot
//! subscribe to `#` or to another's commands, and cannot request a refresh. Mosquitto drops a
//! denied publish silently (MQTT 3.1.1 has no negative PUBACK): the test detects it with an
//! admin subscribed to `#` and a barrier — the same client's next, allowed publish arrives,
//! the denied one before it never did. Denied subscriptions show in the SUBACK (0x80).
//!
//! `hearth-hub deprovision-device` takes a device out: after Mosquitto's reload (SIGHUP) the
//! device, connected until then, is disconnected and its password no longer logs in, while
//! the others still do.
//!
//! Needs `/usr/sbin/mosquitto` (`scripts/test.sh` installs it); without it the tests say so
//! and pass.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, wait_listening, Proc};
use hearth_edge::{ClientSettings, Connection, LinkStatus, MqttUrl};
use hearth_hub::{BrokerConfig, Config, CredentialStore, Metrics, RefreshAuth, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio::time::timeout;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const WAIT: Duration = Duration::from_secs(10);
const BASE: &str = "zigbee2mqtt";
const RULES: &str = r#"
[[rule]]
name = "porch light"
[rule.when]
device = "door-cam"
class = "person"
min_score = 0.8
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
cooldown_secs = 0
"#;

fn event(class: &str) -> Vec<u8> {
    format!(
        r#"{{"class":"{class}","score":0.99,"model":"door-cam@1","ts":"2026-11-30T20:00:00Z"}}"#
    )
    .into_bytes()
}

/// The broker's TLS files, signed by a fresh CA; returns the CA file.
fn certificates(dir: &Path) -> PathBuf {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "hearth test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("broker.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("broker.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    dir.join("ca.pem")
}

/// `deploy/mosquitto/mosquitto.conf` with its paths, port and log moved into the test's
/// directory; every replaced line must exist, so the test follows the shipped file.
fn adapted_config(dir: &Path, store: &Path, port: u16) -> String {
    let shipped = include_str!("../../deploy/mosquitto/mosquitto.conf");
    let mut text = shipped.to_string();
    for (from, to) in [
        ("/var/lib/hearth/hub/mqtt/", format!("{}/", store.display())),
        ("/var/lib/mosquitto/", format!("{}/", dir.display())),
        ("listener 8883", format!("listener {port} 127.0.0.1")),
        (
            "/etc/mosquitto/certs/hearth-broker.pem",
            dir.join("broker.pem").display().to_string(),
        ),
        (
            "/etc/mosquitto/certs/hearth-broker.key",
            dir.join("broker.key").display().to_string(),
        ),
        ("log_dest syslog", "log_dest stderr".into()),
    ] {
        assert!(text.contains(from), "the shipped config has no `{from}`");
        text = text.replace(from, &to);
    }
    // The test runs as root in a private temp dir: Mosquitto keeps root to read it.
    format!("user root\nlog_type all\n{text}")
}

/// Mosquitto started on a free loopback port with the adapted shipped configuration (the
/// store's `passwd` and `acl`), killed by PID when dropped; its log is `<dir>/mosquitto.log`.
struct Mosquitto {
    proc: Proc,
    port: u16,
    log: PathBuf,
}

impl Mosquitto {
    fn start(dir: &Path, store: &Path) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, adapted_config(dir, store, port)).unwrap();
        let log = dir.join("mosquitto.log");
        let mut proc = Proc(
            Command::new(MOSQUITTO)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start mosquitto"),
        );
        let logs = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_listening(&mut proc, port, WAIT, logs);
        Mosquitto { proc, port, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One login attempt as `user` with its password file: `Ok` on an accepting CONNACK, else
/// what refused it.
async fn login(port: u16, ca: &Path, user: &str, password_file: &Path) -> Result<(), String> {
    let url = MqttUrl::parse(&format!("mqtts://{user}@127.0.0.1:{port}")).unwrap();
    let (_client, mut el) = ClientSettings::new(url, format!("login-test-{user}"))
        .ca_file(Some(ca.to_path_buf()))
        .password_file(Some(password_file.to_path_buf()))
        .keep_alive(Duration::from_secs(10))
        .connect()
        .unwrap();
    match timeout(WAIT, el.poll()).await.expect("an answer in time") {
        Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => Ok(()),
        Ok(other) => Err(format!("{other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// One rumqttc client over TLS logged in as `user` with its password file, with what it
/// receives forwarded.
struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
    /// Whether it is connected, how often it connected and failed.
    status: std::sync::Arc<LinkStatus>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn connect(port: u16, ca: &Path, user: &str, password_file: &Path) -> Client {
        let url = MqttUrl::parse(&format!("mqtts://{user}@127.0.0.1:{port}")).unwrap();
        let (client, el) = ClientSettings::new(url, format!("acl-test-{user}"))
            .ca_file(Some(ca.to_path_buf()))
            .password_file(Some(password_file.to_path_buf()))
            .keep_alive(Duration::from_secs(10))
            .connect()
            .unwrap();
        let mut conn = Connection::new(el, format!("acl test {user}"));
        let status = conn.status();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(ev) = conn.poll().await {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        timeout(WAIT, async {
            while !matches!(rx.recv().await, Some(Event::Incoming(Packet::ConnAck(_)))) {}
        })
        .await
        .unwrap_or_else(|_| panic!("{user} did not connect"));
        Client {
            client,
            rx,
            task,
            status,
        }
    }

    /// Subscribes to `filter` and returns the broker's SUBACK code.
    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        timeout(WAIT, async {
            loop {
                if let Some(Event::Incoming(Packet::SubAck(a))) = self.rx.recv().await {
                    return a.return_codes[0];
                }
            }
        })
        .await
        .expect("SUBACK in time")
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// Publications received until `until` matches one (returned last), bounded.
    async fn until(
        &mut self,
        mut until: impl FnMut(&str, &[u8]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        timeout(WAIT, async {
            loop {
                if let Some(Event::Incoming(Packet::Publish(p))) = self.rx.recv().await {
                    let done = until(&p.topic, &p.payload);
                    got.push((p.topic.clone(), p.payload.to_vec()));
                    if done {
                        return;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("waited in vain; received {got:?}"));
        got
    }

    /// Publications received within `d` (for a client that must receive nothing).
    async fn within(&mut self, d: Duration) -> Vec<String> {
        let mut got = Vec::new();
        let _ = timeout(d, async {
            loop {
                if let Some(Event::Incoming(Packet::Publish(p))) = self.rx.recv().await {
                    got.push(p.topic.clone());
                }
            }
        })
        .await;
        got
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acls_confine_each_device_to_its_own_topics() {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("SKIPPED: {MOSQUITTO} is missing (apt-get install -y mosquitto)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let ca = certificates(dir.path());

    // What `hearth-hub provision-device` writes: the hub's login, two cameras, the porch
    // light (an actuator) and an admin.
    let store = CredentialStore::open(&dir.path().join("mqtt")).unwrap();
    store.ensure_hub(BASE).unwrap();
    let pw = |name: &str, role: Role| {
        store
            .provision(name, role, BASE, false)
            .unwrap()
            .password_file
    };
    let cam_a = pw("door-cam", Role::Device);
    let cam_b = pw("garden-cam", Role::Device);
    let light_pw = pw("porch_light", Role::Actuator);
    let admin_pw = pw("admin", Role::Admin);

    let broker = Mosquitto::start(dir.path(), store.dir());
    let port = broker.port;
    let logs = || broker.logs();

    // The hub, over mqtts:// with its own password file; refreshes left to Mosquitto's ACL
    // (signed ones are tested on the embedded broker), so the ACL alone is what is shown.
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut cfg = Config {
        client_id: "acl-hub".into(),
        rules: Some(rules),
        broker: BrokerConfig::External {
            url: format!("mqtts://hearth-hub@127.0.0.1:{port}"),
            username: None,
            password: None,
            password_file: Some(store.hub_password_path()),
            ca_file: Some(ca.clone()),
        },
        ..Config::default()
    };
    cfg.mqtt_auth.dir = store.dir().to_path_buf();
    cfg.mqtt_auth.refresh = RefreshAuth::BrokerAcl;
    let hub = timeout(Duration::from_secs(20), hearth_hub::start(cfg))
        .await
        .expect("hub starts in time")
        .unwrap_or_else(|e| panic!("hub: {e}\n{}", logs()));
    let m = hub.metrics();

    let mut admin = Client::connect(port, &ca, "admin", &admin_pw).await;
    assert_eq!(
        admin.subscribe("#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut light = Client::connect(port, &ca, "porch_light", &light_pw).await;
    assert_eq!(
        light.subscribe(&format!("{BASE}/porch_light/set")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "an actuator reads its own commands"
    );
    let mut a = Client::connect(port, &ca, "door-cam", &cam_a).await;
    let b = Client::connect(port, &ca, "garden-cam", &cam_b).await;

    // Legitimate: the camera's event reaches the hub, the rule's command (published by the
    // hub) reaches the light.
    a.publish("hearth/door-cam/event/detection", event("person"))
        .await;
    let got = light.until(|t, _| t.ends_with("/set")).await;
    let cmd: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(cmd["state"], "ON", "{cmd}");
    assert_eq!(Metrics::get(&m.commands_published), 1);

    // Denied publishes, each followed by an allowed barrier from the same client: when the
    // admin (subscribed to `#`) sees the barrier, the denied message would have come first.
    let denied: [(&str, Vec<u8>); 4] = [
        ("hearth/garden-cam/event/detection", event("person")),
        ("hearth/garden-cam/availability", b"offline".to_vec()),
        (
            "zigbee2mqtt/porch_light/set",
            br#"{"state":"OFF"}"#.to_vec(),
        ),
        (
            "hearth/federation/refresh",
            br#"{"model":"faces"}"#.to_vec(),
        ),
    ];
    for (i, (topic, payload)) in denied.iter().enumerate() {
        a.publish(topic, payload.clone()).await;
        let barrier = format!("hearth/door-cam/barrier/{i}");
        a.publish(&barrier, "b").await;
        let seen = admin.until(|t, _| t == barrier).await;
        let leaked: Vec<_> = seen.iter().filter(|(t, _)| t == topic).collect();
        assert!(
            leaked.is_empty(),
            "door-cam published on {topic}: {leaked:?}\n{}",
            logs()
        );
    }
    // The hub saw none of it: no event from garden-cam, no refresh, one command only; the
    // light got no OFF.
    assert!(hub
        .registry()
        .get("garden-cam")
        .is_none_or(|d| d.events == 0));
    assert_eq!(Metrics::get(&m.refresh_requests), 0);
    assert_eq!(Metrics::get(&m.commands_published), 1);
    assert_eq!(
        light.within(Duration::from_millis(300)).await,
        Vec::<String>::new()
    );

    // Subscriptions beyond its own topics: everything, another device's topics, another's
    // commands, the refresh topic. Mosquitto 2.0 grants some of these in the SUBACK and then
    // filters every message by the read ACL, so what counts is what arrives (below); the
    // codes are reported. Its own topics and the model announcements are granted.
    let mut codes = Vec::new();
    for filter in [
        "#",
        "hearth/#",
        "hearth/garden-cam/#",
        "zigbee2mqtt/porch_light/set",
        "zigbee2mqtt/+/set",
        "hearth/federation/refresh",
    ] {
        codes.push((filter, a.subscribe(filter).await));
    }
    println!("SUBACK codes for door-cam's subscriptions: {codes:?}");
    for filter in ["hearth/door-cam/#", "hearth/federation/model/+"] {
        assert_eq!(
            a.subscribe(filter).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter}"
        );
    }
    // Traffic on every one of those topics, from those allowed to publish it: the other
    // camera's event, the hub's command (fired by door-cam's own event), an admin's refresh.
    b.publish("hearth/garden-cam/event/detection", event("cat"))
        .await;
    a.publish("hearth/door-cam/event/detection", event("person"))
        .await;
    admin
        .publish(
            "hearth/federation/refresh",
            br#"{"model":"faces"}"#.to_vec(),
        )
        .await;
    light.until(|t, _| t.ends_with("/set")).await;
    let mut want = vec![
        "hearth/garden-cam/event/detection",
        "hearth/federation/refresh",
    ];
    admin
        .until(|t, _| {
            want.retain(|w| *w != t);
            want.is_empty()
        })
        .await;
    // Mosquitto has handled all of it: whatever door-cam was going to get is queued before
    // its own next message.
    a.publish("hearth/door-cam/barrier/end", "b").await;
    let got = a.until(|t, _| t == "hearth/door-cam/barrier/end").await;
    assert!(
        got.iter().all(|(t, _)| t.starts_with("hearth/door-cam/")),
        "door-cam received others' messages: {:?}",
        got.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    assert!(got.len() >= 2, "door-cam received its own event: {got:?}");
    timeout(WAIT, async {
        while Metrics::get(&m.refresh_requests) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the admin's refresh reaches the hub");

    // The actuator cannot command itself or others either, nor act as a camera.
    light
        .publish(
            "zigbee2mqtt/porch_light/set",
            br#"{"state":"OFF"}"#.to_vec(),
        )
        .await;
    light
        .publish("hearth/door-cam/event/detection", event("forged"))
        .await;
    light
        .publish("zigbee2mqtt/porch_light", br#"{"state":"ON"}"#.to_vec())
        .await;
    let seen = admin.until(|t, _| t == "zigbee2mqtt/porch_light").await;
    let text = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    assert!(
        seen.iter()
            .all(|(_, p)| !text(p).contains("OFF") && !text(p).contains("forged")),
        "{seen:?}"
    );
    assert_eq!(
        light.within(Duration::from_millis(300)).await,
        Vec::<String>::new()
    );

    // Labels from the home: an admin (a user, Home Assistant) corrects door-cam's verdicts on
    // `hearth/door-cam/feedback`, which door-cam reads; another device cannot label them.
    b.publish(
        "hearth/door-cam/feedback",
        br#"{"event":"0123456789abcdef","label":"cat"}"#.to_vec(),
    )
    .await;
    b.publish("hearth/garden-cam/barrier/fb", "b").await;
    let seen = admin
        .until(|t, _| t == "hearth/garden-cam/barrier/fb")
        .await;
    assert!(
        seen.iter().all(|(t, _)| t != "hearth/door-cam/feedback"),
        "garden-cam labelled door-cam's samples: {seen:?}"
    );
    let fb = br#"{"event":"0123456789abcdef","label":"person"}"#;
    admin.publish("hearth/door-cam/feedback", fb.to_vec()).await;
    let got = a.until(|t, _| t == "hearth/door-cam/feedback").await;
    let feedback: Vec<_> = got
        .iter()
        .filter(|(t, _)| t == "hearth/door-cam/feedback")
        .collect();
    assert_eq!(feedback.len(), 1, "{got:?}");
    assert_eq!(
        feedback[0].1,
        fb.to_vec(),
        "the admin's feedback, not garden-cam's"
    );

    // Mosquitto's own account agrees: every one of those publishes was denied by the ACL.
    let l = logs();
    assert_eq!(
        l.matches("Denied PUBLISH from acl-test-door-cam").count(),
        4,
        "{l}"
    );
    assert_eq!(
        l.matches("Denied PUBLISH from acl-test-porch_light")
            .count(),
        2,
        "{l}"
    );
    assert_eq!(
        l.matches("Denied PUBLISH from acl-test-garden-cam").count(),
        1,
        "{l}"
    );
    assert_eq!(l.matches("Denied PUBLISH from acl-hub").count(), 0, "{l}");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deprovisioned_device_is_cut_off_and_refused_after_a_reload() {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("SKIPPED: {MOSQUITTO} is missing (apt-get install -y mosquitto)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let ca = certificates(dir.path());
    let store = CredentialStore::open(&dir.path().join("mqtt")).unwrap();
    store.ensure_hub(BASE).unwrap();
    let door = store
        .provision("door-cam", Role::Device, BASE, false)
        .unwrap();
    let garden = store
        .provision("garden-cam", Role::Device, BASE, false)
        .unwrap();
    // The device keeps its copy of the password (the store's copy goes with it).
    let door_copy = dir.path().join("door-cam.password");
    std::fs::copy(&door.password_file, &door_copy).unwrap();
    let broker = Mosquitto::start(dir.path(), store.dir());
    let port = broker.port;
    let door_cam = Client::connect(port, &ca, "door-cam", &door_copy).await;
    assert!(door_cam.status.is_up());

    // The real command, on the store Mosquitto reads.
    let mut cli = Proc(
        Command::new(env!("CARGO_BIN_EXE_hearth-hub"))
            .arg("--credentials-dir")
            .arg(store.dir())
            .args(["deprovision-device", "door-cam"])
            .env_remove("HEARTH_HUB_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = cli.wait_exit(WAIT);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut cli.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("deprovisioned `door-cam`"), "{out}");
    assert!(!store.password_path("door-cam").exists());
    let acl = std::fs::read_to_string(store.acl_path()).unwrap();
    assert!(!acl.contains("door-cam"), "{acl}");

    // `systemctl reload mosquitto`: SIGHUP. Mosquitto reads passwd and acl again and
    // disconnects the clients whose login no longer holds.
    broker.proc.signal("-HUP");
    timeout(WAIT, async {
        while door_cam.status.is_up() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("door-cam is still connected\n{}", broker.logs()));
    let refused = login(port, &ca, "door-cam", &door_copy).await;
    assert!(
        refused.is_err(),
        "door-cam logged in after it was deprovisioned\n{}",
        broker.logs()
    );
    println!("door-cam's login after the reload: {refused:?}");
    // Its own reconnection attempts (the client keeps trying) were refused too.
    assert_eq!(door_cam.status.connects(), 1, "{}", broker.logs());
    // The other device is untouched.
    login(port, &ca, "garden-cam", &garden.password_file)
        .await
        .unwrap_or_else(|e| panic!("garden-cam refused: {e}\n{}", broker.logs()));
}
