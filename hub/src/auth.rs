//! MQTT credentials of a home: the credential store the hub keeps in `[mqtt_auth] dir`, the
//! Mosquitto ACL file generated from it, and signed refresh requests.
//!
//! ```text
//! <dir>/                     0750
//!   passwd                   0640  Mosquitto password file ($7$ hashes): the embedded broker's
//!                                  logins, and Mosquitto's `password_file`
//!   acl                      0640  Mosquitto `acl_file`, generated from `roles`
//!   roles                    0600  `<name> <role>` per principal (device, actuator, admin)
//!   hub.password             0600  the hub's own password (user `hearth-hub`)
//!   refresh.key              0600  HMAC key of MQTT refresh requests (admins only)
//!   devices/<name>.password  0600  what `provision-device` issued, to copy to the device
//! ```
//!
//! The hub creates the directory, its own login and the refresh key on first start;
//! [`CredentialStore::provision`] (`hearth-hub provision-device`) adds principals and
//! [`CredentialStore::deprovision`] (`hearth-hub deprovision-device`) withdraws them. Passwords
//! are generated (192 bits) and only their hashes are in `passwd`. The ACL gives each role the
//! topics of `ARCHITECTURE.md`'s table: a device writes only `hearth/<name>/…` and reads its
//! own topics and model announcements; an actuator also its own `<base>/<name>` state and
//! availability, reading its `<base>/<name>/set`; only the hub writes `<base>/+/set` and model
//! announcements; only admins write `hearth/federation/refresh`; admins (a user, Home
//! Assistant) also write `hearth/<device>/feedback`, the labels a device reads from its own
//! subtree.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hearth_edge::passwd::{self, PasswordFile};
use hearth_proto::mqtt::{reserved_name, valid_name, RefreshRequest, ROOT};
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The hub's own MQTT user.
pub const HUB_USER: &str = "hearth-hub";
/// How far a signed refresh request's time may be from the hub's clock.
pub const REFRESH_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Nonces remembered against replays (each is only valid within the window anyway).
const NONCES_KEPT: usize = 4096;

/// What a principal may do on the broker (Mosquitto ACLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A device agent: publishes under `hearth/<name>/…`.
    Device,
    /// A Zigbee2MQTT-style actuator (Hearth's virtual switch): its `hearth/<name>/…`, its
    /// `<base>/<name>` state and availability, reads its `<base>/<name>/set`.
    Actuator,
    /// A person or tool (Home Assistant): reads everything, may request refreshes.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Actuator => "actuator",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "device" => Some(Role::Device),
            "actuator" => Some(Role::Actuator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What [`CredentialStore::provision`] issued.
#[derive(Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// MQTT user name (the device's name).
    pub user: String,
    /// The generated password (also in [`Provisioned::password_file`]).
    pub password: String,
    /// The 0600 file holding the password.
    pub password_file: PathBuf,
    /// The role granted.
    pub role: Role,
}

impl std::fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioned")
            .field("user", &self.user)
            .field("password_file", &self.password_file)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What [`CredentialStore::deprovision`] withdrew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprovisioned {
    /// The MQTT user name removed.
    pub user: String,
    /// The role it had (`None`: only a `passwd` entry, added by hand).
    pub role: Option<Role>,
}

/// The credential store in one directory (see the module documentation).
#[derive(Debug, Clone)]
pub struct CredentialStore {
    dir: PathBuf,
    /// Home Assistant's discovery prefix, for the ACL's discovery topics.
    discovery_prefix: String,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn edge(e: hearth_edge::Error) -> Error {
    Error::Io(std::io::Error::other(e.to_string()))
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    passwd::write_private(path, bytes).map_err(edge)?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    }
    let _ = (path, mode);
    Ok(())
}

impl CredentialStore {
    /// Opens (creating it, mode 0750) the store at `dir`.
    pub fn open(dir: &Path) -> Result<CredentialStore, Error> {
        let devices = dir.join("devices");
        std::fs::create_dir_all(&devices)
            .map_err(io(format!("cannot create {}", devices.display())))?;
        set_mode(dir, 0o750)?;
        set_mode(&devices, 0o700)?;
        Ok(CredentialStore {
            dir: dir.to_path_buf(),
            discovery_prefix: crate::discovery::DEFAULT_PREFIX.into(),
        })
    }

