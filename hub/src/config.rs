//! Hub configuration: a TOML file read with serde, every field with a built-in default.
//!
//! ```toml
//! client_id = "hearth-hub"
//! actuator_base = "zigbee2mqtt"
//! rules = "/etc/hearth/rules.toml"          # optional
//! metrics_listen = "127.0.0.1:9464"         # optional
//! coordinator = "https://127.0.0.1:50051"   # optional
//! coordinator_ca_file = "/var/lib/hearth/pki/ca.pem"  # the coordinator's CA, for https://
//! admin_token = "..."                       # needed with `coordinator`
//! follow_models = []                        # models announced on MQTT (empty = all)
//!
//! [delivery]                                # commands: see `crate::delivery`
//! persistent_session = true                 # clean_session = false for the hub's clients
//! hold_offline = true                       # hold commands while their actuator is offline
//! max_held_per_actuator = 100
//! hold_expiry_secs = 600
//! command_ids = true                        # "hearth_id" in every command
//! state_file = "/var/lib/hearth/hub-outbox.jsonl"   # optional; in memory when absent
//!
//! [rules_engine]                            # see `crate::rules::engine`
//! reload_secs = 2                           # check the rules file this often; 0 = SIGHUP only
//! history = "/var/lib/hearth/rules-history" # sled directory; temporary when absent
//! history_max = 10000                       # firings kept
//! history_max_per_rule = 1000               # firings kept per rule (a busy rule keeps its newest)
//!
//! state_dir = "/var/lib/hearth/hub"        # optional: the device registry (sled) lives here
//!
//! [home_assistant]                          # MQTT discovery: see `crate::discovery`
//! enabled = true
//! discovery_prefix = "homeassistant"        # `<prefix>/<component>/hearth/<id>/config`, `<prefix>/status`
//! hub_entities = true                       # the hub's own sensors and refresh buttons
//! stats_interval_secs = 10                  # how often the hub's sensors are published
//!
//! [zigbee2mqtt]                             # see `crate::zigbee`
//! enabled = true                            # follow `<actuator_base>/bridge/*` and device topics
//!
//! [mqtt_auth]                               # see `crate::auth`
//! dir = "hearth-credentials"                # credential store: passwd, acl, keys (created 0750)
//! allow_anonymous = false                   # embedded broker: clients must log in
//! refresh = "signed"                        # MQTT refresh requests: "signed", "broker_acl", "off"
//!
//! [broker]                                  # embedded broker (the default) ...
//! listen = "127.0.0.1:1883"                 # port 0 = pick a free port
//! queue_kib = 1024                          # in-memory queue per subscription (embedded only)
//! # url = "mqtts://mosquitto.lan"           # ... or an external broker instead
//! # ca_file = "/etc/hearth/ca.pem"          # CA trusted for mqtts:// (required with it)
//! # username = "hearth-hub"                 # credentials: here or in the URL, not both
//! # password = "..."
//! # password_file = "/etc/hearth/hub.password"   # instead of `password`
//! ```
//!
//! Broker URLs follow [`hearth_edge::url`] (the same rules as the agent's). Credentials come
//! either from the URL's `user:password@` or from `username`/`password`; giving both is a
//! configuration error, so no silent precedence applies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use hearth_edge::{ClientSettings, MqttUrl};

use crate::delivery::DeliveryConfig;
use crate::discovery::HomeAssistantConfig;
use crate::error::Error;
use crate::rules::engine::RulesEngineConfig;
use crate::zigbee::ZigbeeConfig;

/// Default embedded broker address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";
/// Default Zigbee2MQTT base topic for actuator commands.
pub const DEFAULT_ACTUATOR_BASE: &str = "zigbee2mqtt";
/// Default MQTT client id prefix of the hub.
pub const DEFAULT_CLIENT_ID: &str = "hearth-hub";
/// Connection limit of the embedded broker: a home has a handful of devices.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Largest MQTT payload the embedded broker accepts (events themselves are capped far lower).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Default in-memory queue of the embedded broker per subscription filter, KiB (see
/// [`hearth_edge::broker::BrokerSettings::with_queue_kib`]).
pub const DEFAULT_QUEUE_KIB: usize = hearth_edge::broker::DEFAULT_QUEUE_KIB;

