//! What every Hearth binary does the same way: parse its command line with the house exit
//! codes, initialise tracing, turn SIGINT/SIGTERM into a future, and wait for a shutdown
//! flag ([`stopped`]).
//!
//! Exit codes (BSD sysexits): [`EXIT_USAGE`] (64) for a bad flag or configuration,
//! [`EXIT_UNAVAILABLE`] (69) when a port, broker or service is unavailable; `--help` and
//! `--version` exit 0.

use std::future::Future;
use std::process::ExitCode;

/// Bad command line or configuration (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// A port, broker or service is unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// The exit code for a clap error: 0 for `--help`/`--version`, [`EXIT_USAGE`] otherwise.
pub fn clap_exit_code(e: &clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => EXIT_USAGE,
    }
}

/// Parses the command line; on `--help`/`--version` or a bad flag, prints clap's message
/// and returns the exit code to use (0 or 64) instead of clap's default 2.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        ExitCode::from(clap_exit_code(&e))
    })
}

/// Initialises tracing to stderr: `RUST_LOG` if set, else `default_filter`
/// (e.g. `"info,rumqttd=off"`). A second call does nothing.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The multi-threaded Tokio runtime every binary runs on (`workers` threads, or one per core
/// when `None`); on failure prints why, prefixed with `binary`, and gives the exit code.
pub fn runtime(binary: &str, workers: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build().map_err(|e| {
        eprintln!("{binary}: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

/// SIGINT and SIGTERM handlers. Install them before starting anything, so that an early
/// signal is not lost; [`Signals::recv`] can be awaited again (e.g. a second signal cuts a
/// graceful shutdown short).
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers (needs a Tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT received"),
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the handlers now and returns a future that resolves on the first SIGINT or
/// SIGTERM (the `shutdown` argument of the `run` entry points).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut s = Signals::install()?;
    Ok(async move { s.recv().await })
}

/// Resolves once the shutdown flag is `true` (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(name = "t", version)]
    struct Cli {
        #[arg(long)]
        port: Option<u16>,
    }

    #[tokio::test]
    async fn stopped_resolves_on_true_or_dropped_sender() {
        use std::time::Duration;
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let t = tokio::spawn(async move { stopped(&mut rx).await });
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), t)
            .await
            .unwrap()
            .unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(1), stopped(&mut rx))
            .await
            .unwrap();
    }

    #[test]
    fn clap_errors_map_to_house_codes() {
        let code = |args: &[&str]| clap_exit_code(&Cli::try_parse_from(args).unwrap_err());
        assert_eq!(code(&["t", "--help"]), 0);
        assert_eq!(code(&["t", "--version"]), 0);
        assert_eq!(code(&["t", "--nope"]), EXIT_USAGE);
        assert_eq!(code(&["t", "--port", "x"]), EXIT_USAGE);
    }
}