    /// The store with Home Assistant's discovery prefix (`homeassistant` by default), used
    /// in the ACL it writes.
    pub fn with_discovery_prefix(mut self, prefix: &str) -> CredentialStore {
        self.discovery_prefix = prefix.to_string();
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The Mosquitto password file.
    pub fn passwd_path(&self) -> PathBuf {
        self.dir.join("passwd")
    }
    /// The Mosquitto ACL file.
    pub fn acl_path(&self) -> PathBuf {
        self.dir.join("acl")
    }
    fn roles_path(&self) -> PathBuf {
        self.dir.join("roles")
    }
    /// The hub's own password file.
    pub fn hub_password_path(&self) -> PathBuf {
        self.dir.join("hub.password")
    }
    /// The refresh key file.
    pub fn refresh_key_path(&self) -> PathBuf {
        self.dir.join("refresh.key")
    }
    /// Where `provision` puts `name`'s password.
    pub fn password_path(&self, name: &str) -> PathBuf {
        self.dir.join("devices").join(format!("{name}.password"))
    }

    fn passwd(&self) -> Result<PasswordFile, Error> {
        PasswordFile::load(&self.passwd_path()).map_err(edge)
    }

    fn save_passwd(&self, f: &PasswordFile) -> Result<(), Error> {
        write_mode(&self.passwd_path(), f.to_text().as_bytes(), 0o640)
    }

    /// Every provisioned principal and its role.
    pub fn roles(&self) -> Result<BTreeMap<String, Role>, Error> {
        let p = self.roles_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io(format!("cannot read {}", p.display()))(e)),
        };
        let mut out = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line
                .split_once(' ')
                .map(|(n, r)| (n, Role::parse(r.trim())))
            {
                Some((n, Some(r))) if valid_name(n) => {
                    out.insert(n.to_string(), r);
                }
                _ => {
                    return Err(Error::Config(format!(
                        "{} line {}: expected `<name> device|actuator|admin`",
                        p.display(),
                        i + 1
                    )))
                }
            }
        }
        Ok(out)
    }

    fn save_roles(&self, roles: &BTreeMap<String, Role>) -> Result<(), Error> {
        let text: String = roles
            .iter()
            .map(|(n, r)| format!("{n} {}\n", r.as_str()))
            .collect();
        write_mode(&self.roles_path(), text.as_bytes(), 0o600)
    }

    /// The hub's password: read, or generated on first start; its `passwd` entry is (re)set
    /// when missing or different, and the ACL file rewritten for `actuator_base`.
    pub fn ensure_hub(&self, actuator_base: &str) -> Result<String, Error> {
        let path = self.hub_password_path();
        let pw = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            Ok(_) => return Err(Error::Config(format!("{} is empty", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pw = passwd::generate_password();
                write_mode(&path, format!("{pw}\n").as_bytes(), 0o600)?;
                tracing::info!(file = %path.display(), "generated the hub's MQTT password");
                pw
            }
            Err(e) => return Err(io(format!("cannot read {}", path.display()))(e)),
        };
        let mut f = self.passwd()?;
        if !f.verify(HUB_USER, &pw) {
            f.set(HUB_USER, &pw).map_err(edge)?;
            self.save_passwd(&f)?;
        }
        self.write_acl(actuator_base)?;
        Ok(pw)
    }

    /// The refresh key: read, or generated (32 random bytes, hex) on first use.
    pub fn refresh_key(&self) -> Result<Vec<u8>, Error> {
        let path = self.refresh_key_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => hex::decode(t.trim())
                .ok()
                .filter(|k| k.len() >= 16)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{} must hold at least 16 bytes as hex",
                        path.display()
                    ))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = passwd::random_bytes(32);
                write_mode(&path, format!("{}\n", hex::encode(&key)).as_bytes(), 0o600)?;
                tracing::info!(file = %path.display(), "generated the MQTT refresh key");
                Ok(key)
            }
            Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
        }
    }

    /// Issues credentials for `name` with `role`: a new password (in
    /// [`CredentialStore::password_path`]), its `passwd` entry, its role and the ACL file.
    /// An already provisioned name is refused unless `rotate` (new password, role updated).
    pub fn provision(
        &self,
        name: &str,
        role: Role,
        actuator_base: &str,
        rotate: bool,
    ) -> Result<Provisioned, Error> {
        if !valid_name(name) || reserved_name(name) {
            return Err(Error::Config(format!(
                "`{name}` cannot be a device name: use 1-64 characters of [A-Za-z0-9_-], \
                 not `federation` or `{HUB_USER}`"
            )));
        }
        let mut roles = self.roles()?;
        if roles.contains_key(name) && !rotate {
            return Err(Error::Config(format!(
                "`{name}` is already provisioned (add --rotate to issue a new password)"
            )));
        }
        let password = passwd::generate_password();
        let password_file = self.password_path(name);
        write_mode(&password_file, format!("{password}\n").as_bytes(), 0o600)?;
        let mut f = self.passwd()?;
        f.set(name, &password).map_err(edge)?;
        self.save_passwd(&f)?;
        roles.insert(name.to_string(), role);
        self.save_roles(&roles)?;
        self.write_acl(actuator_base)?;
        Ok(Provisioned {
            user: name.to_string(),
            password,
            password_file,
            role,
        })
    }

    /// Withdraws `name`'s credentials, the inverse of [`CredentialStore::provision`]: its
    /// `passwd` entry first (the login is what matters: the embedded broker re-reads the file
    /// at the next login, Mosquitto at its next reload), then its role and its ACL entries
    /// (the ACL file rewritten), then the issued password file. Every file is replaced
    /// atomically. An unknown name is refused, and so are the hub's own login and the reserved
    /// names; a login added to `passwd` by hand (no role) is removed too.
    pub fn deprovision(&self, name: &str, actuator_base: &str) -> Result<Deprovisioned, Error> {
        if !passwd::valid_user(name) || reserved_name(name) {
            return Err(Error::Config(format!(
                "`{name}` cannot be deprovisioned: not a device name (`federation` and \
                 `{HUB_USER}` are reserved)"
            )));
        }
        let mut roles = self.roles()?;
        let mut f = self.passwd()?;
        let role = roles.remove(name);
        let had_login = f.remove(name);
        if role.is_none() && !had_login {
            return Err(Error::Config(format!("`{name}` is not provisioned")));
        }
        if had_login {
            self.save_passwd(&f)?;
        }
        if role.is_some() {
            self.save_roles(&roles)?;
        }
        self.write_acl(actuator_base)?;
        let issued = self.password_path(name);
        match std::fs::remove_file(&issued) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("cannot remove {}", issued.display()))(e)),
        }
        Ok(Deprovisioned {
            user: name.to_string(),
            role,
        })
    }

    /// Rewrites the ACL file from the roles.
    pub fn write_acl(&self, actuator_base: &str) -> Result<(), Error> {
        let text = acl_text_with(&self.roles()?, actuator_base, &self.discovery_prefix);
        write_mode(&self.acl_path(), text.as_bytes(), 0o640)
    }
}