/// The hub's configuration. `Debug` redacts the admin token and broker passwords.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// MQTT client id prefix; the hub opens `<client_id>-sub` and `<client_id>-pub`.
    pub client_id: String,
    /// Base topic of actuators: commands go to `<actuator_base>/<name>/set`.
    pub actuator_base: String,
    /// Rules file (TOML); no rules when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<PathBuf>,
    /// Address of the Prometheus text endpoint (`GET /metrics`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Coordinator gRPC URL (`https://host:port`, or `http://` for an insecure one); refresh
    /// requests and model announcements need it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// The coordinator's CA certificate (its `pki/ca.pem`), for an `https://` coordinator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_ca_file: Option<PathBuf>,
    /// Admin bearer token for the coordinator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Models whose publications are announced on MQTT (empty = all models).
    pub follow_models: Vec<String>,
    /// Seconds to wait for the broker connection at start-up.
    pub connect_timeout_secs: u64,
    /// State directory: the device registry (sled, `<state_dir>/registry`) persists here;
    /// in memory only when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Command delivery: sessions, holding for offline actuators, the outbox file.
    pub delivery: DeliveryConfig,
    /// The rules engine: reload interval, firing history.
    pub rules_engine: RulesEngineConfig,
    /// Home Assistant MQTT discovery.
    pub home_assistant: HomeAssistantConfig,
    /// Following a Zigbee2MQTT bridge on `actuator_base`.
    pub zigbee2mqtt: ZigbeeConfig,
    /// MQTT credentials: the store, the embedded broker's login rule, refresh authorisation.
    pub mqtt_auth: MqttAuthConfig,
    /// Federation roles of the hub (`[federation.aggregate]`: the home's aggregator).
    #[serde(skip_serializing_if = "FederationConfig::is_off")]
    pub federation: FederationConfig,
    /// The MQTT broker: embedded (default) or external.
    pub broker: BrokerConfig,
}

/// `[federation]`: what the hub does in federated learning besides refreshes and
/// announcements.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// The hub as its home's aggregator (off while `models` is empty).
    pub aggregate: AggregateConfig,
}

impl FederationConfig {
    fn is_off(&self) -> bool {
        !self.aggregate.enabled()
    }
}

/// `[federation.aggregate]`: the hub runs a home aggregator — the coordinator's own gRPC
/// service in home-aggregator mode ([`hearth_coordinator::upstream`]) — for `models`. The
/// home's agents enrol with it and upload to it (their `coordinator` is `listen`, their
/// `coordinator_ca_file` its `<state_dir>/pki/ca.pem`); it folds their updates with the
/// coordinator's validation, bounds and caps, and sends one update per round upstream with
/// the home's total sample count, under its own identity there. `Debug` redacts tokens.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregateConfig {
    /// Models aggregated here (empty = no aggregator).
    pub models: Vec<String>,
    /// gRPC address of the aggregator (TLS with its own CA) for the home's agents.
    pub listen: SocketAddr,
    /// The upstream coordinator: `https://host:port` (`http://` only for an insecure one).
    pub upstream: String,
    /// The upstream coordinator's CA certificate (its `pki/ca.pem`), for `https://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca_file: Option<PathBuf>,
    /// One-time enrollment token of the upstream coordinator (only until the hub's upstream
    /// identity is stored in `state_dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// The upstream's model-signing key (64 hex), pinned out of band; else from enrolment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_signing_key: Option<String>,
    /// The home's device name at the upstream coordinator.
    pub device_name: String,
    /// Where the aggregator keeps its database, CA (`pki/`) and upstream identity; default
    /// `<state_dir>/aggregator`, or `hearth-aggregator` without a `state_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Bearer token of the aggregator's Admin API (`hearth-coordinator enroll-token
    /// --coordinator https://<listen>` makes enrolment tokens for the home's agents); at
    /// least 16 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Enrolment tokens for the home's agents, seeded at start (one enrolment each).
    pub enrollment_tokens: Vec<String>,
    /// Names of the aggregator's server certificate (the host agents connect to).
    pub tls_names: Vec<String>,
    /// Fewest local updates for a local round to be sent upstream at its deadline (at
    /// least 2: one device's update is never sent as the home's).
    pub min_clients: u32,
    /// Local updates that close the local round at once.
    pub max_clients: u32,
    /// The local round closes this many seconds before the upstream deadline.
    pub upload_margin_secs: u32,
    /// Largest L2 norm of an agent's update (refused above), as the coordinator's.
    pub max_update_norm: f32,
    /// Cap on the sample count an agent reports, as the coordinator's.
    pub max_client_samples: u64,
    /// Combination, bounds and caps of the local folding (the coordinator's
    /// `[aggregation]`; its server optimizer keys are not used here: the server step is
    /// upstream's).
    pub aggregation: hearth_coordinator::Aggregation,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        let c = hearth_coordinator::Config::default();
        AggregateConfig {
            models: Vec::new(),
            listen: "127.0.0.1:50052".parse().expect("valid default address"),
            upstream: String::new(),
            upstream_ca_file: None,
            enrollment_token: None,
            upstream_signing_key: None,
            device_name: "hearth-home".into(),
            state_dir: None,
            admin_token: None,
            enrollment_tokens: Vec::new(),
            tls_names: c.tls_names,
            min_clients: 2,
            max_clients: 10,
            upload_margin_secs: 10,
            max_update_norm: c.max_update_norm,
            max_client_samples: c.max_client_samples,
            aggregation: hearth_coordinator::Aggregation::default(),
        }
    }
}

