//! The `hearth-coordinator` binary: default config printing, exit code 64 on a bad config,
//! and a real start-up followed by SIGTERM and a graceful exit.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_hearth-coordinator");

#[test]
fn prints_a_default_config_that_parses() {
    let out = Command::new(BIN)
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let c = hearth_coordinator::Config::from_toml_str(&text).unwrap();
    assert_eq!(c, hearth_coordinator::Config::default());
    assert!(text.contains("[[model]]"));
}

#[test]
fn help_explains_the_options() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for opt in [
        "--config",
        "--listen",
        "--print-default-config",
        "--admin-token",
    ] {
        assert!(text.contains(opt), "{opt} missing from help");
    }
}

/// Runs the binary on config file `p` (no admin token from the environment), expects exit 64
/// and returns what it printed on stderr.
fn refused(p: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(p)
        .env_remove("HEARTH_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_exits_64_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "admin_token = \"0123456789abcdef0\"\n[round]\nmin_clients = 0\n",
    )
    .unwrap();
    let err = refused(&p);
    assert!(err.contains("round.min_clients"), "{err}");

    std::fs::write(&p, "admin_token = [1]\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(64));

    // A robust method whose kept updates would not fit the round memory limit.
    std::fs::write(
        &p,
        "admin_token = \"0123456789abcdef0\"\nmax_round_memory_mb = 1\n\
         [round]\nmax_clients = 1000\n[aggregation]\ncombine = \"median\"\n",
    )
    .unwrap();
    let err = refused(&p);
    assert!(
        err.contains("max_round_memory_mb") && err.contains("max_clients (1000)"),
        "{err}"
    );

    // PostgreSQL without a URL; a URL whose password must not be echoed, with a bad pool.
    std::fs::write(
        &p,
        "admin_token = \"0123456789abcdef0\"\n[store]\nbackend = \"postgres\"\n",
    )
    .unwrap();
    let err = refused(&p);
    assert!(err.contains("store.url"), "{err}");
    std::fs::write(
        &p,
        "admin_token = \"0123456789abcdef0\"\n[store]\nbackend = \"postgres\"\n\
         url = \"postgres://u:pw-never-printed@127.0.0.1/db\"\npool_size = 0\n",
    )
    .unwrap();
    let err = refused(&p);
    assert!(err.contains("store.pool_size"), "{err}");
    assert!(!err.contains("pw-never-printed"), "{err}");

    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// A database nobody listens on is a service unavailable: exit 69 with the reason, the
/// password never printed.
#[test]
fn unreachable_database_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    // A port that was free a moment ago: nothing accepts connections there.
    let (port, listen) = (free_port(), free_port());
    std::fs::write(
        &p,
        format!(
            "listen = \"127.0.0.1:{listen}\"\ndata_dir = {data:?}\ninsecure = true\n\
             admin_token = \"0123456789abcdef0\"\n\
             [store]\nbackend = \"postgres\"\n\
             url = \"postgres://u:pw-never-printed@127.0.0.1:{port}/db?connect_timeout=5\"\n\
             [[model]]\nname = \"digits\"\ntask = \"digits\"\neval = false\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&p)
        .env_remove("HEARTH_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(!err.contains("pw-never-printed"), "{err}");
}

#[cfg(unix)]
#[test]
fn serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    // Pick a free port, release it, and hand it to the binary.
    let port = free_port();
    std::fs::write(
        &p,
        format!(
            "db_path = {db:?}\ndata_dir = {data:?}\n[[model]]\nname = \"digits\"\ntask = \"digits\"\neval = false\n",
            db = dir.path().join("db"),
            data = data,
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&p)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("HEARTH_ADMIN_TOKEN", "cli-test-admin-token-123")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut up = false;
    while start.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "coordinator did not start listening");
    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// Kills and reaps the child on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hearth-coordinator enroll-token`, `revoke`, `versions` and `rollback` against the running
/// binary, over TLS with the admin credential: the token enrols a device by CSR, the
/// revocation refuses its next call.
#[cfg(unix)]
#[test]
fn enroll_token_and_revoke_subcommands_talk_to_the_running_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let port = free_port();
    std::fs::write(
        &p,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndb_path = {db:?}\ndata_dir = {data:?}\n\
             [[model]]\nname = \"digits\"\ntask = \"digits\"\neval = false\n",
            db = dir.path().join("db"),
        ),
    )
    .unwrap();
    const ADMIN: &str = "cli-test-admin-token-123";
    let _server = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(&p)
            .env("HEARTH_ADMIN_TOKEN", ADMIN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    // The port is bound before the CA is created: wait for both.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || !dir.path().join("pki/ca.pem").exists()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |args: &[&str], admin: &str| {
        Command::new(BIN)
            .arg("--config")
            .arg(&p)
            .args(args)
            .env("HEARTH_ADMIN_TOKEN", admin)
            .output()
            .unwrap()
    };
    // Without the right admin credential: refused.
    let out = cli(
        &["enroll-token", "--device", "kitchen"],
        "not-the-admin-token-0000",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));

    let out = cli(
        &["enroll-token", "--device", "kitchen", "--ttl", "1h"],
        ADMIN,
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("{k} missing from {text}"))
            .to_string()
    };
    let token = field("token");
    let ca_file = field("ca_file");
    assert!(text.contains("hearth-agent --config agent.toml enroll --token"));
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let der = hearth_coordinator::pki::pem_to_der(&ca).unwrap();
    assert_eq!(
        field("ca_sha256"),
        hearth_coordinator::pki::fingerprint(&der)
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let (id, cert, key) = rt.block_on(async {
        let ch = hearth_coordinator::client::connect(&url, Some(&ca), None)
            .await
            .unwrap();
        let (key_pem, csr_pem) = {
            let key = rcgen::KeyPair::generate().unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            (key.serialize_pem(), csr.pem().unwrap())
        };
        let r = hearth_proto::v1::enrollment_client::EnrollmentClient::new(ch)
            .enroll(hearth_proto::v1::EnrollRequest {
                token: token.clone(),
                device_name: "kitchen".into(),
                csr_pem,
            })
            .await
            .unwrap()
            .into_inner();
        (r.client_id, r.client_cert_pem, key_pem)
    });
    let subscribe = || {
        rt.block_on(async {
            let ch = hearth_coordinator::client::connect(&url, Some(&ca), Some((&cert, &key)))
                .await
                .unwrap();
            hearth_proto::v1::federation_client::FederationClient::new(ch)
                .subscribe(hearth_proto::v1::SubscribeRequest::default())
                .await
                .map(|_| ())
        })
    };
    subscribe().unwrap();

    let out = cli(&["revoke", "kitchen"], ADMIN);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("revoked: {id}")
    );
    let e = subscribe().unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Revoking a device nobody enrolled as fails.
    let out = cli(&["revoke", "nobody"], ADMIN);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // `versions` lists what the coordinator holds; `rollback` refuses a version that is
    // already the latest (tests/selection.rs rolls back for real through the same call).
    let out = cli(&["versions", "digits"], ADMIN);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("version") && text.contains("fed_acc"),
        "{text}"
    );
    let v1 = text.lines().nth(1).unwrap_or_default();
    assert!(
        v1.split_whitespace().next() == Some("1") && v1.ends_with("initial"),
        "{text}"
    );
    let out = cli(&["rollback", "digits", "1"], ADMIN);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already the latest"));
    // `plot` writes an SVG (and refuses other formats); `start-round` opens a server loop.
    let svg = dir.path().join("digits.svg");
    let out = cli(&["plot", "digits", "--out", svg.to_str().unwrap()], ADMIN);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.contains("downlink"),
        "{text}"
    );
    let png = dir.path().join("digits.png");
    let out = cli(&["plot", "digits", "--out", png.to_str().unwrap()], ADMIN);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = cli(&["start-round", "digits", "--rounds", "3"], ADMIN);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("of digits open on version 1") && text.contains("2 rounds left"),
        "{text}"
    );
}
