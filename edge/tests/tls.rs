//! `mqtts://` for real: a CA and a server certificate made with rcgen, Debian's Mosquitto
//! with a TLS listener on a free loopback port, and Hearth's client settings on top:
//! publish/subscribe works through TLS, and a client trusting another CA is refused.
//!
//! Needs `/usr/sbin/mosquitto` (`apt-get install -y mosquitto`; `scripts/test.sh` installs
//! it). Without it the test prints why it is skipped and passes.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_edge::{ClientSettings, Connection, MqttUrl};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{Event, Packet, QoS};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const WAIT: Duration = Duration::from_secs(10);

/// A Mosquitto child process, killed by PID when dropped.
struct Mosquitto {
    child: Child,
    log: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

/// Writes `name` world-readable (Mosquitto drops root privileges before reading its files).
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn start_mosquitto(dir: &Path, port: u16, issuer: &Issuer<'static, KeyPair>) -> Mosquitto {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "hearth test broker");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    let cert_file = write(dir, "server.pem", &cert.pem());
    let key_file = write(dir, "server.key", &key.serialize_pem());
    let conf = write(
        dir,
        "mosquitto.conf",
        &format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             log_dest stderr\nlistener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            cert_file.display(),
            key_file.display()
        ),
    );
    let log = dir.join("mosquitto.log");
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start mosquitto");
    let mut m = Mosquitto { child, log };
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = m.child.try_wait().unwrap() {
            panic!("mosquitto exited with {status}:\n{}", m.log());
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_publish_subscribe_through_mosquitto_and_a_wrong_ca_is_refused() {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!(
            "SKIPPED mqtts test: {MOSQUITTO} is missing (apt-get install -y mosquitto; \
             scripts/test.sh installs it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca_pem, issuer) = ca("hearth test CA");
    let (other_pem, _) = ca("some other CA");
    let ca_file = write(dir.path(), "ca.pem", &ca_pem);
    let other_ca = write(dir.path(), "other-ca.pem", &other_pem);
    let port = free_port();
    let broker = start_mosquitto(dir.path(), port, &issuer);
    let url = MqttUrl::parse(&format!("mqtts://127.0.0.1:{port}")).unwrap();

    // Subscriber through Hearth's reconnect loop.
    let (sub, el) = ClientSettings::new(url.clone(), "tls-sub")
        .ca_file(Some(ca_file.clone()))
        .connect()
        .unwrap();
    let mut conn = Connection::new(el, "tls subscriber");
    let status = conn.status();
    sub.subscribe("hearth/tls/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (acked_tx, acked) = tokio::sync::oneshot::channel();
    let sub_task = tokio::spawn(async move {
        let mut acked_tx = Some(acked_tx);
        while let Some(ev) = conn.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = acked_tx.take() {
                        let _ = t.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                _ => {}
            }
        }
    });
    if tokio::time::timeout(WAIT, acked).await.is_err() {
        panic!(
            "no SUBACK over TLS (last error {:?}); mosquitto log:\n{}",
            status.last_error(),
            broker.log()
        );
    }
    assert!(status.is_up());

    // Publisher: a second TLS client.
    let (publ, el) = ClientSettings::new(url.clone(), "tls-pub")
        .ca_file(Some(ca_file))
        .connect()
        .unwrap();
    let mut pconn = Connection::new(el, "tls publisher");
    let pub_task = tokio::spawn(async move { while pconn.poll().await.is_some() {} });
    publ.publish("hearth/tls/hello", QoS::AtLeastOnce, false, "over TLS")
        .await
        .unwrap();
    let (topic, payload) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message over TLS in time")
        .unwrap();
    assert_eq!(topic, "hearth/tls/hello");
    assert_eq!(payload, b"over TLS");

    // A client that trusts another CA must not get a session.
    let (_bad, mut el) = ClientSettings::new(url.clone(), "tls-wrong-ca")
        .ca_file(Some(other_ca))
        .options()
        .map(|o| rumqttc::AsyncClient::new(o, 10))
        .unwrap();
    let first = tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("an answer in time");
    match first {
        Err(e) => {
            let msg = format!("{e:?}");
            assert!(
                msg.contains("UnknownIssuer") || msg.contains("certificate"),
                "unexpected error: {msg}"
            );
        }
        Ok(ev) => panic!("connected with the wrong CA: {ev:?}"),
    }

    // A plain client on the TLS port does not get a session either.
    let plain = MqttUrl::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    let (_p, mut el) = ClientSettings::new(plain, "plain").connect().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert!(
        !matches!(r, Ok(true)),
        "a plain client got a session on the TLS listener"
    );

    sub_task.abort();
    pub_task.abort();
    drop(broker);
}