impl std::fmt::Debug for AggregateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("AggregateConfig")
            .field("models", &self.models)
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("upstream_ca_file", &self.upstream_ca_file)
            .field("enrollment_token", &redact(&self.enrollment_token))
            .field("device_name", &self.device_name)
            .field("state_dir", &self.state_dir)
            .field("admin_token", &redact(&self.admin_token))
            .field(
                "enrollment_tokens",
                &format_args!("[{} redacted]", self.enrollment_tokens.len()),
            )
            .field("min_clients", &self.min_clients)
            .field("max_clients", &self.max_clients)
            .finish_non_exhaustive()
    }
}

impl AggregateConfig {
    /// Whether the hub runs a home aggregator.
    pub fn enabled(&self) -> bool {
        !self.models.is_empty()
    }

    /// The aggregator's directory (see `state_dir`).
    pub fn dir(&self, hub_state_dir: Option<&Path>) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| match hub_state_dir {
                Some(d) => d.join("aggregator"),
                None => PathBuf::from("hearth-aggregator"),
            })
    }

    /// The coordinator configuration the aggregator runs with: the coordinator's defaults,
    /// these keys, and `[upstream]`.
    pub fn coordinator_config(&self, hub_state_dir: Option<&Path>) -> hearth_coordinator::Config {
        let dir = self.dir(hub_state_dir);
        hearth_coordinator::Config {
            listen: self.listen.to_string(),
            db_path: dir.join("db"),
            admin_token: self.admin_token.clone().unwrap_or_default(),
            enrollment_tokens: self.enrollment_tokens.clone(),
            tls_names: self.tls_names.clone(),
            max_update_norm: self.max_update_norm,
            max_client_samples: self.max_client_samples,
            round: hearth_coordinator::RoundDefaults {
                min_clients: self.min_clients,
                max_clients: self.max_clients,
                ..hearth_coordinator::RoundDefaults::default()
            },
            aggregation: self.aggregation.clone(),
            models: self
                .models
                .iter()
                .map(|m| hearth_coordinator::ModelConfig {
                    name: m.clone(),
                    task: String::new(),
                    init: None,
                    eval: false,
                    seed: 1,
                })
                .collect(),
            upstream: Some(hearth_coordinator::UpstreamConfig {
                url: self.upstream.clone(),
                ca_file: self.upstream_ca_file.clone(),
                enrollment_token: self.enrollment_token.clone(),
                device_name: self.device_name.clone(),
                credentials_file: Some(dir.join("upstream.json")),
                model_signing_key: self.upstream_signing_key.clone(),
                upload_margin_secs: self.upload_margin_secs,
            }),
            ..hearth_coordinator::Config::default()
        }
    }

    /// Checks the section (when enabled); messages name `federation.aggregate.<key>`.
    fn validate(&self, hub_state_dir: Option<&Path>) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let key = "federation.aggregate";
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.models {
            if !hearth_proto::mqtt::valid_name(m) || !seen.insert(m) {
                return Err(format!(
                    "{key}.models entry `{m}` is not a valid model name or is listed twice"
                ));
            }
        }
        if !(self.upstream.starts_with("https://") || self.upstream.starts_with("http://")) {
            return Err(format!(
                "{key}.upstream must be the upstream coordinator's https:// URL, got {:?}",
                self.upstream
            ));
        }
        if self.upstream.starts_with("https://") && self.upstream_ca_file.is_none() {
            return Err(format!(
                "{key}.upstream uses TLS: set {key}.upstream_ca_file to the upstream \
                 coordinator's pki/ca.pem"
            ));
        }
        if let Some(p) = &self.upstream_ca_file {
            if !p.is_file() {
                return Err(format!(
                    "{key}.upstream_ca_file {} does not exist (copy the upstream coordinator's \
                     pki/ca.pem)",
                    p.display()
                ));
            }
        }
        if self.enrollment_token.as_deref().is_some_and(str::is_empty) {
            return Err(format!("{key}.enrollment_token is empty"));
        }
        if self.admin_token.as_deref().is_none_or(|t| t.len() < 16) {
            return Err(format!(
                "{key}.admin_token must be set (at least 16 characters): it guards the \
                 aggregator's Admin API, which makes enrolment tokens for the home's agents"
            ));
        }
        if self.min_clients < 2 || self.max_clients < self.min_clients {
            return Err(format!(
                "{key}: need 2 <= min_clients <= max_clients (got {} and {}): a round of one \
                 update would send that device's update upstream",
                self.min_clients, self.max_clients
            ));
        }
        self.coordinator_config(hub_state_dir)
            .validate()
            .map_err(|e| format!("{key}: {e}"))
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("client_id", &self.client_id)
            .field("actuator_base", &self.actuator_base)
            .field("rules", &self.rules)
            .field("metrics_listen", &self.metrics_listen)
            .field("coordinator", &self.coordinator)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("follow_models", &self.follow_models)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("state_dir", &self.state_dir)
            .field("delivery", &self.delivery)
            .field("rules_engine", &self.rules_engine)
            .field("home_assistant", &self.home_assistant)
            .field("zigbee2mqtt", &self.zigbee2mqtt)
            .field("broker", &self.broker)
            .field("mqtt_auth", &self.mqtt_auth)
            .field("federation", &self.federation)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerConfig::Embedded {
                listen,
                max_connections,
                max_payload_bytes,
                queue_kib,
            } => f
                .debug_struct("Embedded")
                .field("listen", listen)
                .field("max_connections", max_connections)
                .field("max_payload_bytes", max_payload_bytes)
                .field("queue_kib", queue_kib)
                .finish(),
            BrokerConfig::External {
                url,
                username,
                password,
                password_file,
                ca_file,
            } => f
                .debug_struct("External")
                .field("url", &hearth_edge::url::redact(url))
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .field("password_file", password_file)
                .field("ca_file", ca_file)
                .finish_non_exhaustive(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            client_id: DEFAULT_CLIENT_ID.into(),
            actuator_base: DEFAULT_ACTUATOR_BASE.into(),
            rules: None,
            metrics_listen: None,
            coordinator: None,
            coordinator_ca_file: None,
            admin_token: None,
            follow_models: Vec::new(),
            connect_timeout_secs: 10,
            state_dir: None,
            delivery: DeliveryConfig::default(),
            rules_engine: RulesEngineConfig::default(),
            home_assistant: HomeAssistantConfig::default(),
            zigbee2mqtt: ZigbeeConfig::default(),
            mqtt_auth: MqttAuthConfig::default(),
            federation: FederationConfig::default(),
            broker: BrokerConfig::default(),
        }
    }
}

