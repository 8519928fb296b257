//! `hearth-hub`: the hub binary.
//!
//! Start-up has three phases with distinct failures: (1) configuration (exit 64 with a
//! clear message), (2) binding the broker and endpoints, connecting, (3) running until
//! SIGINT/SIGTERM, then a graceful shutdown with a time limit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hearth_hub::{BrokerConfig, Config, Error};

/// Exit code for a bad command line or configuration (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the broker, endpoints or coordinator are unavailable (`EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;
/// Time allowed for a graceful shutdown.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "hearth-hub",
    version,
    about = "Hearth hub: MQTT broker, rules → actuators, device registry, federated refresh"
)]
struct Cli {
    /// Configuration file (TOML); built-in defaults when absent.
    #[arg(long, short, env = "HEARTH_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Use an external broker (`mqtt://host:port`) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Rules file (overrides the configuration).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Serve /metrics and /devices on this address (overrides the configuration).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask the coordinator to start a federated round for a model.
    Refresh {
        /// Model name, e.g. `plaid`.
        model: String,
        /// Coordinator URL (default: from the configuration).
        #[arg(long)]
        coordinator: Option<String>,
        /// Admin token (default: from the configuration).
        #[arg(long, env = "HEARTH_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
}

/// Logs: `RUST_LOG` or `info`; rumqttd is silenced by default (it logs clean disconnects as
/// errors); `RUST_LOG=info,rumqttd=info` shows the broker.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Phase 1: the configuration from file + flags, validated.
fn load_config(cli: &Cli) -> Result<Config, Error> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(url) = &cli.broker {
        cfg.broker = BrokerConfig::external(url.clone());
    }
    if let Some(r) = &cli.rules {
        cfg.rules = Some(r.clone());
    }
    if let Some(m) = cli.metrics_listen {
        cfg.metrics_listen = Some(m);
    }
    cfg.validate()?;
    // Load the rules now too, so a bad rules file is a configuration error (exit 64).
    if let Some(r) = &cfg.rules {
        hearth_hub::RuleSet::load(r, &cfg.actuator_base)?;
    }
    Ok(cfg)
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Config(_) | Error::Rules(_) => EXIT_CONFIG,
        _ => EXIT_UNAVAILABLE,
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn refresh_cmd(
    cli: &Cli,
    model: &str,
    coordinator: Option<String>,
    token: Option<String>,
) -> ExitCode {
    let file_cfg = match &cli.config {
        Some(p) => match Config::load(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("hearth-hub: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    let url = coordinator.or_else(|| file_cfg.as_ref().and_then(|c| c.coordinator.clone()));
    let token = token.or_else(|| file_cfg.as_ref().and_then(|c| c.admin_token.clone()));
    let (Some(url), Some(token)) = (url, token) else {
        eprintln!(
            "hearth-hub refresh: needs --coordinator URL and --admin-token T (or both in --config)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    match hearth_hub::refresh(&url, &token, model).await {
        Ok(r) => {
            println!(
                "round {} for {} is {} (base version {}, clients {}..{}){}",
                r.round_id,
                r.model,
                r.state,
                r.base_version,
                r.min_clients,
                r.max_clients,
                if r.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.detail)
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hearth-hub refresh: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", Config::default_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearth-hub: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Refresh {
        model,
        coordinator,
        admin_token,
    }) = &cli.command
    {
        return rt.block_on(refresh_cmd(
            &cli,
            model,
            coordinator.clone(),
            admin_token.clone(),
        ));
    }

    // Phase 1: configuration.
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth-hub: {e}");
            return ExitCode::from(exit_code(&e));
        }
    };
    rt.block_on(async move {
        // Phase 2: bind and connect.
        let hub = match hearth_hub::start(cfg).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("start-up failed: {e}");
                eprintln!("hearth-hub: {e}");
                return ExitCode::from(exit_code(&e));
            }
        };
        tracing::info!(mqtt = %hub.mqtt_url(), metrics = ?hub.metrics_addr(), "ready");
        // Phase 3: run until a signal.
        if let Err(e) = wait_for_signal().await {
            tracing::error!("{e:#}");
        }
        tracing::info!("shutting down (limit {SHUTDOWN_LIMIT:?}; a second signal exits at once)");
        let graceful = tokio::select! {
            r = tokio::time::timeout(SHUTDOWN_LIMIT, hub.shutdown()) => r.is_ok(),
            _ = wait_for_signal() => false,
        };
        if graceful {
            ExitCode::SUCCESS
        } else {
            tracing::warn!("shutdown cut short");
            ExitCode::FAILURE
        }
    })
}
