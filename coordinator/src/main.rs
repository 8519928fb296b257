//! `hearth-coordinator`: loads and validates the config (exit 64 on a bad one), binds the
//! listener (exit 69 if that fails, or if the PostgreSQL store is unreachable), then serves until SIGINT/SIGTERM and drains within
//! `shutdown_grace_secs`. The `enroll-token`, `revoke`, `versions` and `rollback` subcommands
//! call the running coordinator's Admin API over TLS (the database is locked by it).
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
/// gRPC runs over TLS with the coordinator's own CA (created in `pki_dir`, default `pki/`
/// beside the database); agents enrol with a one-time token made by `enroll-token`, get a
/// client certificate for a key they generate, and are cut off by `revoke`. `--insecure`
/// (or `insecure = true`) serves plaintext for local demos only.
///
/// The config file is TOML; every key has a default (see --print-default-config). The admin
/// token may come from HEARTH_ADMIN_TOKEN instead of the file. Log level: RUST_LOG (default info).
#[derive(Parser, Debug)]
#[command(name = "hearth-coordinator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Serve plaintext gRPC with shared-key client credentials (local demos only).
    #[arg(long)]
    insecure: bool,
    /// Print the built-in default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
}

/// Subcommands that talk to a running coordinator (same config file: they read `listen`,
/// `admin_token` and the CA certificate in `pki_dir`).
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Make a one-time enrollment token for one device and print it with what the device
    /// needs: the CA certificate to copy to it and the command to run there.
    EnrollToken {
        /// Device name the token is for (the agent's `device`).
        #[arg(long, value_name = "NAME")]
        device: String,
        /// How long the token stays valid (e.g. 30m, 24h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke every client enrolled under a device name (or one client id): its next call is
    /// refused and its open streams end.
    Revoke {
        /// Device name (or client id).
        device: String,
        #[command(flatten)]
        target: Target,
    },
    /// List a model's versions: the round that made each one, its clients, uplink bytes of
    /// their updates, bytes of the version served to agents, the round's wall time, the
    /// held-out accuracy (coordinator's test split) and the federated accuracy (clients'
    /// held-out data, weighted by samples; from the rounds based on the version).
    Versions {
        /// Model name.
        model: String,
        #[command(flatten)]
        target: Target,
    },
    /// Plot a model's held-out and federated accuracy per version and its uplink and
    /// downlink bytes per round, as SVG.
    Plot {
        /// Model name.
        model: String,
        /// Output file (.svg).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Start a refresh of a model: one round, `--rounds N` back to back, or rounds until
    /// the held-out accuracy reaches `--target-accuracy` (at most `--rounds`). Prints the
    /// first round; follow it with `versions`.
    StartRound {
        /// Model name.
        model: String,
        /// Rounds to run back to back (the server loop).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Stop once the held-out accuracy reaches this (0 = no target).
        #[arg(long, default_value_t = 0.0)]
        target_accuracy: f32,
        /// Fewest updates at the deadline (0 = the configured default).
        #[arg(long, default_value_t = 0)]
        min_clients: u32,
        /// Updates that complete a round at once (0 = the configured default).
        #[arg(long, default_value_t = 0)]
        max_clients: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Republish an older version: its content becomes the next version (signed, parent =
    /// the latest, lineage recorded), which agents load like any new version.
    Rollback {
        /// Model name.
        model: String,
        /// The version whose content is republished.
        version: u64,
        #[command(flatten)]
        target: Target,
    },
}

/// Where the running coordinator is.
#[derive(clap::Args, Debug)]
struct Target {
    /// Coordinator URL (default: from `listen`, `https://` unless insecure).
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// CA certificate to trust (default: `ca.pem` in the PKI directory).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

/// Exit code of a call the coordinator refused.
const EXIT_REFUSED: u8 = 1;

/// Runs a subcommand; `Err((code, message))` on failure.
async fn admin_command(config: &Config, cmd: &Command) -> Result<(), (u8, String)> {
    use hearth_coordinator::client::connect;
    use hearth_proto::v1::admin_client::AdminClient;
    let target = match cmd {
        Command::EnrollToken { target, .. }
        | Command::Revoke { target, .. }
        | Command::Versions { target, .. }
        | Command::Plot { target, .. }
        | Command::StartRound { target, .. }
        | Command::Rollback { target, .. } => target,
    };
    let url = match &target.coordinator {
        Some(u) => u.clone(),
        None => {
            let a: std::net::SocketAddr = config.listen.parse().map_err(|_| {
                (
                    EXIT_CONFIG,
                    format!("invalid listen address {:?}", config.listen),
                )
            })?;
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                a.ip().to_string()
            };
            let scheme = if config.insecure { "http" } else { "https" };
            format!("{scheme}://{host}:{}", a.port())
        }
    };
    let ca_path = target
        .ca_file
        .clone()
        .unwrap_or_else(|| config.pki_dir().join(hearth_coordinator::pki::CA_CERT_FILE));
    let ca = if url.starts_with("https://") {
        Some(std::fs::read_to_string(&ca_path).map_err(|e| {
            (
                EXIT_CONFIG,
                format!("cannot read the CA certificate {}: {e}", ca_path.display()),
            )
        })?)
    } else {
        None
    };
    let channel = connect(&url, ca.as_deref(), None).await.map_err(|e| {
        (
            EXIT_BIND,
            format!("cannot reach the coordinator at {url}: {e}"),
        )
    })?;
    let mut admin = AdminClient::new(channel);
    fn auth<T>(m: T, token: &str) -> Result<tonic::Request<T>, (u8, String)> {
        hearth_coordinator::client::with_admin(m, token)
            .ok_or((EXIT_CONFIG, "admin_token is not valid metadata".to_string()))
    }
    let token = config.admin_token.as_str();
    let refused = |s: tonic::Status| (EXIT_REFUSED, format!("refused: {}", s.message()));
    match cmd {
        Command::EnrollToken { device, ttl, .. } => {
            let r = admin
                .create_enrollment_token(auth(
                    hearth_proto::v1::CreateTokenRequest {
                        uses: 1,
                        device_name: device.clone(),
                        ttl_secs: ttl.as_secs().max(1),
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            let expires = std::time::UNIX_EPOCH + Duration::from_millis(r.expires_unix_ms);
            println!("token: {}", r.token);
            println!("device: {device}");
            println!("expires: {}", humantime::format_rfc3339_seconds(expires));
            if ca.is_some() {
                println!("ca_file: {}", ca_path.display());
                println!("ca_sha256: {}", r.ca_sha256);
                println!(
                    "On the device: copy {} there (check its sha256 with `sha256sum`: the DER                      fingerprint above is `openssl x509 -in ca.pem -outform der | sha256sum`), then run
                       hearth-agent --config agent.toml enroll --token {} --ca-file ca.pem",
                    ca_path.display(),
                    r.token
                );
            } else {
                println!(
                    "On the device: hearth-agent --config agent.toml enroll --token {}",
                    r.token
                );
            }
        }
        Command::Revoke { device, .. } => {
            let r = admin
                .revoke_device(auth(
                    hearth_proto::v1::RevokeDeviceRequest {
                        device: device.clone(),
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            for id in r.client_ids {
                println!("revoked: {id}");
            }
        }
        Command::Versions { model, .. } => {
            let r = admin
                .list_versions(auth(
                    hearth_proto::v1::ListVersionsRequest {
                        model: model.clone(),
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            print!("{}", versions_table(&r.versions));
        }
        Command::Plot { model, out, .. } => {
            let r = admin
                .list_versions(auth(
                    hearth_proto::v1::ListVersionsRequest {
                        model: model.clone(),
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            let opt = |a: f32| (a >= 0.0).then_some(a);
            let points: Vec<hearth_coordinator::plot::RoundPoint> = r
                .versions
                .iter()
                .map(|v| hearth_coordinator::plot::RoundPoint {
                    version: v.version,
                    heldout_accuracy: opt(v.eval_accuracy),
                    federated_accuracy: opt(v.federated_accuracy),
                    uplink_bytes: v.uplink_bytes,
                    downlink_bytes: v.downlink_bytes,
                })
                .collect();
            hearth_coordinator::plot::write(model, &points, out)
                .map_err(|e| (EXIT_REFUSED, format!("{}: {e}", out.display())))?;
            println!("wrote {} ({} versions)", out.display(), points.len());
        }
        Command::StartRound {
            model,
            rounds,
            target_accuracy,
            min_clients,
            max_clients,
            ..
        } => {
            let r = admin
                .start_round(auth(
                    hearth_proto::v1::StartRoundRequest {
                        model: model.clone(),
                        min_clients: *min_clients,
                        max_clients: *max_clients,
                        reason: "cli".into(),
                        num_rounds: *rounds,
                        target_accuracy: *target_accuracy,
                        ..Default::default()
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "round {} of {model} open on version {} (cohort {}, {} rounds left after it)",
                r.round_id, r.base_version, r.cohort_size, r.rounds_left
            );
        }
        Command::Rollback { model, version, .. } => {
            let v = admin
                .rollback(auth(
                    hearth_proto::v1::RollbackRequest {
                        model: model.clone(),
                        version: *version,
                    },
                    token,
                )?)
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "published {model} version {} (content of version {}, parent {}, sha256 {})",
                v.version, v.rollback_of, v.parent_version, v.sha256
            );
        }
    }
    Ok(())
}

/// The `versions` table.
fn versions_table(versions: &[hearth_proto::v1::ModelVersion]) -> String {
    use std::fmt::Write;
    let acc = |a: f32| {
        if a < 0.0 {
            "-".to_string()
        } else {
            format!("{a:.4}")
        }
    };
    let mut out = format!(
        "{:>7} {:>6} {:>7} {:>10} {:>10} {:>8} {:>8} {:>9}  {}\n",
        "version",
        "round",
        "clients",
        "up_bytes",
        "down_bytes",
        "wall_s",
        "held_acc",
        "fed_acc",
        "note"
    );
    for v in versions {
        let note = if v.rollback_of > 0 {
            format!("rollback to {}", v.rollback_of)
        } else if v.from_round == 0 {
            "initial".to_string()
        } else if v.delta_bytes > 0 {
            format!("delta {} of {} bytes", v.delta_bytes, v.size_bytes)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>7} {:>6} {:>7} {:>10} {:>10} {:>8.2} {:>8} {:>9}  {}",
            v.version,
            v.from_round,
            v.round_clients,
            v.uplink_bytes,
            v.downlink_bytes,
            v.round_wall_ms as f64 / 1000.0,
            acc(v.eval_accuracy),
            acc(v.federated_accuracy),
            note
        );
    }
    out
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
    if cli.insecure {
        config.insecure = true;
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
    if let Some(cmd) = &cli.command {
        return match rt.block_on(admin_command(&config, cmd)) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, msg)) => {
                eprintln!("hearth-coordinator: {msg}");
                ExitCode::from(code)
            }
        };
    }
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
                    if e.is_unavailable() {
                        ExitCode::from(EXIT_BIND)
                    } else {
                        ExitCode::FAILURE
                    }
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
