//! `hearth-agent`: the device agent binary (and `hearth-agent actuator`, a
//! virtual Zigbee2MQTT-style switch).
//!
//! Start-up has three phases: (1) configuration (file + flags, validated; exit
//! 64 on error), (2) start (data share, model, MQTT, federation), (3) run until
//! SIGINT/SIGTERM, then shut down within a time limit (publishing `offline`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hearth_agent::actuator::{start_actuator, ActuatorConfig, DeviceKind};
use hearth_agent::Config;
use hearth_edge::process::{init_tracing, parse_args, runtime, Signals};
use hearth_edge::EXIT_USAGE;
/// How long a graceful shutdown may take before the process gives up.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(name = "hearth-agent", version, about = "Hearth device agent")]
struct Cli {
    /// TOML configuration file (flags override its values).
    #[arg(long, short = 'c', env = "HEARTH_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(flatten)]
    overrides: Overrides,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Args, Debug, Default)]
struct Overrides {
    /// Device name (one MQTT topic level).
    #[arg(long)]
    device: Option<String>,
    /// Task: a task file (.toml) or the name of a set in the data directory.
    #[arg(long)]
    task: Option<String>,
    /// Broker URL: mqtt://[user[:password]@]host[:port] or mqtts://… (with --mqtt-ca-file).
    #[arg(long)]
    mqtt: Option<String>,
    /// CA certificate file (PEM) trusted for an mqtts:// broker.
    #[arg(long)]
    mqtt_ca_file: Option<PathBuf>,
    /// File holding the MQTT password of the URL's user (from `hearth-hub provision-device`).
    #[arg(long)]
    mqtt_password_file: Option<PathBuf>,
    /// Coordinator URL, https://host:port (http:// for an insecure one; "" disables federation).
    #[arg(long)]
    coordinator: Option<String>,
    /// CA certificate (PEM) of an https:// coordinator (its pki/ca.pem).
    #[arg(long)]
    coordinator_ca_file: Option<PathBuf>,
    /// One-time enrollment token.
    #[arg(long, env = "HEARTH_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    /// Federated model name (default: the task name).
    #[arg(long)]
    model: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// State directory (credentials, model, residual).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// This device's partition index.
    #[arg(long)]
    partition_index: Option<usize>,
    /// Number of partitions.
    #[arg(long)]
    partition_count: Option<usize>,
    /// Dirichlet alpha of the label skew.
    #[arg(long)]
    partition_alpha: Option<f32>,
    /// Partition seed.
    #[arg(long)]
    partition_seed: Option<u64>,
    /// Samples per second (0 = as fast as possible).
    #[arg(long)]
    replay_rate_hz: Option<f64>,
    /// Stop replaying after N samples.
    #[arg(long)]
    replay_limit: Option<u64>,
    /// Event name.
    #[arg(long)]
    event_name: Option<String>,
    /// Minimum score of a published verdict.
    #[arg(long)]
    min_event_score: Option<f32>,
    /// ONNX model to start from when the state directory holds none.
    #[arg(long)]
    initial_model: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Enrol with the coordinator once and exit: generate this device's key, send a
    /// certificate signing request with the one-time token (from `hearth-coordinator
    /// enroll-token`) and store the issued certificate in the state directory.
    Enroll {
        /// One-time enrollment token.
        #[arg(long, env = "HEARTH_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// The coordinator's CA certificate (its pki/ca.pem, copied to this device); overrides
        /// `coordinator_ca_file`.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Empty the on-device sample store (the samples behind recent events and the labels the
    /// home gave them, `<state_dir>/samples`) and exit. Stop the agent first.
    Wipe,
    /// Run a virtual Zigbee2MQTT device (a switch or a light).
    Actuator {
        /// Switch name (one topic level).
        #[arg(long)]
        name: String,
        /// Topic base.
        #[arg(long, default_value = "zigbee2mqtt")]
        base: String,
        /// Broker URL: mqtt://[user[:password]@]host[:port] or mqtts://… (with --ca-file).
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        mqtt: String,
        /// CA certificate file (PEM) trusted for an mqtts:// broker.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// File holding the MQTT password of the URL's user.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// MQTT client id.
        #[arg(long)]
        client_id: Option<String>,
        /// `switch` (state only) or `light` (state, brightness, color_temp, transition).
        #[arg(long, default_value = "switch", value_parser = ["switch", "light"])]
        kind: String,
        /// Keep the state and the command-id window here across restarts (so a command
        /// redelivered after a restart is applied once).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Home Assistant's discovery prefix (its birth message comes on `<prefix>/status`).
        #[arg(long, default_value = "homeassistant")]
        discovery_prefix: String,
    },
}

impl Overrides {
    fn apply(self, c: &mut Config) -> anyhow::Result<()> {
        if let Some(v) = self.device {
            c.device = v;
        }
        if let Some(v) = self.task {
            c.task = v;
        }
        if let Some(v) = self.mqtt {
            c.mqtt = v;
        }
        if let Some(v) = self.mqtt_ca_file {
            c.mqtt_ca_file = Some(v);
        }
        if let Some(v) = self.mqtt_password_file {
            c.mqtt_password_file = Some(v);
        }
        if let Some(v) = self.coordinator {
            c.coordinator = Some(v);
        }
        if let Some(v) = self.coordinator_ca_file {
            c.coordinator_ca_file = Some(v);
        }
        if let Some(v) = self.enrollment_token {
            c.enrollment_token = Some(v);
        }
        if let Some(v) = self.model {
            c.model = Some(v);
        }
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.state_dir {
            c.state_dir = v;
        }
        if let Some(v) = self.partition_index {
            c.partition.index = v;
        }
        if let Some(v) = self.partition_count {
            c.partition.count = v;
        }
        if let Some(v) = self.partition_alpha {
            c.partition.alpha = v;
        }
        if let Some(v) = self.partition_seed {
            c.partition.seed = v;
        }
        if let Some(v) = self.replay_rate_hz {
            c.replay_rate_hz = v;
        }
        if let Some(v) = self.replay_limit {
            c.replay_limit = Some(v);
        }
        if let Some(v) = self.event_name {
            c.event_name = Some(v);
        }
        if let Some(v) = self.min_event_score {
            c.min_event_score = v;
        }
        if let Some(v) = self.initial_model {
            c.initial_model = Some(v);
        }
        Ok(())
    }
}

/// Phase 1: the effective configuration, validated.
fn agent_config(config: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<Config> {
    let mut c = match config {
        Some(p) => Config::load(&p)?,
        None => Config::default(),
    };
    overrides.apply(&mut c)?;
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    let cli: Cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing("info");

    if cli.print_default_config {
        print!("{}", Config::default_toml());
        return ExitCode::SUCCESS;
    }

    // Phase 1: configuration.
    let mode = match cli.command {
        Some(Cmd::Actuator {
            name,
            base,
            mqtt,
            ca_file,
            password_file,
            client_id,
            kind,
            state_dir,
            discovery_prefix,
        }) => {
            let c = ActuatorConfig {
                name,
                base,
                mqtt,
                ca_file,
                password_file,
                client_id,
                kind: if kind == "light" {
                    DeviceKind::Light
                } else {
                    DeviceKind::Switch
                },
                state_dir,
                discovery_prefix,
                ..ActuatorConfig::default()
            };
            c.validate()
                .map(|()| Mode::Actuator(c))
                .map_err(anyhow::Error::from)
        }
        Some(Cmd::Enroll { token, ca_file }) => {
            let mut o = cli.overrides;
            o.coordinator_ca_file = ca_file.or(o.coordinator_ca_file);
            agent_config(cli.config, o).and_then(|c| {
                if c.coordinator_url().is_none() {
                    anyhow::bail!(
                        "enroll needs a coordinator URL (config `coordinator` or --coordinator)"
                    );
                }
                Ok(Mode::Enroll(c, token))
            })
        }
        Some(Cmd::Wipe) => {
            // Only the state directory matters: a broken task file must not keep data around.
            (|| -> anyhow::Result<Mode> {
                let mut c = match cli.config {
                    Some(p) => Config::load(&p)?,
                    None => Config::default(),
                };
                cli.overrides.apply(&mut c)?;
                if c.state_dir.as_os_str().is_empty() {
                    anyhow::bail!("state_dir must not be empty");
                }
                Ok(Mode::Wipe(c.state_dir))
            })()
        }
        None => agent_config(cli.config, cli.overrides).map(Mode::Agent),
    };
    let mode = match mode {
        Ok(m) => m,
        Err(e) => {
            eprintln!("hearth-agent: bad configuration: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    if let Mode::Wipe(dir) = &mode {
        return match hearth_agent::samples::SampleStore::wipe(dir) {
            Ok(n) => {
                println!(
                    "wiped {n} stored samples from {}",
                    hearth_agent::samples::SampleStore::path(dir).display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hearth-agent: wipe failed (is the agent still running?): {e}");
                ExitCode::FAILURE
            }
        };
    }

    let rt = match runtime("hearth-agent", Some(2)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if let Mode::Enroll(c, token) = &mode {
        return match rt.block_on(hearth_agent::enroll(c, token)) {
            Ok(creds) => {
                println!(
                    "enrolled {} as client {} at {}; credentials in {}",
                    c.device,
                    creds.client_id,
                    creds.coordinator,
                    c.state_dir.join("credentials.json").display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hearth-agent: enrolment failed: {e}");
                ExitCode::from(if e.is_transient() {
                    hearth_edge::EXIT_UNAVAILABLE
                } else {
                    1
                })
            }
        };
    }
    match rt.block_on(serve(mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // A port that cannot be bound (the metrics endpoint) is "unavailable".
            if matches!(
                e.downcast_ref::<hearth_agent::Error>(),
                Some(hearth_agent::Error::Bind(_))
            ) {
                ExitCode::from(hearth_edge::EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// What the command line asked for.
enum Mode {
    Agent(Config),
    /// `enroll --token`: the config and the token.
    Enroll(Config, String),
    /// `wipe`: the state directory whose sample store is emptied.
    Wipe(PathBuf),
    Actuator(ActuatorConfig),
}

enum Running {
    Agent(hearth_agent::AgentHandle),
    Actuator(hearth_agent::actuator::ActuatorHandle),
}

/// Phase 2: start.
async fn start(mode: Mode) -> anyhow::Result<Running> {
    match mode {
        Mode::Enroll(..) | Mode::Wipe(..) => anyhow::bail!("enroll and wipe run on their own"),
        Mode::Agent(c) => {
            let device = c.device.clone();
            let h = hearth_agent::start(c)
                .await
                .with_context(|| format!("starting agent {device}"))?;
            tracing::info!(device = %device, model = %h.model_tag(), "agent running");
            Ok(Running::Agent(h))
        }
        Mode::Actuator(c) => {
            let name = c.name.clone();
            let h = start_actuator(c)
                .await
                .with_context(|| format!("starting actuator {name}"))?;
            tracing::info!(name = %name, "actuator running");
            Ok(Running::Actuator(h))
        }
    }
}

/// Phase 3: run until a signal, then stop within [`SHUTDOWN_LIMIT`].
async fn serve(mode: Mode) -> anyhow::Result<()> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    let running = start(mode).await?;
    signals.recv().await;
    tracing::info!("termination requested");
    let stop = async {
        match running {
            Running::Agent(h) => h.shutdown().await,
            Running::Actuator(h) => h.shutdown().await,
        }
    };
    tokio::time::timeout(SHUTDOWN_LIMIT, stop)
        .await
        .map_err(|_| anyhow::anyhow!("shutdown took longer than {SHUTDOWN_LIMIT:?}"))??;
    tracing::info!("stopped cleanly");
    Ok(())
}
