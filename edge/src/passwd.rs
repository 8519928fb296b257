//! Mosquitto password files, read and written by Hearth: one `user:hash` line per user, the
//! hash in Mosquitto 2's `$7$` form (`$7$<iterations>$<base64 salt>$<base64 hash>`,
//! PBKDF2-HMAC-SHA512, what `mosquitto_passwd` writes). The embedded broker checks clients
//! against such a file and `hearth-hub provision-device` adds to it, so one file serves both
//! the embedded broker and a production Mosquitto (`password_file`).
//!
//! Hearth's passwords are generated ([`generate_password`]: 192 random bits), so the
//! iteration count (Mosquitto's default, 101) is not what protects them. Verification is
//! constant-time (ring). Files are written whole, mode 0600, and replaced by rename.

use std::num::NonZeroU32;
use std::path::Path;

use base64::Engine as _;
use ring::rand::SecureRandom;

use crate::Error;

/// PBKDF2 iterations of new hashes (`mosquitto_passwd`'s default).
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the operating system's random generator works");
    b
}

/// A new random password: 24 bytes, URL-safe base64 without padding (32 characters of
/// `[A-Za-z0-9_-]`, so it can stand in a URL as it is).
pub fn generate_password() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(24))
}

/// The `$7$` hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    let salt = random_bytes(SALT_LEN);
    let mut out = [0u8; HASH_LEN];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        NonZeroU32::new(ITERATIONS).expect("non-zero"),
        &salt,
        password.as_bytes(),
        &mut out,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${ITERATIONS}${}${}", b64.encode(&salt), b64.encode(out))
}

/// Whether `password` matches the `$7$` hash `encoded` (false for any other or broken form).
pub fn verify_password(encoded: &str, password: &str) -> bool {
    let mut parts = encoded.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Some(iter), Ok(salt), Ok(hash)) = (
        iter.parse::<u32>().ok().and_then(NonZeroU32::new),
        b64.decode(salt),
        b64.decode(hash),
    ) else {
        return false;
    };
    // Mosquitto caps iterations far lower; an absurd count would only cost CPU.
    if iter.get() > 1_000_000 || hash.is_empty() {
        return false;
    }
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        iter,
        &salt,
        password.as_bytes(),
        &hash,
    )
    .is_ok()
}

/// Whether `user` can be a line's user name (no `:`, no control characters or spaces).
pub fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 128
        && user
            .chars()
            .all(|c| c.is_ascii_graphic() && c != ':' && c != '#')
}

/// A Mosquitto password file in memory, lines in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    entries: Vec<(String, String)>,
}

impl PasswordFile {
    /// Parses the text of a password file (blank lines and `#` comments are skipped).
    pub fn parse(text: &str) -> Result<PasswordFile, Error> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(Error::Settings(format!(
                    "password file line {}: expected `user:hash`",
                    i + 1
                )));
            };
            if !valid_user(user) || entries.iter().any(|(u, _)| u == user) {
                return Err(Error::Settings(format!(
                    "password file line {}: invalid or repeated user name",
                    i + 1
                )));
            }
            entries.push((user.to_string(), hash.to_string()));
        }
        Ok(PasswordFile { entries })
    }

    /// Reads the file at `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<PasswordFile, Error> {
        match std::fs::read_to_string(path) {
            Ok(t) => PasswordFile::parse(&t)
                .map_err(|e| Error::Settings(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PasswordFile::default()),
            Err(e) => Err(Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            ))),
        }
    }

    /// The file's text (one `user:hash` line each).
    pub fn to_text(&self) -> String {
        self.entries
            .iter()
            .map(|(u, h)| format!("{u}:{h}\n"))
            .collect()
    }

    /// Writes the file (mode 0600) by rename, so a reader sees the old or the new file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        write_private(path, self.to_text().as_bytes())
    }

    /// Sets `user`'s password (a new `$7$` hash), adding the user if needed.
    pub fn set(&mut self, user: &str, password: &str) -> Result<(), Error> {
        if !valid_user(user) {
            return Err(Error::Settings(format!("`{user}` cannot be a user name")));
        }
        let h = hash_password(password);
        match self.entries.iter_mut().find(|(u, _)| u == user) {
            Some(e) => e.1 = h,
            None => self.entries.push((user.to_string(), h)),
        }
        Ok(())
    }

    /// Removes `user`; whether it was there.
    pub fn remove(&mut self, user: &str) -> bool {
        let n = self.entries.len();
        self.entries.retain(|(u, _)| u != user);
        n != self.entries.len()
    }

    /// Whether `user` has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.entries.iter().any(|(u, _)| u == user)
    }

    /// The user names, in file order.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(u, _)| u.as_str())
    }

    /// Whether `user` exists and `password` is theirs.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.entries
            .iter()
            .find(|(u, _)| u == user)
            .is_some_and(|(_, h)| verify_password(h, password))
    }
}

/// Writes `bytes` to `path` with mode 0600 (through a temporary file renamed over it).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    crate::fsutil::write_atomic(path, bytes, crate::fsutil::PRIVATE).map_err(Error::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_wrong_passwords_do_not() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("$7$101$"), "{h}");
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret "));
        assert!(!verify_password(&h, ""));
        assert!(!verify_password("$6$abc$def", "s3cret"));
        assert!(!verify_password("garbage", "s3cret"));
        // Two hashes of one password differ (fresh salt).
        assert_ne!(h, hash_password("s3cret"));
    }

    #[test]
    fn reads_what_mosquitto_passwd_writes() {
        // `mosquitto_passwd -c -b pw.txt alice secret` (Mosquitto 2.0.11).
        let line = "alice:$7$101$WdZn81ISFoZmFcXC$t4gqjlvUI9r3x6sEwUiSYWAf++BPl9pqpcSDNm66UrTMXKBErQYeUvag7NfnQY+U0Dd5e4rNmD/FdL1PypbYAg==\n";
        let f = PasswordFile::parse(line).unwrap();
        assert!(f.verify("alice", "secret"));
        assert!(!f.verify("alice", "Secret"));
        assert!(!f.verify("bob", "secret"));
    }

    #[test]
    fn file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        let mut f = PasswordFile::load(&p).unwrap();
        assert_eq!(f, PasswordFile::default());
        let pw = generate_password();
        assert_eq!(pw.len(), 32);
        f.set("kitchen", &pw).unwrap();
        f.set("hub", "x").unwrap();
        f.save(&p).unwrap();
        let back = PasswordFile::load(&p).unwrap();
        assert_eq!(back.users().collect::<Vec<_>>(), ["kitchen", "hub"]);
        assert!(back.verify("kitchen", &pw) && back.verify("hub", "x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(PasswordFile::parse("a:x\na:y\n").is_err());
        assert!(PasswordFile::parse("no-colon\n").is_err());
        let mut f = back;
        assert!(f.remove("hub") && !f.contains("hub"));
        assert!(f.set("bad:name", "x").is_err());
    }
}
