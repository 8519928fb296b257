//! Test helpers: an embedded rumqttd broker on a free loopback port (the edge layer's
//! builder, the same the hub uses), a rumqttc subscriber that records what it receives, and
//! a camera test's home (ffmpeg or skip, broker, clip; `hearth_camera::testkit`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use hearth_edge::broker::BrokerSettings;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// Starts a broker on 127.0.0.1:<free port> with the hub's own builder (on its own thread,
/// for the rest of the test process) and returns the port once it is known to answer.
pub fn start_broker() -> u16 {
    let settings = BrokerSettings {
        max_inflight: 200,
        segment_size: 16 * 1024 * 1024,
        segment_count: 10,
        ..BrokerSettings::on("127.0.0.1:0".parse().unwrap())
    };
    hearth_edge::broker::start(&settings, Duration::from_secs(10))
        .expect("broker starts")
        .addr()
        .port()
}

/// One received publication.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A subscriber collecting publications on its filters.
pub struct Sub {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sub {
    /// Connects and subscribes; returns once every subscription is acknowledged.
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Sub {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut el) = AsyncClient::new(o, 64);
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            for _ in 0..1_000_000 {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for _ in filters {
            tokio::time::timeout(Duration::from_secs(10), ack_rx.recv())
                .await
                .expect("suback in time")
                .expect("subscriber alive");
        }
        Sub { client, rx, task }
    }

    /// Next message within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<Msg> {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits (≤ `limit`) for a message matching `pred`, returning it and skipping others.
    pub async fn wait_for(&mut self, limit: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.next(left).await?;
            if pred(&m) {
                return Some(m);
            }
        }
    }
}

/// The workspace's vendored data directory.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// A camera test's home: a broker on a free port, a temporary directory and, from the repo's
/// faces, the frames of a clip (`<tmp>/frames`, none for no shots).
pub struct CameraHome {
    pub port: u16,
    pub tmp: tempfile::TempDir,
    pub frames: PathBuf,
}

impl CameraHome {
    /// `None` (the test skips, saying so) without ffmpeg.
    pub fn new(test: &str, shots: &[hearth_camera::scene::Shot]) -> Option<CameraHome> {
        if hearth_camera::testkit::skip_without_ffmpeg(test) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let frames = if shots.is_empty() {
            tmp.path().join("frames")
        } else {
            hearth_camera::testkit::clip(&data_dir(), tmp.path(), shots).unwrap()
        };
        Some(CameraHome {
            port: start_broker(),
            tmp,
            frames,
        })
    }

    /// The clip's frames as a looping folder source.
    pub fn folder(&self) -> hearth_camera::SourceConfig {
        hearth_camera::SourceConfig::Folder {
            path: self.frames.clone(),
            glob: "*.ppm".into(),
            repeat: true,
        }
    }

    /// An agent `device` with `camera` on this home's broker, data and state directories
    /// (one bootstrap epoch; tests change the rest).
    pub fn agent(&self, device: &str, camera: hearth_camera::CameraConfig) -> hearth_agent::Config {
        hearth_agent::Config {
            device: device.into(),
            mqtt: format!("mqtt://127.0.0.1:{}", self.port),
            data_dir: data_dir(),
            state_dir: self.tmp.path().join("state"),
            bootstrap_epochs: 1,
            camera: Some(camera),
            ..hearth_agent::Config::default()
        }
    }
}

/// A TLS coordinator as a test's agents and admin calls see it: its URL and CA certificate.
#[derive(Clone, Debug)]
pub struct Coord {
    pub url: String,
    pub ca_pem: String,
}

impl Coord {
    /// The coordinator of `h` (which must run with TLS, the default).
    pub fn of(h: &hearth_coordinator::CoordinatorHandle) -> Coord {
        Coord {
            url: h.endpoint(),
            ca_pem: h.ca_pem().expect("a TLS coordinator").into(),
        }
    }

    /// Writes the CA certificate to `path`, as a user copies the coordinator's `pki/ca.pem`
    /// to a device for `coordinator_ca_file`; returns `path`.
    pub fn write_ca(&self, path: &std::path::Path) -> PathBuf {
        std::fs::write(path, &self.ca_pem).unwrap();
        path.to_path_buf()
    }

    /// A channel trusting the CA, without client certificate (for admin calls).
    pub async fn channel(&self) -> tonic::transport::Channel {
        hearth_coordinator::client::connect(&self.url, Some(&self.ca_pem), None)
            .await
            .unwrap()
    }
}