/// How refresh requests on `hearth/federation/refresh` are authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshAuth {
    /// Only requests signed with the refresh key (`<dir>/refresh.key`, HMAC-SHA256, fresh,
    /// not replayed): holds on any broker, including the embedded one without ACLs.
    Signed,
    /// Any well-formed request: the broker's ACL decides who may publish it (Mosquitto with
    /// `deploy/mosquitto/`'s ACLs; refused with the embedded broker, which has none).
    BrokerAcl,
    /// MQTT refresh requests are ignored (the CLI `hearth-hub refresh` still works).
    Off,
}

/// `[mqtt_auth]`: MQTT credentials (see [`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttAuthConfig {
    /// The credential store: `passwd` (the embedded broker's logins, Mosquitto's
    /// `password_file`), `acl`, the hub's password, the refresh key, issued passwords.
    pub dir: PathBuf,
    /// Let clients connect to the embedded broker without credentials. Never in a home: any
    /// process that reaches the port could then publish as any device.
    pub allow_anonymous: bool,
    /// How refresh requests over MQTT are authorised.
    pub refresh: RefreshAuth,
}

/// Default credential store directory (relative to the working directory).
pub const DEFAULT_CREDENTIALS_DIR: &str = "hearth-credentials";

impl Default for MqttAuthConfig {
    fn default() -> Self {
        MqttAuthConfig {
            dir: PathBuf::from(DEFAULT_CREDENTIALS_DIR),
            allow_anonymous: false,
            refresh: RefreshAuth::Signed,
        }
    }
}

