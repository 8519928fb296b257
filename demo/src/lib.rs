//! A whole Hearth home in one process, over loopback: the coordinator (gRPC + sled), the hub
//! with its embedded MQTT broker and a rules file, a virtual porch-light actuator, and device
//! agents on non-IID shares of the real data sets. Used by `hearth-demo` and by the
//! end-to-end tests, so both exercise exactly the same wiring.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_agent::actuator::{ActuatorConfig, ActuatorHandle};
use hearth_agent::{AgentHandle, AgentStats, Partition};
use hearth_edge::{ClientSettings, MqttUrl};
use hearth_hub::{BrokerConfig, HubHandle, Role};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::{
    ListVersionsRequest, ModelVersion, RoundState, RoundStatus, RoundStatusRequest,
};
use rumqttc::QoS;
use tokio::net::TcpListener;

pub mod camera;

/// What can go wrong while running the demo home.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the home's state could not be written.
    #[error("{what}: {source}")]
    Io {
        /// What was being written.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A group's task file is missing or invalid.
    #[error("task file: {0}")]
    Task(#[from] hearth_model::TaskError),
    /// The coordinator failed to start or to stop.
    #[error("coordinator: {0}")]
    Coordinator(#[from] hearth_coordinator::Error),
    /// The hub failed to start.
    #[error("hub: {0}")]
    Hub(#[from] hearth_hub::Error),
    /// An agent or the actuator failed to start or to stop.
    #[error("{who}: {source}")]
    Device {
        /// Device name.
        who: String,
        /// The agent's error.
        #[source]
        source: hearth_agent::Error,
    },
    /// The coordinator's admin endpoint could not be reached.
    #[error("cannot reach the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// An admin call to the coordinator failed.
    #[error("coordinator admin call failed: {0}")]
    Admin(Box<tonic::Status>),
    /// The refresh request could not be published over MQTT.
    #[error("MQTT refresh request: {0}")]
    Mqtt(String),
    /// The live camera's clip or its head could not be prepared or measured.
    #[error("live camera: {0}")]
    Camera(String),
    /// A federated round closed without a new version.
    #[error("round {round} of {model} failed: {detail}")]
    RoundFailed {
        /// Model name.
        model: String,
        /// Round id.
        round: u64,
        /// The coordinator's reason.
        detail: String,
    },
    /// Something did not happen within its time limit.
    #[error("{what} within {limit:?}")]
    Timeout {
        /// What was awaited (phrased as what did not happen).
        what: String,
        /// The limit.
        limit: Duration,
    },
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Admin(Box::new(s))
    }
}

fn device_error(who: &str) -> impl FnOnce(hearth_agent::Error) -> Error + '_ {
    move |source| Error::Device {
        who: who.to_string(),
        source,
    }
}

/// Result of the demo library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Name of the actuator the demo rules drive.
pub const PORCH_LIGHT: &str = "porch_light";

/// Name of the rule that lights the porch for the live camera (its head's verdict).
pub const LIVE_CAMERA_RULE: &str = "porch light when the live door camera's head sees a person";

/// The rules file the demo hub loads: a person at the door turns the porch light on; for the
/// live camera, a face track its own head (on the device) says is a person.
pub const DEMO_RULES: &str = r#"# Hearth demo rules
[[rule]]
name = "porch light when someone is at the door"
[rule.when]
device = "door-cam-*"
event = "detection"
class = "person"
min_score = 0.7
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
cooldown_secs = 0

[[rule]]
name = "porch light when the live door camera's head sees a person"
[rule.when]
device = "door-cam-live"
event = "detection"
label = "face"                # the detector's track (Frigate's label)
min_score = 0.6
sub_label = "person"          # the camera's own head on the track's crop (faces-cam)
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
cooldown_secs = 0
"#;

/// One group of agents sharing a task and a federated model.
#[derive(Debug, Clone)]
pub struct AgentGroup {
    /// Device name prefix (`<prefix>-<i>`).
    pub prefix: String,
    /// The task: a task file, or the name of a set in the data directory (`plaid`, `faces`,
    /// `digits`, `gunpoint`, `basicmotions`, …); the federated model is named after the task.
    pub task: String,
    /// Number of agents (each owns one non-IID share of the train split).
    pub count: usize,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct HomeOptions {
    /// Where the data sets live (`data/` of the repository).
    pub data_dir: PathBuf,
    /// Where coordinator and agents keep their state.
    pub state_dir: PathBuf,
    /// Agent groups; one federated model per group.
    pub groups: Vec<AgentGroup>,
    /// Samples per second each agent replays.
    pub replay_rate_hz: f64,
    /// Dirichlet concentration of the label skew between agents.
    pub alpha: f32,
    /// Local epochs per round.
    pub local_epochs: u32,
    /// Client learning rate.
    pub learning_rate: f32,
}

impl HomeOptions {
    /// The demo's home: three smart plugs (PLAID) and three doorbell cameras (faces).
    pub fn demo(data_dir: PathBuf, state_dir: PathBuf) -> HomeOptions {
        HomeOptions {
            data_dir,
            state_dir,
            groups: vec![
                AgentGroup {
                    prefix: "plug".into(),
                    task: "plaid".into(),
                    count: 3,
                },
                AgentGroup {
                    prefix: "door-cam".into(),
                    task: "faces".into(),
                    count: 3,
                },
            ],
            replay_rate_hz: 20.0,
            alpha: 0.5,
            local_epochs: 10,
            learning_rate: 0.01,
        }
    }
}

/// A running home.
pub struct Home {
    /// The coordinator (gRPC endpoint via [`hearth_coordinator::CoordinatorHandle::endpoint`]).
    pub coordinator: hearth_coordinator::CoordinatorHandle,
    /// The hub, with the embedded broker.
    pub hub: HubHandle,
    /// The porch light.
    pub light: ActuatorHandle,
    /// Every agent, in group order: device name, model (task) name, handle.
    pub agents: Vec<(String, String, AgentHandle)>,
    /// Admin token of the coordinator.
    pub admin_token: String,
    models: Vec<String>,
    /// Counters of every agent started, kept when the agents stop (see [`Home::drain_control_path`]).
    agent_stats: Vec<Arc<AgentStats>>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home")
            .field("coordinator", &self.coordinator.endpoint())
            .field("mqtt", &self.hub.mqtt_url())
            .field("agents", &self.agents.len())
            .finish()
    }
}

fn token(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{tag}-{:x}-{nanos:x}", std::process::id())
}

impl Home {
    /// Starts coordinator, hub (embedded broker on a free loopback port), the porch light and
    /// the agents, and waits until every agent runs the coordinator's current model.
    pub async fn start(opts: &HomeOptions) -> Result<Home> {
        std::fs::create_dir_all(&opts.state_dir).map_err(|source| Error::Io {
            what: format!("creating {}", opts.state_dir.display()),
            source,
        })?;
        let admin_token = token("admin");
        let n_agents: usize = opts.groups.iter().map(|g| g.count).sum();
        let enroll: Vec<String> = (0..n_agents)
            .map(|i| token(&format!("enroll{i}")))
            .collect();

        // One federated model per group, named after its task file's task.
        let names = opts
            .groups
            .iter()
            .map(|g| Ok(hearth_model::TaskSpec::resolve(&g.task, &opts.data_dir)?.name))
            .collect::<Result<Vec<String>>>()?;

        // Coordinator.
        let mut cc = hearth_coordinator::Config {
            db_path: opts.state_dir.join("coordinator.db"),
            data_dir: opts.data_dir.clone(),
            admin_token: admin_token.clone(),
            enrollment_tokens: enroll.clone(),
            ..Default::default()
        };
        cc.models = opts
            .groups
            .iter()
            .zip(&names)
            .map(|(g, name)| hearth_coordinator::ModelConfig {
                name: name.clone(),
                task: g.task.clone(),
                init: None,
                eval: true,
                seed: 7,
            })
            .collect();
        let per_round = opts.groups.iter().map(|g| g.count).min().unwrap_or(1) as u32;
        cc.round.min_clients = per_round;
        cc.round.max_clients = per_round;
        cc.round.deadline_secs = 120;
        cc.round.local_epochs = opts.local_epochs;
        cc.round.learning_rate = opts.learning_rate;
        // The demo shows one round improving the model; the sparse default codec (top-10 % up
        // and down) is tuned for ~10 rounds (BENCHMARKS.md, "Codec sweep") and moves a single
        // round far less, so the demo keeps the 8-bit dense updates and downlink it was
        // measured with.
        cc.round.quant_bits = 8;
        cc.round.topk_fraction = 1.0;
        cc.downlink = hearth_coordinator::Downlink {
            bits: 8,
            topk_fraction: 1.0,
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| Error::Io {
                what: "binding the coordinator's port on 127.0.0.1".into(),
                source,
            })?;
        let coordinator = hearth_coordinator::start(cc, listener).await?;
        // TLS with the coordinator's CA (created in <state_dir>/pki): the agents and the hub
        // trust its certificate; agents enrol by CSR and call with their client certificate.
        let ca_file = coordinator
            .coordinator()
            .pki()
            .map(|p| p.ca_path().to_path_buf());

        // Hub with the embedded broker.
        let rules_path = opts.state_dir.join("rules.toml");
        std::fs::write(&rules_path, DEMO_RULES).map_err(|source| Error::Io {
            what: format!("writing {}", rules_path.display()),
            source,
        })?;
        // Its credential store under the state directory: the broker requires logins, and
        // every device below gets its own, provisioned here as `hearth-hub provision-device`
        // would.
        let mut hc = hearth_hub::Config {
            broker: BrokerConfig::embedded(SocketAddr::from(([127, 0, 0, 1], 0))),
            rules: Some(rules_path),
            coordinator: Some(coordinator.endpoint()),
            coordinator_ca_file: ca_file.clone(),
            admin_token: Some(admin_token.clone()),
            ..Default::default()
        };
        hc.mqtt_auth.dir = opts.state_dir.join("mqtt");
        let hub = hearth_hub::start(hc).await?;
        // `mqtt://<name>@host:port` and the file with its password.
        let login = |name: &str, role: Role| -> Result<(String, PathBuf)> {
            let p = hub.provision(name, role)?;
            let mut url =
                MqttUrl::parse(&hub.mqtt_url()).map_err(|e| Error::Mqtt(e.to_string()))?;
            url.username = Some(p.user);
            Ok((url.to_string(), p.password_file))
        };

        let (light_url, light_pw) = login(PORCH_LIGHT, Role::Actuator)?;
        let light = hearth_agent::actuator::start_actuator(ActuatorConfig {
            password_file: Some(light_pw),
            ..ActuatorConfig::new(PORCH_LIGHT, &light_url)
        })
        .await
        .map_err(device_error(PORCH_LIGHT))?;

        let mut agents = Vec::new();
        let mut tokens = enroll.into_iter();
        for (g, name) in opts.groups.iter().zip(&names) {
            for i in 0..g.count {
                let device = format!("{}-{}", g.prefix, i + 1);
                let (mqtt, mqtt_password_file) = login(&device, Role::Device)?;
                let cfg = hearth_agent::Config {
                    device: device.clone(),
                    mqtt,
                    mqtt_password_file: Some(mqtt_password_file),
                    coordinator: Some(coordinator.endpoint()),
                    coordinator_ca_file: ca_file.clone(),
                    enrollment_token: tokens.next(),
                    task: g.task.clone(),
                    data_dir: opts.data_dir.clone(),
                    partition: Partition {
                        index: i,
                        count: g.count,
                        alpha: opts.alpha,
                        seed: 42,
                    },
                    replay_rate_hz: opts.replay_rate_hz,
                    state_dir: opts.state_dir.join(&device),
                    ..Default::default()
                };
                let h = hearth_agent::start(cfg)
                    .await
                    .map_err(device_error(&device))?;
                agents.push((device, name.clone(), h));
            }
        }
        let models = names;
        let agent_stats = agents.iter().map(|(_, _, a)| a.stats()).collect();
        let home = Home {
            coordinator,
            hub,
            light,
            agents,
            admin_token,
            models,
            agent_stats,
        };
        home.wait_for_versions(&home.current_versions().await?, Duration::from_secs(60))
            .await?;
        Ok(home)
    }

    /// The federated models of this home.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    async fn admin(&self) -> Result<AdminClient<tonic::transport::Channel>> {
        let ch = hearth_coordinator::client::connect(
            &self.coordinator.endpoint(),
            self.coordinator.ca_pem(),
            None,
        )
        .await?;
        Ok(AdminClient::new(ch))
    }

    fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.admin_token)
                .parse()
                .expect("token is ASCII"),
        );
        r
    }

    /// Every stored version of `model`, oldest first.
    pub async fn versions(&self, model: &str) -> Result<Vec<ModelVersion>> {
        let r = self
            .admin()
            .await?
            .list_versions(self.authed(ListVersionsRequest {
                model: model.into(),
            }))
            .await?;
        let mut v = r.into_inner().versions;
        v.sort_by_key(|m| m.version);
        Ok(v)
    }

    /// Latest version of each model.
    pub async fn current_versions(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for m in &self.models {
            let v = self.versions(m).await?;
            let last = v.last().map(|v| v.version).unwrap_or(0);
            out.push((m.clone(), last));
        }
        Ok(out)
    }

    /// Waits until every agent of each model runs at least the given version.
    pub async fn wait_for_versions(&self, want: &[(String, u64)], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let behind: Vec<String> = self
                .agents
                .iter()
                .filter(|(_, model, h)| {
                    let v = h.stats().model_version.load(Ordering::Relaxed);
                    want.iter().any(|(m, need)| m == model && v < *need)
                })
                .map(|(d, _, h)| format!("{d} ({})", h.model_tag()))
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "agents did not load the current model ({})",
                        behind.join(", ")
                    ),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `mqtt://<name>:<password>@host:port` of the hub's broker for a newly provisioned
    /// principal `name` with `role` (for observers and tools in tests).
    pub fn client_url(&self, name: &str, role: Role) -> Result<String> {
        let p = self.hub.provision(name, role)?;
        Ok(self.hub.client_url(&p))
    }

    /// Asks for a federated refresh of `model` the way an admin would, over MQTT
    /// (`hearth/federation/refresh`, signed with the hub's refresh key as
    /// `hearth-hub refresh-request` does, from an admin login), and waits for the round to complete and every agent of
    /// the model to hot-swap the new version. Returns the final round status.
    pub async fn refresh_over_mqtt(&self, model: &str, limit: Duration) -> Result<RoundStatus> {
        let before = self
            .latest_round(model)
            .await?
            .map(|r| r.round_id)
            .unwrap_or(0);
        let url = MqttUrl::parse(&self.client_url("demo-admin", Role::Admin)?)
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        let key = self
            .hub
            .credentials()
            .ok_or_else(|| Error::Mqtt("the hub keeps no credential store".into()))?
            .refresh_key()?;
        let (client, mut el) = ClientSettings::new(url, token("refresh"))
            .keep_alive(Duration::from_secs(5))
            .request_capacity(10)
            .connect()
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        let body = serde_json::to_vec(&hearth_hub::auth::sign_refresh(&key, model))
            .expect("a refresh request serialises");
        client
            .publish(
                hearth_proto::mqtt::REFRESH_TOPIC,
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        // Drive the connection until the broker acknowledged the request.
        let ack_limit = Duration::from_secs(10);
        tokio::time::timeout(ack_limit, async {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(Error::Mqtt(e.to_string())),
                }
            }
        })
        .await
        .map_err(|_| Error::Timeout {
            what: "the broker did not acknowledge the refresh request".into(),
            limit: ack_limit,
        })??;
        let _ = client.try_disconnect();

        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.latest_round(model).await? {
                if s.round_id > before {
                    match s.state() {
                        RoundState::Completed => break s,
                        RoundState::Failed => {
                            return Err(Error::RoundFailed {
                                model: model.to_string(),
                                round: s.round_id,
                                detail: s.detail,
                            })
                        }
                        _ => {}
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("the round of {model} did not complete"),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.wait_for_versions(&[(model.to_string(), status.new_version)], remaining)
            .await?;
        Ok(status)
    }

    /// The latest round of `model`, if any.
    pub async fn latest_round(&self, model: &str) -> Result<Option<RoundStatus>> {
        match self
            .admin()
            .await?
            .get_round_status(self.authed(RoundStatusRequest {
                model: model.into(),
                round_id: 0,
            }))
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Stops everything, agents first.
    pub async fn shutdown(self) -> Result<()> {
        for (device, _, a) in self.agents {
            a.shutdown().await.map_err(device_error(&device))?;
        }
        self.light
            .shutdown()
            .await
            .map_err(device_error(PORCH_LIGHT))?;
        self.hub.shutdown().await;
        self.coordinator.shutdown().await?;
        Ok(())
    }
}

/// The repository's `data/` directory, found from the current directory or from this
/// crate's source location.
pub fn default_data_dir() -> PathBuf {
    let here = Path::new("data");
    if here.join("plaid").is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// Counters the summary reports, read from the running parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub events_published: u64,
    pub events_received: u64,
    pub events_routed: u64,
    pub events_dropped: u64,
    pub commands_published: u64,
    pub commands_applied: u64,
}

impl Traffic {
    /// Events the agents published that the hub never received. Only a loss once the control
    /// path has drained ([`Home::drain_control_path`]); before that, some are in flight.
    pub fn events_lost(&self) -> u64 {
        self.events_published.saturating_sub(self.events_received)
    }

    /// Commands the hub published that the actuator never applied (same caveat).
    pub fn commands_lost(&self) -> u64 {
        self.commands_published
            .saturating_sub(self.commands_applied)
    }

    fn drained(&self) -> bool {
        self.events_lost() == 0 && self.commands_lost() == 0
    }
}

impl Home {
    /// Reads the counters of agents, hub and actuator as they are now: while agents run, some
    /// events and commands are in flight. For a summary use [`Home::drain_control_path`].
    pub fn traffic(&self) -> Traffic {
        let m = self.hub.metrics();
        let l = self.light.stats();
        Traffic {
            events_published: self
                .agent_stats
                .iter()
                .map(|s| s.events_published.load(Ordering::Relaxed))
                .sum(),
            events_received: m.events_received.load(Ordering::Relaxed),
            events_routed: m.events_routed.load(Ordering::Relaxed),
            events_dropped: m.events_dropped_total(),
            commands_published: m.commands_published.load(Ordering::Relaxed),
            commands_applied: l.commands_applied.load(Ordering::Relaxed),
        }
    }

    /// Ends the control path's traffic and returns its final counters: stops the agents (the
    /// event sources; each hands its queued events to the broker and disconnects), then waits
    /// until the hub has received every event the agents published and the porch light has
    /// applied every command the hub published, and the counters stay still for a moment. At
    /// `limit` it returns what it has: any difference left is a real loss
    /// ([`Traffic::events_lost`], [`Traffic::commands_lost`]). Coordinator, hub and light keep
    /// running (for [`Home::versions`] and [`Home::shutdown`]).
    pub async fn drain_control_path(&mut self, limit: Duration) -> Result<Traffic> {
        let deadline = Instant::now() + limit;
        for (device, _, a) in self.agents.drain(..) {
            a.shutdown().await.map_err(device_error(&device))?;
        }
        let mut last = self.traffic();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.traffic();
            if (now.drained() && now == last) || Instant::now() > deadline {
                return Ok(now);
            }
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_camera_rule_is_in_the_demo_rules() {
        let rules = hearth_hub::RuleSet::parse(DEMO_RULES, "demo", "zigbee2mqtt").unwrap();
        let r = rules
            .rules()
            .iter()
            .find(|r| r.name == LIVE_CAMERA_RULE)
            .expect("the live camera's rule");
        assert_eq!(
            r.sub_label,
            Some(hearth_hub::rules::Pattern::Exact("person".into()))
        );
    }
}
