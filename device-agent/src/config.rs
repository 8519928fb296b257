//! Agent configuration: a TOML file (serde, every field defaulted) plus `validate()`.

use std::path::{Path, PathBuf};

use hearth_model::TaskSpec;
use hearth_proto::mqtt::valid_name;
use serde::{Deserialize, Serialize};

use crate::distill::DistillConfig;
use crate::samples::StoreConfig;
use crate::source::SourceConfig;
use crate::Error;

/// Which non-IID share of the TRAIN split this device owns (its local data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Partition {
    /// This device's share, `0..count`.
    pub index: usize,
    /// Number of shares the split is cut into.
    pub count: usize,
    /// Dirichlet concentration of the label skew (small = more skewed).
    pub alpha: f32,
    /// Seed of the partition (the same on every device of one deployment).
    pub seed: u64,
}

impl Default for Partition {
    fn default() -> Self {
        Partition {
            index: 0,
            count: 1,
            alpha: 0.5,
            seed: 42,
        }
    }
}

/// Configuration of one device agent.
/// Its `Debug` output redacts the enrollment token and the broker URL's password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Device name: one MQTT topic level (`[A-Za-z0-9_-]`, ≤ 64 chars).
    pub device: String,
    /// Broker URL, `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (TLS, with
    /// `mqtt_ca_file`); the rules are [`hearth_edge::url`]'s.
    pub mqtt: String,
    /// PEM file of the CA trusted for an `mqtts://` broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// File holding the MQTT password of the URL's user (what `hearth-hub provision-device`
    /// issued); the URL then names the user only: `mqtt://<device>@hub:1883`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt_password_file: Option<PathBuf>,
    /// Coordinator URL: `https://host:port` (TLS, with `coordinator_ca_file`), or
    /// `http://host:port` for a coordinator run with `insecure = true`; absent or empty =
    /// inference only.
    pub coordinator: Option<String>,
    /// PEM file of the coordinator's CA (its `pki/ca.pem`), trusted for an `https://`
    /// coordinator; needed until enrolment stores the CA in the state directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_ca_file: Option<PathBuf>,
    /// One-time enrollment token (only needed until credentials are stored).
    pub enrollment_token: Option<String>,
    /// The coordinator's model-signing public key (64 hex characters, the content of its
    /// `<signing key>.pub`), pinned out of band. When set it wins over the key the coordinator
    /// gave at enrolment; either way the agent runs only models signed with the pinned key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_signing_key: Option<String>,
    /// Task the device senses: a task file (`path/to/task.toml`) or the name of a set in
    /// `data_dir` (`<data_dir>/<name>/task.toml`: `plaid`, `faces`, `digits`, `gunpoint`, …).
    pub task: String,
    /// Federated model name; defaults to the task name.
    pub model: Option<String>,
    /// Root of the vendored data sets (`<data_dir>/<task>/task.toml`, ...).
    pub data_dir: PathBuf,
    /// The device's own share of the train split.
    pub partition: Partition,
    /// Samples per second replayed as if sensed; 0 = as fast as possible.
    pub replay_rate_hz: f64,
    /// Stop replaying after this many samples (absent = forever).
    pub replay_limit: Option<u64>,
    /// Event name in `hearth/<device>/event/<name>`; defaults per task.
    pub event_name: Option<String>,
    /// Only verdicts with at least this score are published.
    pub min_event_score: f32,
    /// Persisted state: credentials, current model, error-feedback residual.
    pub state_dir: PathBuf,
    /// ONNX model to start from when the state directory holds none.
    pub initial_model: Option<PathBuf>,
    /// Epochs of on-device training used to bootstrap a model when neither the
    /// state directory nor `initial_model` provides one.
    pub bootstrap_epochs: u32,
    /// Where samples come from: `replay` (the default), `mqtt` or `command` ([`SourceConfig`]).
    pub source: SourceConfig,
    /// The on-device sample store behind feedback (`[store]`: bounds, on/off).
    pub store: StoreConfig,
    /// Camera source kind: with a `[camera]` table the agent runs this camera (ffmpeg
    /// frames, BlazeFace, tracker; `crate::camera`) instead of replaying its data set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera: Option<hearth_camera::CameraConfig>,
    /// Idle distillation (`[distill]`): when the agent is idle, a larger teacher trained on
    /// the labelled samples pseudo-labels the stored unlabelled ones and the model in use is
    /// distilled on them (off by default).
    pub distill: DistillConfig,
    /// Metrics endpoint (`GET /metrics`, Prometheus text; `/healthz`), e.g.
    /// `"127.0.0.1:9466"` (the coordinator uses 9464, the hub 9465); absent = off. Bind
    /// loopback unless a scraper elsewhere needs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("device", &self.device)
            .field("mqtt", &hearth_edge::url::redact(&self.mqtt))
            .field("mqtt_ca_file", &self.mqtt_ca_file)
            .field("coordinator", &self.coordinator)
            .field(
                "enrollment_token",
                &self.enrollment_token.as_ref().map(|_| "<redacted>"),
            )
            .field("task", &self.task)
            .field("model", &self.model)
            .field("data_dir", &self.data_dir)
            .field("partition", &self.partition)
            .field("replay_rate_hz", &self.replay_rate_hz)
            .field("replay_limit", &self.replay_limit)
            .field("event_name", &self.event_name)
            .field("min_event_score", &self.min_event_score)
            .field("state_dir", &self.state_dir)
            .field("initial_model", &self.initial_model)
            .field("bootstrap_epochs", &self.bootstrap_epochs)
            .field("source", &self.source)
            .field("store", &self.store)
            .field("camera", &self.camera)
            .field("distill", &self.distill)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device: "agent".into(),
            mqtt: "mqtt://127.0.0.1:1883".into(),
            mqtt_ca_file: None,
            mqtt_password_file: None,
            coordinator: None,
            coordinator_ca_file: None,
            enrollment_token: None,
            model_signing_key: None,
            task: "faces".into(),
            model: None,
            data_dir: PathBuf::from("data"),
            partition: Partition::default(),
            replay_rate_hz: 1.0,
            replay_limit: None,
            event_name: None,
            min_event_score: 0.5,
            state_dir: PathBuf::from("state"),
            initial_model: None,
            bootstrap_epochs: 10,
            source: SourceConfig::Replay,
            store: StoreConfig::default(),
            camera: None,
            distill: DistillConfig::default(),
            metrics_listen: None,
        }
    }
}