/// Where the MQTT broker is. `Debug` redacts passwords.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BrokerToml", into = "BrokerToml")]
pub enum BrokerConfig {
    /// rumqttd inside the hub process (zero setup; see [`crate::broker`] for its limits).
    Embedded {
        /// Listen address; port 0 picks a free port (read it back from `HubHandle::mqtt_addr`).
        listen: SocketAddr,
        /// Connection limit.
        max_connections: usize,
        /// Largest accepted MQTT payload in bytes.
        max_payload_bytes: usize,
        /// Messages the broker keeps in memory per subscription filter, in KiB of topic and
        /// payload: what a subscriber that falls behind can still catch up on (older ones
        /// are dropped). The broker's memory grows with it.
        queue_kib: usize,
    },
    /// An external broker such as Mosquitto.
    External {
        /// `mqtt://[user[:password]@]host[:port]` (or `tcp://`, port 1883 by default) or
        /// `mqtts://…` (TLS, port 8883 by default); see [`hearth_edge::url`].
        url: String,
        /// Optional credentials (Mosquitto password file / ACLs), when not in the URL.
        username: Option<String>,
        /// Password for `username`.
        password: Option<String>,
        /// File holding the password (instead of `password`).
        password_file: Option<PathBuf>,
        /// PEM file of the CA that signed the broker's certificate (required for `mqtts://`).
        ca_file: Option<PathBuf>,
    },
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig::Embedded {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            queue_kib: DEFAULT_QUEUE_KIB,
        }
    }
}

impl BrokerConfig {
    /// An embedded broker on `listen` with the default limits.
    pub fn embedded(listen: SocketAddr) -> Self {
        BrokerConfig::Embedded {
            listen,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            queue_kib: DEFAULT_QUEUE_KIB,
        }
    }