/// The Mosquitto ACL file for `roles` (and the hub), with the default discovery prefix.
pub fn acl_text(roles: &BTreeMap<String, Role>, base: &str) -> String {
    acl_text_with(roles, base, crate::discovery::DEFAULT_PREFIX)
}

/// The Mosquitto ACL file for `roles` (and the hub); `prefix` is Home Assistant's discovery
/// prefix.
pub fn acl_text_with(roles: &BTreeMap<String, Role>, base: &str, prefix: &str) -> String {
    let mut s = String::from(
        "# Mosquitto acl_file generated by hearth-hub (provision-device); do not edit by hand.\n\
         # Anything not granted here is denied.\n\n",
    );
    s += &format!(
        "user {HUB_USER}\n\
         topic read {ROOT}/+/event/+\n\
         topic read {ROOT}/+/meta\n\
         topic read {ROOT}/+/availability\n\
         topic read {ROOT}/federation/refresh\n\
         topic write {ROOT}/federation/model/+\n\
         topic write {base}/+/set\n\
         topic write {base}/+/get\n\
         topic read {base}/+/availability\n\
         topic read {base}/+\n\
         topic read {base}/bridge/state\n\
         topic read {base}/bridge/devices\n\
         topic write {prefix}/+/hearth/+/config\n\
         topic read {prefix}/status\n\
         topic write {ROOT}/hearth-hub/state\n\
         topic write {ROOT}/hearth-hub/status\n\
         topic read {ROOT}/hearth-hub/refresh/+\n\n"
    );
    for (name, role) in roles {
        s += &format!("# {}\nuser {name}\n", role.as_str());
        match role {
            Role::Device | Role::Actuator => {
                s += &format!(
                    "topic write {ROOT}/{name}/#\n\
                     topic read {ROOT}/{name}/#\n\
                     topic read {ROOT}/federation/model/+\n"
                );
                if *role == Role::Actuator {
                    s += &format!(
                        "topic write {base}/{name}\n\
                         topic write {base}/{name}/availability\n\
                         topic read {base}/{name}/set\n\
                         topic read {base}/{name}/get\n\
                         topic write {prefix}/+/hearth/{name}/config\n\
                         topic read {prefix}/status\n"
                    );
                }
            }
            Role::Admin => {
                s += &format!(
                    "topic read #\ntopic write {ROOT}/federation/refresh\n\
                     topic write {ROOT}/+/feedback\n\
                     topic write {ROOT}/hearth-hub/refresh/+\n"
                );
            }
        }
        s += "\n";
    }
    s
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A refresh request for `model` signed with `key` now.
pub fn sign_refresh(key: &[u8], model: &str) -> RefreshRequest {
    sign_refresh_at(key, model, now_ms(), &hex::encode(passwd::random_bytes(16)))
}

fn sign_refresh_at(key: &[u8], model: &str, ts: u64, nonce: &str) -> RefreshRequest {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mac = hmac::sign(&k, RefreshRequest::signed_text(model, ts, nonce).as_bytes());
    RefreshRequest {
        model: model.to_string(),
        ts: Some(ts),
        nonce: Some(nonce.to_string()),
        mac: Some(hex::encode(mac.as_ref())),
    }
}

fn button_text(model: &str) -> String {
    format!("hearth-button-v1\n{model}")
}

/// Checks signed refresh requests: the HMAC, the time window and unseen nonces. With a
/// nonce file ([`RefreshVerifier::persistent`]) the nonces seen within the window survive a
/// restart of the hub, so a captured request cannot be replayed right after one.
pub struct RefreshVerifier {
    key: hmac::Key,
    seen: Mutex<HashMap<String, u64>>,
    file: Option<PathBuf>,
}

/// File name of the persisted refresh nonces in the credentials directory.
pub const REFRESH_NONCES_FILE: &str = "refresh-nonces.json";

impl std::fmt::Debug for RefreshVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshVerifier").finish_non_exhaustive()
    }
}