impl Config {
    /// Parses a TOML document (unknown fields are errors).
    pub fn from_toml_str(s: &str) -> Result<Config, Error> {
        toml::from_str(s).map_err(|e| Error::Config(e.to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_toml_str(&s).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The default configuration as TOML, with the optional fields shown as comments.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).expect("default config serialises");
        // Optional keys go above the tables so that uncommenting them keeps them top-level.
        format!(
            "# Hearth device agent configuration (defaults).\n\
             # Optional:\n\
             # coordinator = \"https://127.0.0.1:50051\"  # enables federated learning\n\
             # coordinator_ca_file = \"/etc/hearth/coordinator-ca.pem\"  # the coordinator's pki/ca.pem\n\
             # mqtt_ca_file = \"/etc/hearth/ca.pem\"     # CA of the broker, for mqtt = \"mqtts://…\"\n\
             # mqtt_password_file = \"/etc/hearth/mqtt.password\"  # with mqtt = \"mqtt://<device>@hub\"\n\
             # enrollment_token = \"...\"                  # one-time, until credentials are stored\n\
             # model_signing_key = \"<64 hex>\"           # pin the coordinator's key (else: from enrolment)\n\
             # model = \"faces\"                           # defaults to the task name\n\
             # replay_limit = 1000\n\
             # event_name = \"detection\"                  # defaults to the task file's `event`\n\
             # initial_model = \"models/faces.onnx\"\n\
             # metrics_listen = \"127.0.0.1:9466\"        # GET /metrics (Prometheus text), /healthz\n\n{body}\n\
             # Camera source kind: run a camera instead of replaying the data set (every key of\n\
             # [camera] has a default: docs/cameras.md).\n\
             # [camera]\n\
             # fps = 5\n\
             # [camera.source]\n\
             # kind = \"mjpeg\"   # rtsp (url, listen) | mjpeg (url) | v4l2 (device) | folder (path, glob, repeat) | file (path, repeat)\n\
             # url = \"http://192.168.1.20/stream.mjpg\"\n"
        )
    }

    /// The task file ([`TaskSpec::resolve`]: `task` as a path, or `<data_dir>/<task>/task.toml`).
    pub fn task_spec(&self) -> Result<TaskSpec, Error> {
        TaskSpec::resolve(&self.task, &self.data_dir)
            .map_err(|e| Error::Config(format!("task: {e}")))
    }

    /// Federated model name (defaults to the task file's name).
    pub fn model_name(&self) -> String {
        self.model.clone().unwrap_or_else(|| {
            self.task_spec()
                .map_or_else(|_| self.task.clone(), |s| s.name)
        })
    }

    /// Event name (defaults to the task file's `event`).
    pub fn event_name(&self) -> String {
        self.event_name.clone().unwrap_or_else(|| {
            self.task_spec()
                .map_or_else(|_| self.task.clone(), |s| s.event)
        })
    }

    /// Coordinator URL, if federation is enabled.
    pub fn coordinator_url(&self) -> Option<&str> {
        self.coordinator
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if !valid_name(&self.device) {
            return bad(format!(
                "device `{}`: use 1-64 characters of [A-Za-z0-9_-]",
                self.device
            ));
        }
        hearth_edge::MqttUrl::parse(&self.mqtt)
            .and_then(|u| {
                hearth_edge::ClientSettings::new(u, "check")
                    .ca_file(self.mqtt_ca_file.clone())
                    .password_file(self.mqtt_password_file.clone())
                    .check()
            })
            .map_err(|e| Error::Config(format!("mqtt: {e}")))?;
        if let Some(url) = self.coordinator_url() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(format!("coordinator `{url}`: expected https://host:port"));
            }
            if let Some(p) = &self.coordinator_ca_file {
                if !p.is_file() {
                    return bad(format!(
                        "coordinator_ca_file {} does not exist (copy the coordinator's pki/ca.pem)",
                        p.display()
                    ));
                }
            }
            tonic::transport::Endpoint::from_shared(url.to_string())
                .map_err(|e| Error::Config(format!("coordinator `{url}`: {e}")))?;
        }
        let task = self.task_spec()?;
        self.source
            .validate(task.input.channels(), task.input.length())
            .map_err(Error::Config)?;
        self.store.validate().map_err(Error::Config)?;
        if let crate::source::SourceConfig::Mqtt(m) = &self.source {
            if let Some(u) = &m.url {
                hearth_edge::MqttUrl::parse(u)
                    .and_then(|u| {
                        hearth_edge::ClientSettings::new(u, "check")
                            .ca_file(m.ca_file.clone())
                            .password_file(m.password_file.clone())
                            .check()
                    })
                    .map_err(|e| Error::Config(format!("source.url: {e}")))?;
            }
        }
        if let Some(k) = &self.model_signing_key {
            hearth_proto::signing::ModelVerifier::from_hex(k)
                .map_err(|e| Error::Config(format!("model_signing_key: {e}")))?;
        }
        if let Some(t) = &self.enrollment_token {
            if t.trim().is_empty() {
                return bad("enrollment_token is empty".into());
            }
        }
        if !valid_name(&self.model_name()) {
            return bad(format!("model `{}`: use [A-Za-z0-9_-]", self.model_name()));
        }
        if !valid_name(&self.event_name()) {
            return bad(format!(
                "event_name `{}`: use [A-Za-z0-9_-]",
                self.event_name()
            ));
        }
        let p = &self.partition;
        if p.count == 0 || p.index >= p.count {
            return bad(format!(
                "partition: index {} must be < count {} (count ≥ 1)",
                p.index, p.count
            ));
        }
        if !(p.alpha.is_finite() && p.alpha > 0.0) {
            return bad(format!("partition.alpha {} must be > 0", p.alpha));
        }
        if !(self.replay_rate_hz.is_finite() && self.replay_rate_hz >= 0.0) {
            return bad(format!(
                "replay_rate_hz {} must be ≥ 0 (0 = as fast as possible)",
                self.replay_rate_hz
            ));
        }
        if !(0.0..=1.0).contains(&self.min_event_score) {
            return bad(format!(
                "min_event_score {} must be in [0, 1]",
                self.min_event_score
            ));
        }
        if self.state_dir.as_os_str().is_empty() || self.data_dir.as_os_str().is_empty() {
            return bad("data_dir and state_dir must not be empty".into());
        }
        if let Some(c) = &self.camera {
            c.validate().map_err(|e| Error::Config(e.to_string()))?;
        }
        self.distill.validate().map_err(Error::Config)?;
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>().map_err(|e| {
                Error::Config(format!("metrics_listen `{m}`: expected host:port ({e})"))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config {
            mqtt: "mqtt://dev:broker-pass-77@127.0.0.1:1883".into(),
            enrollment_token: Some("enrol-secret-42".into()),
            ..Config::default()
        };
        let text = format!("{c:?} {c:#?}");
        assert!(!text.contains("broker-pass-77"), "{text}");
        assert!(!text.contains("enrol-secret-42"), "{text}");
        assert!(
            text.contains("<redacted>") && text.contains("127.0.0.1:1883"),
            "{text}"
        );
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let back = Config::from_toml_str(&Config::default_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.model_name(), "faces");
        assert_eq!(c.event_name(), "detection");
        assert_eq!(c.coordinator_url(), None);
    }

    #[test]
    fn parses_a_full_file() {
        let c = Config::from_toml_str(
            r#"
            device = "kitchen-plug"
            mqtt = "mqtt://10.0.0.2:1884"
            coordinator = "http://10.0.0.3:50051"
            enrollment_token = "tok"
            task = "plaid"
            replay_rate_hz = 0
            replay_limit = 50
            min_event_score = 0.7
            partition = { index = 2, count = 4, alpha = 0.3, seed = 7 }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.task, "plaid");
        assert_eq!(c.event_name(), "appliance");
        assert_eq!(c.model_name(), "plaid");
        assert_eq!(c.partition.count, 4);
        assert_eq!(c.coordinator_url(), Some("http://10.0.0.3:50051"));
    }

    #[test]
    fn parses_live_sources_and_store_bounds() {
        let c = Config::from_toml_str(
            r#"
            task = "plaid"
            [source]
            kind = "mqtt"
            convention = "tasmota"
            device = "washer"
            field = "ENERGY.Current"
            windowing = { window = 256, hop = 64, rate_hz = 2.0 }
            [store]
            max_samples = 100
            max_mb = 1.5
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let SourceConfig::Mqtt(m) = &c.source else {
            panic!("{:?}", c.source)
        };
        assert_eq!(m.topic().unwrap(), "tele/washer/SENSOR");
        assert_eq!(m.field(), "ENERGY.Current");
        assert_eq!(c.store.max_samples, 100);
        let back = Config::from_toml_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let cmd = Config::from_toml_str(
            "task = \"basicmotions\"\n[source]\nkind = \"command\"\nprogram = \"/usr/bin/imu\"\n",
        )
        .unwrap();
        let data = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data"));
        let cmd = Config {
            data_dir: data.clone(),
            ..cmd
        };
        cmd.validate().unwrap();
        // Bad sources and bounds are configuration errors naming the field.
        for (text, field) in [
            // PLAID has no fixed length: the window must be given.
            ("task = \"plaid\"\n[source]\nkind = \"mqtt\"\ndevice = \"p\"\n", "window"),
            // GunPoint takes 150 samples.
            ("task = \"gunpoint\"\n[source]\nkind = \"command\"\nprogram = \"x\"\nwindowing = { window = 100 }\n", "window"),
            ("task = \"gunpoint\"\n[source]\nkind = \"mqtt\"\ntopic = \"a/#\"\n", "topic"),
            ("task = \"gunpoint\"\n[source]\nkind = \"mqtt\"\n", "device"),
            ("task = \"basicmotions\"\n[source]\nkind = \"mqtt\"\ndevice = \"w\"\n", "channels"),
            ("task = \"gunpoint\"\n[source]\nkind = \"command\"\nprogram = \"x\"\nwindowing = { hop = 0 }\n", "hop"),
            ("task = \"gunpoint\"\n[source]\nkind = \"command\"\nprogram = \"x\"\nwindowing = { rate_hz = -1.0 }\n", "rate_hz"),
            ("task = \"gunpoint\"\n[source]\nkind = \"command\"\nprogram = \" \"\n", "program"),
            ("task = \"gunpoint\"\n[store]\nmax_samples = 0\n", "max_samples"),
            ("task = \"gunpoint\"\n[store]\nmax_mb = 0.0\n", "max_mb"),
        ] {
            let c = Config {
                data_dir: data.clone(),
                ..Config::from_toml_str(text).unwrap()
            };
            match c.validate() {
                Err(Error::Config(e)) => assert!(e.contains(field), "{field}: {e}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(Config::from_toml_str("[source]\nkind = \"camera\"\n").is_err());
    }

    #[test]
    fn camera_source_kind() {
        let c = Config::from_toml_str(
            r#"
            device = "door-cam"
            [camera]
            fps = 5
            [camera.source]
            kind = "mjpeg"
            url = "http://127.0.0.1:8081/stream.mjpg"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let cam = c.camera.as_ref().unwrap();
        assert_eq!(cam.source.kind(), "mjpeg");
        assert_eq!(
            Config::from_toml_str(&toml::to_string(&c).unwrap()).unwrap(),
            c
        );
        let mut bad = c.clone();
        bad.camera.as_mut().unwrap().fps = 0.0;
        assert!(matches!(bad.validate(), Err(Error::Config(e)) if e.contains("camera.fps")));
        assert!(Config::from_toml_str("[camera.source]\nkind = \"webrtc\"\n").is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::from_toml_str("devise = \"x\"").is_err());
        let audio = Config::from_toml_str("task = \"audio\"").unwrap();
        assert!(matches!(audio.validate(), Err(Error::Config(e)) if e.contains("audio/task.toml")));
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|c| c.device = "a/b".into()),
            Box::new(|c| c.mqtt = "http://x:1".into()),
            Box::new(|c| c.mqtt = "mqtts://x".into()),
            Box::new(|c| c.mqtt_ca_file = Some("/nonexistent/ca.pem".into())),
            Box::new(|c| c.mqtt_password_file = Some("/etc/hearth/mqtt.password".into())),
            Box::new(|c| c.coordinator = Some("ftp://x".into())),
            Box::new(|c| c.partition.index = 3),
            Box::new(|c| c.partition.alpha = 0.0),
            Box::new(|c| c.replay_rate_hz = -1.0),
            Box::new(|c| c.min_event_score = 1.5),
            Box::new(|c| c.event_name = Some("a b".into())),
            Box::new(|c| c.model = Some("".into())),
            Box::new(|c| c.model_signing_key = Some("12ab".into())),
            Box::new(|c| c.model_signing_key = Some("zz".repeat(32))),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut c = Config::default();
            f(&mut c);
            assert!(
                matches!(c.validate(), Err(Error::Config(_))),
                "case {i} accepted"
            );
        }
        let c = Config {
            coordinator: Some("  ".into()),
            ..Config::default()
        };
        assert_eq!(c.coordinator_url(), None);
    }
}
