//! The configuration files the project ships are accepted by the loaders of the binaries that
//! read them, and every shipped rule can fire: its event name is one an agent emits and its
//! class is a class of that agent's task (PLAID appliances, faces, digits), as vendored in
//! `data/<task>/classes.txt`.

use std::path::{Path, PathBuf};

use hearth_hub::rules::{Pattern, Rule};
use hearth_hub::RuleSet;
use hearth_model::Task;

const TASKS: [Task; 3] = [Task::Plaid, Task::Faces, Task::Digits];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The event name an agent of `task` publishes under (`hearth/<device>/event/<name>`).
fn event_name(task: Task) -> String {
    hearth_agent::Config {
        task: task.to_string(),
        ..hearth_agent::Config::default()
    }
    .event_name()
}

/// The verdicts a learning camera's head can put in `sub_label`: the classes of every
/// vendored task that takes BlazeFace's embedding (`data/faces-cam`).
fn head_classes() -> Vec<String> {
    let t = hearth_model::TaskSpec::resolve("faces-cam", &repo().join("data")).unwrap();
    assert!(
        hearth_agent::camera::is_camera_head(&t),
        "faces-cam is a camera head"
    );
    t.classes
}

/// Why no agent of any task can trigger `rule`, or `None` when one can.
fn unreachable(rule: &Rule) -> Option<String> {
    let mut why = Vec::new();
    // A camera agent (`[camera]` source kind) publishes its `event` with its `label` as class,
    // and, when it learns, its head's verdict as `sub_label`; only camera events carry one.
    let cam = hearth_camera::CameraConfig::default();
    let heads = head_classes();
    let sub_ok = rule
        .sub_label
        .as_ref()
        .is_none_or(|p| heads.iter().any(|c| p.matches(c)));
    if rule.event.matches(&cam.event) && rule.class.matches(&cam.label) && sub_ok {
        return None;
    }
    if !sub_ok {
        return Some(format!(
            "a camera head's sub_label is one of {} (data/faces-cam)",
            heads.join(", ")
        ));
    }
    if rule.sub_label.is_some() {
        return Some(format!(
            "only camera events (`{}` of class `{}`) carry a sub_label",
            cam.event, cam.label
        ));
    }
    why.push(format!(
        "camera agents publish `{}` events of class `{}`",
        cam.event, cam.label
    ));
    for task in TASKS {
        let name = event_name(task);
        let classes = task.classes();
        if !rule.event.matches(&name) {
            why.push(format!("{task} agents publish `{name}` events"));
        } else if !classes.iter().any(|c| rule.class.matches(c)) {
            why.push(format!("{task} classes are {}", classes.join(", ")));
        } else {
            return None;
        }
    }
    Some(why.join("; "))
}

fn check_rules(rules: &RuleSet, origin: &str) {
    assert!(!rules.is_empty(), "{origin}: no rules");
    for r in rules.rules() {
        if let Some(why) = unreachable(r) {
            panic!(
                "{origin}: rule {:?} (event {:?}, class {:?}) can never fire: {why}",
                r.name, r.event, r.class
            );
        }
    }
}

