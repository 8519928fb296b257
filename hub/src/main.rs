//! `hearth-hub`: the hub binary. Thin: flags → [`hearth_hub::Config`] → [`hearth_hub::start`]
//! until SIGINT/SIGTERM; SIGHUP reloads the rules file. `hearth-hub rules test|check|history`
//! work on rules files and the firing history without a broker.
//!
//! Exit codes: 0 after a clean stop (and for `--help`, `--version`,
//! `--print-default-config`); 64 for a bad flag, configuration or rules file; 69 when a port
//! cannot be bound, the broker or the coordinator is unreachable.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hearth_edge::process::{init_tracing, parse_args, runtime, shutdown_signal};
use hearth_edge::{EXIT_UNAVAILABLE, EXIT_USAGE};
use hearth_hub::{BrokerConfig, Config, Error};

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
    /// Use an external broker instead of the embedded one:
    /// `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (TLS, with --ca-file).
    #[arg(long)]
    broker: Option<String>,
    /// CA certificate file (PEM) trusted for an `mqtts://` broker (overrides the configuration).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Rules file (overrides the configuration).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Serve /metrics, /devices and /healthz on this address (overrides the configuration).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The MQTT credential store directory (overrides `[mqtt_auth] dir`).
    #[arg(long, global = true)]
    credentials_dir: Option<PathBuf>,
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
        /// The coordinator's CA certificate, for https:// (default: from the configuration).
        #[arg(long)]
        coordinator_ca_file: Option<PathBuf>,
        /// Admin token (default: from the configuration).
        #[arg(long, env = "HEARTH_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Issue MQTT credentials for a device: a generated password (written 0600 to
    /// `<credentials dir>/devices/<name>.password`), its entry in the Mosquitto password file
    /// the embedded broker also uses, and its ACL entries (`<credentials dir>/acl`). Prints
    /// what the device needs. With Mosquitto, reload it afterwards.
    ProvisionDevice {
        /// Device name: its MQTT user and topic level (`hearth/<name>/…`).
        name: String,
        /// What it may do: `device` (an agent), `actuator` (a Zigbee2MQTT-style switch) or
        /// `admin` (reads everything, may request refreshes).
        #[arg(long, value_enum, default_value = "device")]
        role: hearth_hub::Role,
        /// Issue a new password for an already provisioned name.
        #[arg(long)]
        rotate: bool,
        /// Broker URL the device connects to, for the printed settings
        /// (default: from the configuration).
        #[arg(long)]
        mqtt_url: Option<String>,
    },
    /// Withdraw a device's MQTT credentials (the inverse of `provision-device`): its entry
    /// in the password file, its ACL entries and its issued password file. The embedded
    /// broker refuses its next login at once; with Mosquitto, reload it afterwards
    /// (`systemctl reload mosquitto`): it then refuses the login and disconnects the device
    /// if it is connected.
    DeprovisionDevice {
        /// Device name (its MQTT user).
        name: String,
    },
    /// Rules files and the firing history: `rules test`, `rules check`, `rules history`.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Print a refresh request for `hearth/federation/refresh`, signed with the hub's refresh
    /// key (admins only: the key is in the credential store), valid for 5 minutes, once:
    /// `mosquitto_pub -t hearth/federation/refresh -m "$(hearth-hub refresh-request plaid)"`.
    RefreshRequest {
        /// Model name.
        model: String,
    },
    /// List the devices the hub knows (its registry): kind, model and version, online
    /// state, last event. Reads `<state dir>/registry`, or asks the running hub (which holds
    /// the database) on its `metrics_listen` address.
    Devices {
        /// The hub's state directory (default: `state_dir` from the configuration).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print JSON (the `/devices` document) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<DevicesAction>,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesAction {
    /// Forget a device and remove its Home Assistant entities: `<name>`, or
    /// `hearth/<name>` / `zigbee2mqtt/<name>` when both kinds share the name. It comes back
    /// only when it publishes live again (its retained messages are ignored).
    Remove {
        /// The device.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// Which rules an event would fire and exactly what they would publish (no broker
    /// needed; conditions on device state see what `--state` gives, time conditions the
    /// current time). Exit 0, or 64 when the file or the event is invalid.
    Test {
        /// Rules file.
        file: PathBuf,
        /// The event payload as the hub's guard takes it: a verdict, e.g.
        /// '{"class":"person","score":0.9,"model":"m@1","ts":"t"}', or a camera track event
        /// (Frigate's fields, `camera` = the topic's device, optional `sub_label`/`sub_score`).
        #[arg(long)]
        event: String,
        /// The topic it arrives on.
        #[arg(long, default_value = "hearth/test-device/event/detection")]
        topic: String,
        /// A device's state for state conditions, `device={"state":"ON"}` (repeatable).
        #[arg(long = "state", value_name = "DEVICE=JSON")]
        states: Vec<String>,
        /// Actuator base topic (default: from --config, else zigbee2mqtt).
        #[arg(long)]
        actuator_base: Option<String>,
    },
    /// Validate a rules file: prints the rules, or the problem with its line (exit 64).
    Check {
        /// Rules file.
        file: PathBuf,
    },
    /// The rules' firing history, newest first: from `[rules_engine] history`, or from the
    /// running hub's `/rules/history` (metrics_listen) while it holds the database.
    History {
        /// Only this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Most entries shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The configuration from file + flags, validated (rules loaded too, so a bad rules file
/// is a configuration error).
fn load_config(cli: &Cli) -> Result<Config, Error> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(url) = &cli.broker {
        cfg.broker = match cfg.broker {
            BrokerConfig::External {
                username,
                password,
                password_file,
                ca_file,
                ..
            } => BrokerConfig::External {
                url: url.clone(),
                username,
                password,
                password_file,
                ca_file,
            },
            BrokerConfig::Embedded { .. } => BrokerConfig::external(url.clone()),
        };
    }
    if let Some(ca) = &cli.ca_file {
        match &mut cfg.broker {
            BrokerConfig::External { ca_file, .. } => *ca_file = Some(ca.clone()),
            BrokerConfig::Embedded { .. } => {
                return Err(Error::Config(
                    "--ca-file needs an external broker (--broker mqtts://…)".into(),
                ))
            }
        }
    }
    if let Some(r) = &cli.rules {
        cfg.rules = Some(r.clone());
    }
    if let Some(m) = cli.metrics_listen {
        cfg.metrics_listen = Some(m);
    }
    if let Some(d) = &cli.credentials_dir {
        cfg.mqtt_auth.dir = d.clone();
    }
    cfg.validate()?;
    if let Some(r) = &cfg.rules {
        hearth_hub::RuleSet::load(r, &cfg.actuator_base)?;
    }
    Ok(cfg)
}

fn exit_code(e: &Error) -> ExitCode {
    ExitCode::from(match e {
        Error::Config(_) | Error::Rules(_) => EXIT_USAGE,
        _ => EXIT_UNAVAILABLE,
    })
}

async fn refresh_cmd(
    cli: &Cli,
    model: &str,
    coordinator: Option<String>,
    ca_file: Option<PathBuf>,
    token: Option<String>,
) -> ExitCode {
    let file_cfg = match &cli.config {
        Some(p) => match Config::load(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("hearth-hub: {e}");
                return exit_code(&e);
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
        return ExitCode::from(EXIT_USAGE);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        eprintln!("hearth-hub refresh: coordinator `{url}` must be an http:// or https:// URL");
        return ExitCode::from(EXIT_USAGE);
    }
    if !hearth_proto::mqtt::valid_name(model) {
        eprintln!("hearth-hub refresh: `{model}` is not a valid model name");
        return ExitCode::from(EXIT_USAGE);
    }
    let ca_file = ca_file.or_else(|| {
        file_cfg
            .as_ref()
            .and_then(|c| c.coordinator_ca_file.clone())
    });
    let ca = match ca_file
        .map(|p| std::fs::read_to_string(&p).map_err(|e| (p, e)))
        .transpose()
    {
        Ok(c) => c,
        Err((p, e)) => {
            eprintln!("hearth-hub refresh: cannot read {}: {e}", p.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match hearth_hub::refresh(&url, ca.as_deref(), &token, model).await {
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

/// The configuration file (or defaults) with `--credentials-dir`, for the credential commands.
fn store_config(cli: &Cli) -> Result<Config, Error> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = &cli.credentials_dir {
        cfg.mqtt_auth.dir = d.clone();
    }
    Ok(cfg)
}

fn provision_cmd(
    cli: &Cli,
    name: &str,
    role: hearth_hub::Role,
    rotate: bool,
    mqtt_url: Option<&str>,
) -> Result<(), Error> {
    let cfg = store_config(cli)?;
    let store = hearth_hub::CredentialStore::open(&cfg.mqtt_auth.dir)?
        .with_discovery_prefix(&cfg.home_assistant.discovery_prefix);
    // The hub's own login exists too (Mosquitto needs its entry before the hub connects).
    store.ensure_hub(&cfg.actuator_base)?;
    let p = store.provision(name, role, &cfg.actuator_base, rotate)?;
    let url = match (mqtt_url, &cfg.broker) {
        (Some(u), _) => hearth_edge::MqttUrl::parse(u)?,
        (None, BrokerConfig::External { .. }) => cfg.broker.external_url()?.expect("external"),
        (None, BrokerConfig::Embedded { listen, .. }) => hearth_edge::MqttUrl {
            tls: false,
            host: if listen.ip().is_unspecified() {
                "<this hub's address>".into()
            } else {
                listen.ip().to_string()
            },
            port: listen.port(),
            username: None,
            password: None,
        },
    };
    let url = hearth_edge::MqttUrl {
        username: Some(p.user.clone()),
        password: None,
        ..url
    };
    let ca = if url.tls {
        "\n  mqtt_ca_file = \"/etc/hearth/ca.pem\"        # the CA of the broker's certificate"
    } else {
        ""
    };
    println!(
        "provisioned `{}` as {:?}\n\
         password file: {} (mode 0600; copy it to the device, e.g. /etc/hearth/mqtt.password)\n\
         device settings (agent TOML; the actuator's are `mqtt` and `password_file`):\n  \
         mqtt = \"{url}\"\n  \
         mqtt_password_file = \"/etc/hearth/mqtt.password\"{ca}\n\
         Mosquitto: {} and {} updated; reload it (systemctl reload mosquitto). The hub logs \
         in to it as `{}` with the password in {}.\n\
         The embedded broker reads {} again at the next login.",
        p.user,
        p.role,
        p.password_file.display(),
        store.passwd_path().display(),
        store.acl_path().display(),
        hearth_hub::auth::HUB_USER,
        store.hub_password_path().display(),
        store.passwd_path().display(),
    );
    Ok(())
}

fn deprovision_cmd(cli: &Cli, name: &str) -> Result<(), Error> {
    let cfg = store_config(cli)?;
    let store = hearth_hub::CredentialStore::open(&cfg.mqtt_auth.dir)?
        .with_discovery_prefix(&cfg.home_assistant.discovery_prefix);
    let d = store.deprovision(name, &cfg.actuator_base)?;
    let role = d
        .role
        .map(|r| format!("{r:?}").to_lowercase())
        .unwrap_or_else(|| "login without a role".into());
    println!(
        "deprovisioned `{}` ({role}): removed from {} and {}, {} deleted.\n\
         Mosquitto: reload it (systemctl reload mosquitto); it then refuses the login and \
         disconnects the device if it is connected.\n\
         The embedded broker refuses its next login now; a connection already open stays \
         until it ends (restart the hub to cut it at once).",
        d.user,
        store.passwd_path().display(),
        store.acl_path().display(),
        store.password_path(&d.user).display(),
    );
    Ok(())
}

fn rules_base(cli: &Cli, flag: &Option<String>) -> Result<String, Error> {
    Ok(match flag {
        Some(b) => b.clone(),
        None => store_config(cli)?.actuator_base,
    })
}

fn print_steps(steps: &[hearth_hub::rules::Step]) {
    use hearth_hub::rules::Step;
    for s in steps {
        match s {
            Step::Command { topic, payload, .. } => println!("  publish {topic} {payload}"),
            Step::Delay(d) => println!("  wait {}s", d.as_secs_f64()),
            Step::Refresh(m) => println!("  refresh model {m} (a federated round)"),
        }
    }
}

fn rules_test_cmd(
    cli: &Cli,
    file: &std::path::Path,
    event: &str,
    topic: &str,
    states: &[String],
    base: &Option<String>,
) -> Result<(), Error> {
    use hearth_hub::rules::{Env, EventFields, States};
    let base = rules_base(cli, base)?;
    let rules = hearth_hub::RuleSet::load(file, &base)?;
    let Some((device, name)) = hearth_proto::mqtt::parse_event_topic(topic) else {
        return Err(Error::Config(format!(
            "--topic `{topic}` is not an event topic hearth/<device>/event/<name>"
        )));
    };
    // The hub's own guard: a plain verdict, or a camera event (whose `camera` must be the
    // topic's device) with its head's `sub_label`.
    let inbound = hearth_proto::mqtt::parse_event(device, event.as_bytes()).map_err(|e| {
        Error::Config(format!(
            "--event: the hub would drop this event (privacy guard): {e}"
        ))
    })?;
    let ev = inbound.verdict().ok_or_else(|| {
        Error::Config("--event: the event carries no verdict the rules see".into())
    })?;
    let st = States::default();
    let now = hearth_hub::delivery::now_ms();
    for s in states {
        let Some((d, json)) = s.split_once('=') else {
            return Err(Error::Config(format!(
                "--state `{s}`: expected DEVICE=JSON"
            )));
        };
        let doc: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("--state `{s}`: {e}")))?;
        // Known for a day: `for_secs` conditions hold.
        st.set_state(d, &doc, now.saturating_sub(86_400_000));
    }
    let env = Env {
        now: std::time::Instant::now(),
        unix_ms: now,
        states: &st,
    };
    println!("event {topic} {event}");
    let mut fired = 0;
    for r in rules.rules() {
        let mut f = EventFields::inbound(device, name, &ev, &inbound, event.as_bytes());
        f.rule = &r.name;
        let verdict = r
            .explain_event(&f)
            .and_then(|()| r.conditions_hold(&env, rules.settings(), Some(ev.score), true));
        match verdict {
            Ok(()) => {
                fired += 1;
                let mut extra = String::new();
                if !r.debounce.is_zero() {
                    extra = format!(
                        " (after {}s without another trigger)",
                        r.debounce.as_secs_f64()
                    );
                }
                println!("FIRES {:?} (line {}){extra}", r.name, r.line);
                print_steps(&r.plan(&f, String::new()).steps);
            }
            Err(why) => println!("no    {:?} (line {}): {why}", r.name, r.line),
        }
    }
    println!("{fired} of {} rules would fire", rules.len());
    Ok(())
}

fn rules_check_cmd(cli: &Cli, file: &std::path::Path) -> Result<(), Error> {
    let rules = hearth_hub::RuleSet::load(file, &rules_base(cli, &None)?)?;
    for r in rules.rules() {
        println!(
            "{:?} (line {}): {} trigger, {} condition(s), {} action(s)",
            r.name,
            r.line,
            r.trigger_kind(),
            r.conditions.len(),
            r.actions.len()
        );
    }
    println!("{}: {} rules, valid", file.display(), rules.len());
    Ok(())
}

/// GET `path` from `addr` over plain HTTP/1.0 (the hub's own status endpoint).
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.take(64 << 20).read_to_string(&mut body)?;
    let (head, rest) = body
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("").to_string(),
        ));
    }
    Ok(rest.to_string())
}

fn rules_history_cmd(cli: &Cli, rule: Option<&str>, limit: usize, json: bool) -> Result<(), Error> {
    let cfg = store_config(cli)?;
    let Some(path) = &cfg.rules_engine.history else {
        return Err(Error::Config(
            "no [rules_engine] history in the configuration: the history is not persisted".into(),
        ));
    };
    let list = match hearth_hub::rules::history::open_tree(Some(path)) {
        Ok(tree) => hearth_hub::rules::history::list(&tree, rule, limit),
        Err(open_err) => {
            // The running hub holds the database: ask it.
            let Some(addr) = cfg.metrics_listen else {
                return Err(Error::Io(std::io::Error::other(format!(
                    "{open_err} (a running hub holds it; set metrics_listen to read it from the hub)"
                ))));
            };
            let mut q = format!("/rules/history?limit={limit}");
            if let Some(r) = rule {
                q.push_str("&rule=");
                for b in r.bytes() {
                    if b.is_ascii_alphanumeric() {
                        q.push(b as char);
                    } else {
                        q.push_str(&format!("%{b:02X}"));
                    }
                }
            }
            let body = http_get(addr, &q).map_err(|e| {
                Error::Io(std::io::Error::other(format!(
                    "{open_err}; and the hub at {addr}: {e}"
                )))
            })?;
            serde_json::from_str(&body)
                .map_err(|e| Error::Io(std::io::Error::other(format!("hub answered: {e}"))))?
        }
    };
    for f in &list {
        if json {
            println!("{}", serde_json::to_string(f).expect("serialises"));
            continue;
        }
        let secs = f.at_ms / 1000;
        let (d, t) = (secs / 86_400, secs % 86_400);
        println!(
            "#{} day {} {:02}:{:02}:{:02}.{:03} UTC {:?} ({})",
            f.seq,
            d,
            t / 3600,
            t / 60 % 60,
            t % 60,
            f.at_ms % 1000,
            f.rule,
            f.trigger
        );
        for c in &f.commands {
            if c.after_secs > 0.0 {
                println!("  +{}s {} {}", c.after_secs, c.topic, c.payload);
            } else {
                println!("  {} {}", c.topic, c.payload);
            }
        }
        for m in &f.refresh {
            println!("  refresh {m}");
        }
    }
    if list.is_empty() {
        println!("no firings recorded");
    }
    Ok(())
}

fn refresh_request_cmd(cli: &Cli, model: &str) -> Result<(), Error> {
    if !hearth_proto::mqtt::valid_name(model) {
        return Err(Error::Config(format!(
            "`{model}` is not a valid model name"
        )));
    }
    let cfg = store_config(cli)?;
    let store = hearth_hub::CredentialStore::open(&cfg.mqtt_auth.dir)?;
    let req = hearth_hub::auth::sign_refresh(&store.refresh_key()?, model);
    println!(
        "{}",
        serde_json::to_string(&req).expect("a refresh request serialises")
    );
    Ok(())
}

/// Where the registry is: the state directory, or the running hub's status endpoint.
enum RegistryAccess {
    Local(Box<hearth_hub::Registry>),
    Remote(std::net::SocketAddr),
}

fn open_registry(cli: &Cli, state_dir: Option<&PathBuf>) -> Result<RegistryAccess, String> {
    let cfg = match &cli.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let dir = state_dir.or(cfg.state_dir.as_ref()).ok_or(
        "no state directory: give --state-dir or `state_dir` in --config (without one the \
         registry lives in the running hub's memory: GET /devices on its metrics_listen)",
    )?;
    match hearth_hub::Registry::open(dir) {
        Ok(r) => Ok(RegistryAccess::Local(Box::new(r))),
        Err(hearth_hub::registry::RegistryError::Locked(p)) => match cfg.metrics_listen {
            Some(a) => Ok(RegistryAccess::Remote(a)),
            None => Err(format!(
                "{p} is in use by the running hub, and it serves no status endpoint \
                 (metrics_listen) to ask instead"
            )),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// One HTTP/1.1 request to the running hub's status endpoint (loopback); the status and body.
fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let t = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, t)
        .map_err(|e| format!("the hub's status endpoint {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(t));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(64 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| format!("reading the answer of {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr} did not answer HTTP"))?;
    Ok((code, body.to_string()))
}

fn devices_cmd(
    cli: &Cli,
    state_dir: Option<&PathBuf>,
    json: bool,
    action: Option<&DevicesAction>,
) -> ExitCode {
    let fail = |m: String| {
        eprintln!("hearth-hub devices: {m}");
        ExitCode::from(EXIT_UNAVAILABLE)
    };
    let access = match open_registry(cli, state_dir) {
        Ok(a) => a,
        Err(m) => return fail(m),
    };
    match (action, access) {
        (Some(DevicesAction::Remove { id }), RegistryAccess::Local(r)) => match r.remove_id(id) {
            Some(d) => {
                r.flush_sync();
                println!(
                    "removed {}/{} (its Home Assistant entities go when the hub next starts)",
                    d.source.as_str(),
                    d.name
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("hearth-hub devices remove: no device `{id}`");
                ExitCode::from(EXIT_USAGE)
            }
        },
        (Some(DevicesAction::Remove { id }), RegistryAccess::Remote(a)) => {
            let path = format!("/devices/{}", percent_path(id));
            match http(a, "DELETE", &path) {
                Ok((200, body)) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((404, _)) => {
                    eprintln!("hearth-hub devices remove: no device `{id}`");
                    ExitCode::from(EXIT_USAGE)
                }
                Ok((code, body)) => fail(format!("the hub answered {code}: {}", body.trim())),
                Err(m) => fail(m),
            }
        }
        (None, access) => {
            let devices = match access {
                RegistryAccess::Local(r) => r.snapshot(),
                RegistryAccess::Remote(a) => match http(a, "GET", "/devices") {
                    Ok((200, body)) => match serde_json::from_str(&body) {
                        Ok(d) => d,
                        Err(e) => return fail(format!("unreadable /devices answer: {e}")),
                    },
                    Ok((code, _)) => return fail(format!("the hub answered {code}")),
                    Err(m) => return fail(m),
                },
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&devices).expect("devices serialise")
                );
            } else {
                print!(
                    "{}",
                    hearth_hub::registry::table(&devices, hearth_hub::delivery::now_ms())
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// `id` for a URL path segment (friendly names may hold spaces and slashes).
fn percent_path(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let cli: Cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.print_default_config {
        print!("{}", Config::default_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Devices {
        state_dir,
        json,
        action,
    }) = &cli.command
    {
        init_tracing("warn");
        return devices_cmd(&cli, state_dir.as_ref(), *json, action.as_ref());
    }
    // rumqttd logs clean disconnects as errors: silenced unless RUST_LOG asks for it.
    init_tracing("info,rumqttd=off");
    let credential_cmd = match &cli.command {
        Some(Command::ProvisionDevice {
            name,
            role,
            rotate,
            mqtt_url,
        }) => Some(provision_cmd(
            &cli,
            name,
            *role,
            *rotate,
            mqtt_url.as_deref(),
        )),
        Some(Command::DeprovisionDevice { name }) => Some(deprovision_cmd(&cli, name)),
        Some(Command::RefreshRequest { model }) => Some(refresh_request_cmd(&cli, model)),
        Some(Command::Rules { command }) => Some(match command {
            RulesCommand::Test {
                file,
                event,
                topic,
                states,
                actuator_base,
            } => rules_test_cmd(&cli, file, event, topic, states, actuator_base),
            RulesCommand::Check { file } => rules_check_cmd(&cli, file),
            RulesCommand::History { rule, limit, json } => {
                rules_history_cmd(&cli, rule.as_deref(), *limit, *json)
            }
        }),
        _ => None,
    };
    if let Some(r) = credential_cmd {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hearth-hub: {e}");
                exit_code(&e)
            }
        };
    }
    // Two worker threads unless tokio's own TOKIO_WORKER_THREADS says otherwise.
    let workers = std::env::var_os("TOKIO_WORKER_THREADS")
        .is_none()
        .then_some(2);
    let rt = match runtime("hearth-hub", workers) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if let Some(Command::Refresh {
        model,
        coordinator,
        coordinator_ca_file,
        admin_token,
    }) = &cli.command
    {
        return rt.block_on(refresh_cmd(
            &cli,
            model,
            coordinator.clone(),
            coordinator_ca_file.clone(),
            admin_token.clone(),
        ));
    }
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth-hub: {e}");
            return exit_code(&e);
        }
    };
    rt.block_on(async move {
        let signal = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hearth-hub: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut hangup =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("hearth-hub: cannot install the SIGHUP handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let hub = match hearth_hub::start(cfg).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("start-up failed: {e}");
                eprintln!("hearth-hub: {e}");
                return exit_code(&e);
            }
        };
        tokio::pin!(signal);
        loop {
            tokio::select! {
                _ = &mut signal => break,
                Some(()) = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the rules");
                    // Errors are logged and counted by the engine; the last good rules stay.
                    let _ = hub.reload_rules();
                }
            }
        }
        hub.shutdown().await;
        ExitCode::SUCCESS
    })
}