impl RefreshVerifier {
    /// A verifier for `key`.
    pub fn new(key: &[u8]) -> RefreshVerifier {
        RefreshVerifier {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            seen: Mutex::new(HashMap::new()),
            file: None,
        }
    }

    /// The `payload_press` of the Home Assistant refresh button for `model` (hex
    /// HMAC-SHA256 of `hearth-button-v1\n<model>` under the refresh key): only who can read
    /// the button's retained discovery config (Home Assistant, admins) knows it.
    pub fn button_token(&self, model: &str) -> String {
        hex::encode(hmac::sign(&self.key, button_text(model).as_bytes()).as_ref())
    }

    /// Whether `payload` is the button token of `model` (constant-time comparison).
    pub fn verify_button(&self, model: &str, payload: &[u8]) -> bool {
        let Ok(mac) = std::str::from_utf8(payload).map(hex::decode) else {
            return false;
        };
        mac.is_ok_and(|mac| hmac::verify(&self.key, button_text(model).as_bytes(), &mac).is_ok())
    }

    /// A verifier for `key` whose seen nonces are kept in `file` (JSON, mode 0600, rewritten
    /// on each accepted request): the ones still within the window at start are refused as
    /// replays. An unreadable or corrupt file is an error (starting without it would reopen
    /// the replay window).
    pub fn persistent(key: &[u8], file: &Path) -> Result<RefreshVerifier, Error> {
        let mut v = RefreshVerifier::new(key);
        let now = now_ms();
        match std::fs::read(file) {
            Ok(bytes) => {
                let seen: HashMap<String, u64> = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Config(format!("refresh nonces {}: {e}", file.display()))
                })?;
                v.seen = Mutex::new(
                    seen.into_iter()
                        .filter(|(_, t)| t.abs_diff(now) <= REFRESH_WINDOW_MS)
                        .take(NONCES_KEPT)
                        .collect(),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io(e)),
        }
        v.file = Some(file.to_path_buf());
        Ok(v)
    }

    /// `Ok` when `req` is signed with the key, within [`REFRESH_WINDOW_MS`] of `now_ms` and
    /// its nonce is new (then remembered); otherwise why not.
    pub fn verify(&self, req: &RefreshRequest, now_ms: u64) -> Result<(), &'static str> {
        let (Some(ts), Some(nonce), Some(mac)) = (req.ts, &req.nonce, &req.mac) else {
            return Err("not signed (needs ts, nonce and mac)");
        };
        if nonce.is_empty() || nonce.len() > 64 {
            return Err("bad nonce");
        }
        let mac = hex::decode(mac).map_err(|_| "mac is not hex")?;
        hmac::verify(
            &self.key,
            RefreshRequest::signed_text(&req.model, ts, nonce).as_bytes(),
            &mac,
        )
        .map_err(|_| "wrong signature")?;
        if ts.abs_diff(now_ms) > REFRESH_WINDOW_MS {
            return Err("signed too long ago (or the clocks differ)");
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| t.abs_diff(now_ms) <= REFRESH_WINDOW_MS);
        if seen.contains_key(nonce) {
            return Err("replayed");
        }
        if seen.len() >= NONCES_KEPT {
            return Err("too many refresh requests in the window");
        }
        seen.insert(nonce.clone(), ts);
        if let Some(file) = &self.file {
            // Written before the request is obeyed: if it cannot be recorded, it is refused.
            let json = serde_json::to_vec(&*seen).unwrap_or_default();
            if let Err(e) = passwd::write_private(file, &json) {
                tracing::warn!(error = %e, "cannot record a refresh nonce; request refused");
                seen.remove(nonce);
                return Err("cannot record its nonce");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_once_and_only_with_the_key() {
        let key = b"0123456789abcdef0123456789abcdef";
        let v = RefreshVerifier::new(key);
        let now = now_ms();
        let r = sign_refresh(key, "plaid");
        assert_eq!(v.verify(&r, now), Ok(()));
        assert_eq!(v.verify(&r, now), Err("replayed"));
        let mut other = r.clone();
        other.model = "faces".into();
        assert_eq!(v.verify(&other, now), Err("wrong signature"));
        let forged = sign_refresh(b"not the key, not the key, not it", "plaid");
        assert_eq!(v.verify(&forged, now), Err("wrong signature"));
        assert!(v
            .verify(&RefreshRequest::unsigned("plaid"), now)
            .unwrap_err()
            .contains("not signed"));
        let old = sign_refresh_at(key, "plaid", now - REFRESH_WINDOW_MS - 1, "n1");
        assert!(v.verify(&old, now).unwrap_err().contains("too long ago"));
        // Through JSON, as on the wire.
        let r = sign_refresh(key, "plaid");
        let back: RefreshRequest =
            serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(v.verify(&back, now), Ok(()));
    }

    #[test]
    fn provisioning_writes_passwords_roles_and_acls() {
        let dir = tempfile::tempdir().unwrap();
        let s = CredentialStore::open(&dir.path().join("mqtt")).unwrap();
        let hub = s.ensure_hub("z2m").unwrap();
        assert_eq!(s.ensure_hub("z2m").unwrap(), hub, "stable across starts");
        let p = s.provision("kitchen", Role::Device, "z2m", false).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p.password_file).unwrap().trim(),
            p.password
        );
        let f = PasswordFile::load(&s.passwd_path()).unwrap();
        assert!(f.verify("kitchen", &p.password) && f.verify(HUB_USER, &hub));
        assert!(!f.verify("kitchen", &hub));
        assert!(s.provision("kitchen", Role::Device, "z2m", false).is_err());
        let p2 = s.provision("kitchen", Role::Device, "z2m", true).unwrap();
        assert_ne!(p2.password, p.password);
        assert!(!PasswordFile::load(&s.passwd_path())
            .unwrap()
            .verify("kitchen", &p.password));
        for bad in ["federation", HUB_USER, "a/b", "+", ""] {
            assert!(
                s.provision(bad, Role::Device, "z2m", false).is_err(),
                "{bad}"
            );
        }
        s.provision("lamp", Role::Actuator, "z2m", false).unwrap();
        s.provision("me", Role::Admin, "z2m", false).unwrap();
        let acl = std::fs::read_to_string(s.acl_path()).unwrap();
        assert!(
            acl.contains("user kitchen\ntopic write hearth/kitchen/#\n"),
            "{acl}"
        );
        assert!(acl.contains("user lamp\n") && acl.contains("topic read z2m/lamp/set\n"));
        assert!(acl.contains("topic write z2m/+/set\n"));
        assert!(acl.contains(
            "user me\ntopic read #\ntopic write hearth/federation/refresh\n\
             topic write hearth/+/feedback\n"
        ));
        // Only the hub's and admins' sections mention the refresh topic or `+/set`.
        let kitchen = acl
            .split("user kitchen")
            .nth(1)
            .unwrap()
            .split("\n\n")
            .next()
            .unwrap();
        assert!(
            !kitchen.contains("refresh") && !kitchen.contains("/set"),
            "{kitchen}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&p2.password_file), 0o600);
            assert_eq!(mode(&s.hub_password_path()), 0o600);
            assert_eq!(mode(&s.passwd_path()), 0o640);
            let _ = s.refresh_key().unwrap();
            assert_eq!(mode(&s.refresh_key_path()), 0o600);
        }
        assert_eq!(s.refresh_key().unwrap(), s.refresh_key().unwrap());
    }

    #[test]
    fn deprovisioning_removes_the_login_the_role_the_acl_entries_and_the_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = CredentialStore::open(&dir.path().join("mqtt")).unwrap();
        let hub = s.ensure_hub("z2m").unwrap();
        let cam = s.provision("kitchen", Role::Device, "z2m", false).unwrap();
        let lamp = s.provision("lamp", Role::Actuator, "z2m", false).unwrap();
        let gone = s.deprovision("lamp", "z2m").unwrap();
        assert_eq!(gone.role, Some(Role::Actuator));
        let f = PasswordFile::load(&s.passwd_path()).unwrap();
        assert!(!f.contains("lamp") && !f.verify("lamp", &lamp.password));
        assert!(f.verify("kitchen", &cam.password) && f.verify(HUB_USER, &hub));
        assert!(!s.roles().unwrap().contains_key("lamp"));
        let acl = std::fs::read_to_string(s.acl_path()).unwrap();
        assert!(
            !acl.contains("user lamp") && !acl.contains("z2m/lamp"),
            "{acl}"
        );
        assert!(acl.contains("user kitchen\ntopic write hearth/kitchen/#\n"));
        assert!(!lamp.password_file.exists());
        assert!(cam.password_file.exists());
        // Once only; the hub's own login and reserved or malformed names are refused.
        for bad in ["lamp", "nobody", HUB_USER, "federation", "a:b", ""] {
            assert!(
                matches!(s.deprovision(bad, "z2m"), Err(Error::Config(_))),
                "{bad}"
            );
        }
        assert!(PasswordFile::load(&s.passwd_path())
            .unwrap()
            .verify(HUB_USER, &hub));
        // A login added by hand (no role) is removed as well.
        let mut f = PasswordFile::load(&s.passwd_path()).unwrap();
        f.set("by-hand", "pw").unwrap();
        f.save(&s.passwd_path()).unwrap();
        assert_eq!(s.deprovision("by-hand", "z2m").unwrap().role, None);
        assert!(!PasswordFile::load(&s.passwd_path())
            .unwrap()
            .contains("by-hand"));
        // Provisioned again later: a new password, which works.
        let again = s.provision("lamp", Role::Actuator, "z2m", false).unwrap();
        assert!(PasswordFile::load(&s.passwd_path())
            .unwrap()
            .verify("lamp", &again.password));
    }
}
