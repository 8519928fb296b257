//! A real PostgreSQL for tests: Debian's binaries (`apt-get install postgresql`), a cluster made
//! by `initdb` in a temp dir, run on a free loopback port as a non-root user (the `postgres`
//! system user when the tests run as root), stopped by its PID (SIGINT: fast shutdown) when
//! dropped. [`PgCluster::start`] returns `None`, printing why, when the binaries are missing.
//! Shared by the store's unit tests (`#[path]`) and the integration tests (`common::pg`).
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The superuser the clusters are made with, and its password.
pub const USER: &str = "hearth";
pub const PASSWORD: &str = "pg-test-password-7d1c";

/// A running test cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    child: Option<Child>,
    bin: PathBuf,
    /// Loopback port it listens on.
    pub port: u16,
    run_as: Option<(u32, u32)>,
}

/// The directory of Debian's PostgreSQL binaries: `HEARTH_PG_BIN`, the newest
/// `/usr/lib/postgresql/<v>/bin`, or none.
fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HEARTH_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// (uid, gid) of `name` from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgCluster {
    /// Makes and starts a cluster, or `None` (with a message) without PostgreSQL binaries.
    /// `durable`: fsync on (for measurements); off otherwise, which tests do not need.
    pub fn start() -> Option<PgCluster> {
        Self::start_with(false)
    }

    /// See [`PgCluster::start`].
    pub fn start_with(durable: bool) -> Option<PgCluster> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "SKIPPED: no PostgreSQL binaries (/usr/lib/postgresql/<v>/bin or HEARTH_PG_BIN); \
                 apt-get install -y postgresql"
            );
            return None;
        };
        // PostgreSQL refuses to run as root: then it runs as the `postgres` system user.
        let root = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
            == 0;
        let run_as = if root {
            Some(user_ids("postgres").expect(
                "running as root needs the postgres system user (made by the Debian package)",
            ))
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = Self::command(&bin, "initdb", run_as)
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-E", "UTF8", "--no-sync", "--no-instructions"])
            .args(["--auth-host=scram-sha-256", "--auth-local=reject"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = PgCluster {
            dir,
            child: None,
            bin,
            port: 0,
            run_as,
        };
        // A port taken between choosing and binding: try another.
        for _ in 0..5 {
            cluster.port = free_port();
            let log = std::fs::File::create(cluster.dir.path().join("postgres.log")).unwrap();
            let mut cmd = Self::command(&cluster.bin, "postgres", run_as);
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &cluster.port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "max_connections=200"]);
            if !durable {
                cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
                cmd.args(["-c", "full_page_writes=off"]);
            }
            cluster.child = Some(
                cmd.stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("postgres starts"),
            );
            if cluster.wait_ready() {
                return Some(cluster);
            }
            cluster.stop();
        }
        panic!("PostgreSQL did not start: {}", cluster.log());
    }

    fn command(bin: &Path, name: &str, run_as: Option<(u32, u32)>) -> Command {
        let mut c = Command::new(bin.join(name));
        if let Some((uid, gid)) = run_as {
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGDATA");
        c
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Waits (bounded) until it accepts logins; false when the server exited.
    fn wait_ready(&mut self) -> bool {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` (a fresh one per store under test) and returns its URL.
    pub fn database(&self, db: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                db,
            ])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(db)
    }

    /// Fast shutdown by PID (SIGINT), bounded; SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