#[test]
fn every_shipped_config_loads_with_its_binary_loader() {
    let dir = repo().join("deploy/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    // `hearth_hub::Config::load` reads and validates; the rules use its actuator base.
    let hub = hearth_hub::Config::load(&dir.join("hub.toml")).expect("deploy/config/hub.toml");
    let mut seen = Vec::new();
    for p in &files {
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        let shown = p.display();
        match stem.as_str() {
            "hub" => {} // loaded (and validated) above
            "agent" => {
                let c = hearth_agent::Config::load(p).unwrap_or_else(|e| panic!("{shown}: {e}"));
                c.validate().unwrap_or_else(|e| panic!("{shown}: {e}"));
            }
            "coordinator" => {
                let c =
                    hearth_coordinator::Config::load(p).unwrap_or_else(|e| panic!("{shown}: {e}"));
                c.validate().unwrap_or_else(|e| panic!("{shown}: {e}"));
            }
            "rules" => {
                let rules =
                    RuleSet::load(p, &hub.actuator_base).unwrap_or_else(|e| panic!("{shown}: {e}"));
                check_rules(&rules, &shown.to_string());
            }
            other => panic!("{shown}: no loader known for `{other}.toml`; add it to this test"),
        }
        seen.push(stem);
    }
    assert_eq!(seen, ["agent", "coordinator", "hub", "rules"]);
}

/// The shipped hub and coordinator run side by side on one Raspberry Pi (the packages put
/// both configs in /etc/hearth): no two of their listeners may share an address, or the
/// second service to start fails to bind (exit 69).
#[test]
fn shipped_services_on_one_machine_do_not_share_a_listen_address() {
    let dir = repo().join("deploy/config");
    let hub = hearth_hub::Config::load(&dir.join("hub.toml")).expect("hub.toml");
    let coord = hearth_coordinator::Config::load(&dir.join("coordinator.toml")).expect("coord");
    let mut listeners = vec![
        ("coordinator listen", coord.listen.clone()),
        ("coordinator metrics_listen", coord.metrics_listen.clone()),
    ];
    if let Some(a) = hub.metrics_listen {
        listeners.push(("hub metrics_listen", a.to_string()));
    }
    if let hearth_hub::BrokerConfig::Embedded { listen, .. } = &hub.broker {
        listeners.push(("hub [broker] listen", listen.to_string()));
    }
    let mut seen = std::collections::BTreeMap::new();
    for (what, addr) in listeners.into_iter().filter(|(_, a)| !a.is_empty()) {
        if let Some(first) = seen.insert(addr.clone(), what) {
            panic!("{first} and {what} both listen on {addr}");
        }
    }
}

#[test]
fn shipped_rules_use_real_classes_and_event_names() {
    let base = hearth_hub::Config::default().actuator_base;
    let example = repo().join("hub/rules.example.toml");
    let rules = RuleSet::load(&example, &base).expect("hub/rules.example.toml");
    check_rules(&rules, "hub/rules.example.toml");
    let demo = RuleSet::parse(hearth_demo::DEMO_RULES, "demo rules", &base).unwrap();
    check_rules(&demo, "hearth_demo::DEMO_RULES");
}

#[test]
fn task_classes_match_the_vendored_data() {
    for task in TASKS {
        let path = repo().join("data").join(task.name()).join("classes.txt");
        let text = std::fs::read_to_string(&path).unwrap();
        let on_disk: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(on_disk, task.classes(), "{}", path.display());
    }
}

#[test]
fn a_rule_on_a_head_verdict_no_camera_gives_is_reported() {
    let base = hearth_hub::Config::default().actuator_base;
    let rule = |when: &str| {
        let text = format!(
            "[[rule]]\nname = \"x\"\n[rule.when]\n{when}\n[rule.then]\nactuator = \"a\"\npayload = {{ state = \"ON\" }}\n"
        );
        let rules = RuleSet::parse(&text, "test", &base).unwrap();
        unreachable(&rules.rules()[0])
    };
    assert_eq!(rule("label = \"face\"\nsub_label = \"person\""), None);
    let why = rule("label = \"face\"\nsub_label = \"Person\"").expect("no head says Person");
    assert!(why.contains("none, person"), "{why}");
    let why = rule("class = \"person\"\nsub_label = \"person\"").expect("not a camera class");
    assert!(why.contains("only camera events"), "{why}");
}

#[test]
fn a_rule_on_a_class_no_task_has_is_reported() {
    let base = hearth_hub::Config::default().actuator_base;
    let text = "[[rule]]\nname = \"kettle\"\n[rule.when]\nclass = \"kettle\"\n\
                [rule.then]\nactuator = \"fan\"\npayload = { state = \"ON\" }\n";
    let rules = RuleSet::parse(text, "test", &base).unwrap();
    let why = unreachable(&rules.rules()[0]).expect("kettle is no class of any task");
    assert!(why.contains("hairdryer"), "{why}");
    // A class of one task under another task's event name cannot fire either.
    let text = "[[rule]]\nname = \"x\"\n[rule.when]\nevent = \"appliance\"\nclass = \"person\"\n\
                [rule.then]\nactuator = \"fan\"\npayload = { state = \"ON\" }\n";
    let rules = RuleSet::parse(text, "test", &base).unwrap();
    assert!(unreachable(&rules.rules()[0]).is_some());
    assert!(matches!(rules.rules()[0].class, Pattern::Exact(_)));
}

/// `key=value` settings of a unit file's `[Service]` section (repeated keys concatenated).
fn service_settings(text: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.entry(k.trim().into())
                    .or_default()
                    .push(v.trim().into());
            }
        }
    }
    out
}

#[test]
fn systemd_units_run_hardened_as_a_dedicated_user() {
    let required: &[(&str, &str)] = &[
        ("User", "hearth"),
        ("Group", "hearth"),
        ("StateDirectory", "hearth"),
        ("StateDirectoryMode", "0700"),
        ("ConfigurationDirectory", "hearth"),
        ("ReadWritePaths", "/var/lib/hearth"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("PrivateMounts", "yes"),
        ("RemoveIPC", "yes"),
        ("UMask", "0077"),
    ];
    let dir = repo().join("deploy/systemd");
    let mut units = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        units += 1;
        let s = service_settings(&std::fs::read_to_string(&path).unwrap());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (k, want) in required {
            let got = s.get(*k).map(|v| v.as_slice()).unwrap_or_default();
            assert!(
                got.iter().any(|v| v == want),
                "{name}: {k}={want} missing (has {got:?})"
            );
        }
        // Writable: the state directory only; no capabilities; never root.
        assert_eq!(s["ReadWritePaths"], vec!["/var/lib/hearth"], "{name}");
        assert!(!s.contains_key("ReadWriteDirectories"), "{name}");
        assert_eq!(s["CapabilityBoundingSet"], vec![""], "{name}");
        assert_ne!(s["User"], vec!["root"], "{name} must not run as root");
    }
    assert_eq!(units, 3, "every binary ships a unit");
}
