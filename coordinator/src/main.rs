//! `hearth-coordinator`: loads and validates the config (exit 64 on a bad one), binds the
//! listener (exit 69 if that fails), then serves until SIGINT/SIGTERM and drains within
//! `shutdown_grace_secs`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hearth_coordinator::Config;
use hearth_edge::process::{init_tracing, parse_args, runtime, shutdown_signal};
use hearth_edge::{EXIT_UNAVAILABLE as EXIT_BIND, EXIT_USAGE as EXIT_CONFIG};

/// Hearth coordinator: runs federated learning rounds over gRPC.
///
/// Agents enroll with a one-time token, subscribe to round tasks, fetch the global model in
/// resumable chunks and upload quantized updates; the coordinator folds them into a running
/// FedAvg sum, publishes each new version (evaluated on the held-out set) and keeps all state in
/// a sled database so a restart resumes open rounds.
///
/// The config file is TOML; every key has a default (see --print-default-config). The admin
/// token may come from HEARTH_ADMIN_TOKEN instead of the file. Log level: RUST_LOG (default info).
#[derive(Parser, Debug)]
#[command(name = "hearth-coordinator", version, about, long_about)]
struct Cli {
    /// TOML config file (defaults are used for missing keys, or for everything if omitted).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address, overriding `listen` from the config (e.g. 0.0.0.0:50051).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin bearer token, overriding `admin_token` from the config.
    #[arg(
        long,
        env = "HEARTH_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// Print the built-in default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = &cli.listen {
        config.listen = l.clone();
    }
    if let Some(t) = &cli.admin_token {
        config.admin_token = t.clone();
    }
    config.validate()?;
    config
        .listen
        .parse::<std::net::SocketAddr>()
        .with_context(|| format!("invalid listen address {:?}", config.listen))?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli: Cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.print_default_config {
        print!("{}", Config::default().to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing("info");

    // Phase 1: configuration.
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth-coordinator: bad configuration: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime("hearth-coordinator", None) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let code = rt.block_on(async move {
        let signal = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hearth-coordinator: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Phase 2: bind.
        let listener = match tokio::net::TcpListener::bind(&config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "hearth-coordinator: cannot listen on {}: {e}",
                    config.listen
                );
                return ExitCode::from(EXIT_BIND);
            }
        };
        // Phase 3: serve until a signal, then drain within the grace period.
        let grace = Duration::from_secs(config.shutdown_grace_secs);
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            signal.await;
            let _ = signalled_tx.send(());
        };
        let server = hearth_coordinator::run(config, listener, shutdown);
        tokio::pin!(server);
        let drain_limit = async move {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = &mut server => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "coordinator failed");
                    eprintln!("hearth-coordinator: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = drain_limit => {
                tracing::warn!(secs = grace.as_secs(), "drain time limit reached; exiting");
                ExitCode::FAILURE
            }
        }
    });
    // Do not wait for CPU work (evaluation) left on the blocking pool.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}