    /// An external broker at `url` without separate credentials or CA file.
    pub fn external(url: impl Into<String>) -> Self {
        BrokerConfig::External {
            url: url.into(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
        }
    }

    /// The parsed URL of an external broker with its credentials combined by the one rule
    /// (URL or fields, not both); `None` for the embedded broker.
    pub fn external_url(&self) -> Result<Option<MqttUrl>, Error> {
        match self {
            BrokerConfig::Embedded { .. } => Ok(None),
            BrokerConfig::External {
                url,
                username,
                password,
                ..
            } => Ok(Some(
                MqttUrl::parse(url)?.with_credentials(username.clone(), password.clone())?,
            )),
        }
    }
}

/// The flat TOML form of [`BrokerConfig`]: `url` set means external.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerToml {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_payload_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_kib: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

impl TryFrom<BrokerToml> for BrokerConfig {
    type Error = String;
    fn try_from(t: BrokerToml) -> Result<Self, String> {
        match t.url {
            Some(url) => {
                if t.listen.is_some()
                    || t.max_connections.is_some()
                    || t.max_payload_bytes.is_some()
                    || t.queue_kib.is_some()
                {
                    return Err("`url` (external broker) cannot be combined with `listen`, \
                                `max_connections`, `max_payload_bytes` or `queue_kib` \
                                (embedded broker)"
                        .into());
                }
                Ok(BrokerConfig::External {
                    url,
                    username: t.username,
                    password: t.password,
                    password_file: t.password_file,
                    ca_file: t.ca_file,
                })
            }
            None => {
                if t.username.is_some()
                    || t.password.is_some()
                    || t.password_file.is_some()
                    || t.ca_file.is_some()
                {
                    return Err(
                        "`username`, `password`, `password_file` and `ca_file` need an \
                                external broker `url`"
                            .into(),
                    );
                }
                Ok(BrokerConfig::Embedded {
                    listen: t
                        .listen
                        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
                    max_connections: t.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                    max_payload_bytes: t.max_payload_bytes.unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
                    queue_kib: t.queue_kib.unwrap_or(DEFAULT_QUEUE_KIB),
                })
            }
        }
    }
}

impl From<BrokerConfig> for BrokerToml {
    fn from(b: BrokerConfig) -> Self {
        match b {
            BrokerConfig::Embedded {
                listen,
                max_connections,
                max_payload_bytes,
                queue_kib,
            } => BrokerToml {
                listen: Some(listen),
                max_connections: Some(max_connections),
                max_payload_bytes: Some(max_payload_bytes),
                queue_kib: Some(queue_kib),
                ..BrokerToml::default()
            },
            BrokerConfig::External {
                url,
                username,
                password,
                password_file,
                ca_file,
            } => BrokerToml {
                url: Some(url),
                username,
                password,
                password_file,
                ca_file,
                ..BrokerToml::default()
            },
        }
    }
}

impl Config {
    /// The coordinator's CA certificate (PEM) from `coordinator_ca_file`, if set.
    pub fn coordinator_ca(&self) -> Result<Option<String>, Error> {
        self.coordinator_ca_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
            })
            .transpose()
    }

    /// Parses a TOML document (missing fields take their defaults).
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Reads and parses a TOML file, then validates it.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The default configuration as TOML (for `--print-default-config`).
    pub fn default_toml() -> String {
        let text = toml::to_string_pretty(&Config::default()).expect("default config serialises");
        let optional = "\
# rules = \"/etc/hearth/rules.toml\"
# metrics_listen = \"127.0.0.1:9464\"
# coordinator = \"https://127.0.0.1:50051\"
# coordinator_ca_file = \"/var/lib/hearth/pki/ca.pem\"
# admin_token = \"change-me\"
# state_dir = \"/var/lib/hearth/hub\"      # device registry kept across restarts (memory only if absent)

";
        let external = "\
# External broker instead of the embedded one (replaces the keys above):
# url = \"mqtts://mosquitto.lan\"        # mqtt://host[:1883] or mqtts://host[:8883]
# ca_file = \"/etc/hearth/ca.pem\"       # CA of the broker's certificate (mqtts:// only)
# username = \"hearth-hub\"              # or user:password@ in the URL, not both
# password = \"change-me\"
# password_file = \"/etc/hearth/hub.password\"  # instead of `password`
";
        let aggregate = "\n\
# The hub as its home's aggregator: the home's agents enrol with and upload to it (their
# `coordinator` = https://<listen>, their CA = <state_dir>/pki/ca.pem), and the upstream
# coordinator receives one update per home and round.
# [federation.aggregate]
# models = [\"digits\"]                    # aggregated here (empty = off)
# listen = \"127.0.0.1:50052\"
# upstream = \"https://coordinator.example:50051\"
# upstream_ca_file = \"/etc/hearth/upstream-ca.pem\"
# enrollment_token = \"...\"               # one-time, at the upstream (until the identity is stored)
# device_name = \"hearth-home\"            # the home's name upstream
# admin_token = \"change-me-16-chars+\"    # the aggregator's Admin API (enroll-token for agents)
# state_dir = \"/var/lib/hearth/aggregator\"
# min_clients = 2                        # >= 2: one device's update is never sent upstream
# max_clients = 10
# upload_margin_secs = 10                # local rounds close this long before the upstream deadline
";
        let state_file = "\
# state_file = \"/var/lib/hearth/hub-outbox.jsonl\"  # outbox kept across restarts (memory only if absent)

";
        let (rest, broker) = text.split_at(text.find("[broker]").unwrap_or(text.len()));
        let (rest, auth) = rest.split_at(rest.find("[mqtt_auth]").unwrap_or(rest.len()));
        let (rest, integrations) =
            rest.split_at(rest.find("[home_assistant]").unwrap_or(rest.len()));
        let (rest, engine) = rest.split_at(rest.find("[rules_engine]").unwrap_or(rest.len()));
        let (top, delivery) = rest.split_at(rest.find("[delivery]").unwrap_or(rest.len()));
        let history = "\
# history = \"/var/lib/hearth/rules-history\"  # firing history kept across restarts (sled; temporary if absent)

";
        let auth_note = "\
# The credential store (created on first start; `hearth-hub provision-device` adds devices,
# `deprovision-device` removes them).
# refresh: \"signed\" (admins sign requests with <dir>/refresh.key), \"broker_acl\"
# (Mosquitto's ACL decides; external broker only) or \"off\".
";
        format!(
            "# Hearth hub configuration (defaults)\n{top}{optional}{}\n{state_file}{}\n{history}{integrations}{auth_note}{auth}{broker}{external}{aggregate}",
            delivery.trim_end(),
            engine.trim_end()
        )
    }

    /// Checks values serde cannot: names, URLs, limits, token presence.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.client_id.is_empty()
            || self.client_id.len() > 48
            || !self
                .client_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "client_id `{}` must be 1-48 characters of [A-Za-z0-9_-]",
                self.client_id
            ));
        }
        if self.actuator_base.is_empty()
            || self.actuator_base.starts_with('/')
            || self.actuator_base.ends_with('/')
            || self.actuator_base.contains(['+', '#'])
            || self.actuator_base.split('/').any(str::is_empty)
        {
            return bad(format!(
                "actuator_base `{}` must be a topic prefix without wildcards or empty levels",
                self.actuator_base
            ));
        }
        match &self.broker {
            BrokerConfig::Embedded {
                max_connections,
                max_payload_bytes,
                queue_kib,
                ..
            } => {
                if !(1..=10_000).contains(max_connections) {
                    return bad(format!(
                        "broker.max_connections {max_connections} must be within 1..=10000"
                    ));
                }
                if !(1024..=16 * 1024 * 1024).contains(max_payload_bytes) {
                    return bad(format!(
                        "broker.max_payload_bytes {max_payload_bytes} must be within 1 KiB..=16 MiB"
                    ));
                }
                if !(16..=1024 * 1024).contains(queue_kib) {
                    return bad(format!(
                        "broker.queue_kib {queue_kib} must be within 16..=1048576"
                    ));
                }
            }
            BrokerConfig::External {
                ca_file,
                password_file,
                ..
            } => {
                let url = self.broker.external_url()?.expect("external broker");
                ClientSettings::new(url, &self.client_id)
                    .ca_file(ca_file.clone())
                    .password_file(password_file.clone())
                    .check()?;
            }
        }
        if self.mqtt_auth.dir.as_os_str().is_empty() {
            return bad("mqtt_auth.dir must not be empty".into());
        }
        if let BrokerConfig::Embedded { .. } = self.broker {
            if self.mqtt_auth.refresh == RefreshAuth::BrokerAcl {
                return bad(
                    "mqtt_auth.refresh = \"broker_acl\" needs an external broker with ACLs \
                            (the embedded broker has none): use \"signed\""
                        .into(),
                );
            }
        }
        if let Some(url) = &self.coordinator {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(format!(
                    "coordinator `{url}` must be an http:// or https:// URL"
                ));
            }
            if self.admin_token.as_deref().is_none_or(str::is_empty) {
                return bad("`coordinator` is set but `admin_token` is missing".into());
            }
            // The file itself is read at start (a missing one is a configuration error there).
            if url.starts_with("https://") && self.coordinator_ca_file.is_none() {
                return bad(format!(
                    "coordinator `{url}` uses TLS: set coordinator_ca_file to its pki/ca.pem"
                ));
            }
        }
        for m in &self.follow_models {
            if !hearth_proto::mqtt::valid_name(m) {
                return bad(format!(
                    "follow_models entry `{m}` is not a valid model name"
                ));
            }
        }
        self.delivery.validate().map_err(Error::Config)?;
        self.rules_engine.validate().map_err(Error::Config)?;
        self.home_assistant.validate().map_err(Error::Config)?;
        if self
            .state_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return bad("state_dir must not be empty".into());
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return bad("connect_timeout_secs must be within 1..=300".into());
        }
        self.federation
            .aggregate
            .validate(self.state_dir.as_deref())
            .map_err(Error::Config)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_secrets() {
        let mut c = Config {
            admin_token: Some("admin-secret-0123456789".into()),
            ..Config::default()
        };
        let embedded = format!("{c:?}");
        assert!(!embedded.contains("admin-secret-0123456789"), "{embedded}");
        c.broker = BrokerConfig::External {
            url: "mqtt://hub:url-pass-55@127.0.0.1:1883".into(),
            username: None,
            password: Some("field-pass-66".into()),
            password_file: None,
            ca_file: None,
        };
        let text = format!("{c:?} {c:#?}");
        for secret in ["admin-secret-0123456789", "url-pass-55", "field-pass-66"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("127.0.0.1:1883"), "{text}");
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default_toml();
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back, Config::default());
        back.validate().unwrap();
        assert!(text.contains("listen = \"127.0.0.1:1883\""), "{text}");
        assert!(
            text.contains("[delivery]\npersistent_session = true"),
            "{text}"
        );
        // Uncommenting the documented keys gives a valid configuration.
        let all = text.replace("# state_file", "state_file");
        let c = Config::from_toml(&all).unwrap();
        assert!(c.delivery.state_file.is_some());
        let c = Config::from_toml("[delivery]\nhold_expiry_secs = 0\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("hold_expiry_secs"));
    }

    #[test]
    fn shipped_deploy_config_is_valid() {
        let c = Config::from_toml(include_str!("../../deploy/config/hub.toml")).unwrap();
        c.validate().unwrap();
        assert!(matches!(c.broker, BrokerConfig::Embedded { .. }));
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn external_broker_from_url() {
        let c = Config::from_toml("[broker]\nurl = \"mqtt://mosquitto.lan:8883\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.broker,
            BrokerConfig::external("mqtt://mosquitto.lan:8883")
        );
        assert!(
            Config::from_toml("[broker]\nurl = \"mqtt://a\"\nlisten = \"127.0.0.1:1\"\n")
                .unwrap_err()
                .to_string()
                .contains("cannot be combined")
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::from_toml("actuator_bsae = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("actuator_bsae"), "{e}");
    }

    #[test]
    fn validation_names_the_problem() {
        let c = Config {
            coordinator: Some("http://127.0.0.1:1".into()),
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin_token"));
        let c = Config {
            actuator_base: "z2m/#".into(),
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("actuator_base"));
        let c = Config {
            broker: BrokerConfig::external("http://x"),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("mqtt://"));
    }

    #[test]
    fn external_broker_urls_follow_the_edge_rules() {
        let ext = |toml: &str| Config::from_toml(&format!("[broker]\n{toml}")).unwrap();
        // Credentials in the URL are accepted (the agent's rule, now the hub's too).
        let c = ext("url = \"mqtt://hub:p%40ss@mosquitto.lan\"\n");
        c.validate().unwrap();
        let u = c.broker.external_url().unwrap().unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.port),
            (Some("hub"), Some("p@ss"), 1883)
        );
        // ... or as fields, but not both.
        let c = ext("url = \"mqtt://h\"\nusername = \"hub\"\npassword = \"pw\"\n");
        c.validate().unwrap();
        let c = ext("url = \"mqtt://a:b@h\"\nusername = \"hub\"\n");
        let e = c.validate().unwrap_err();
        assert!(
            matches!(e, Error::Config(_)) && e.to_string().contains("both"),
            "{e}"
        );
        // mqtts:// needs a CA file; a missing one is a configuration error.
        let e = ext("url = \"mqtts://h\"\n").validate().unwrap_err();
        assert!(
            matches!(e, Error::Config(_)) && e.to_string().contains("CA file"),
            "{e}"
        );
        let e = ext("url = \"mqtts://h\"\nca_file = \"/nonexistent/ca.pem\"\n")
            .validate()
            .unwrap_err();
        assert!(
            matches!(e, Error::Config(_)) && e.to_string().contains("cannot read CA file"),
            "{e}"
        );
        assert!(Config::from_toml("[broker]\nca_file = \"/x\"\n")
            .unwrap_err()
            .to_string()
            .contains("need an external broker"));
    }
}
