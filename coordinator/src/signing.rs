//! The coordinator's model-signing key: created on first start (32 random bytes, hex, in a file
//! of mode 0600 beside the database; its public half in `<file>.pub`), loaded afterwards, and
//! used to sign every version it publishes ([`hearth_proto::signing`]). Versions stored before
//! signing existed are signed at start-up, each with the version before it as its parent.

use std::path::{Path, PathBuf};

use hearth_proto::signing::{hex_decode, hex_encode, ModelSigner, ModelStatement, SECRET_KEY_LEN};
use rand::RngCore;

use crate::store::{Store, VersionMeta};
use crate::Error;

fn init(m: String) -> Error {
    Error::Init(m)
}

/// Where the public half of the key at `path` is written.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// Loads the signing key at `path`, or creates it when the file does not exist — unless
/// `store` already holds signed versions: a new key would make every enrolled agent refuse
/// the coordinator's next models, so a lost key file stops the start-up instead.
pub fn load_or_create(path: &Path, store: &Store, models: &[String]) -> Result<ModelSigner, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            check_private(path)?;
            let secret: [u8; SECRET_KEY_LEN] = hex_decode(text.trim())
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    init(format!(
                        "signing key file {} does not hold 64 hex characters",
                        path.display()
                    ))
                })?;
            let signer = ModelSigner::from_secret(&secret);
            tracing::info!(
                file = %path.display(),
                public_key = %hex_encode(&signer.public_key()),
                "model signing key loaded"
            );
            Ok(signer)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            for m in models {
                if store.versions(m)?.iter().any(|v| !v.signature.is_empty()) {
                    return Err(init(format!(
                        "signing key file {} is missing but the database holds versions of {m} \
                         signed with it: restore the file (a new key would make every enrolled \
                         agent refuse the next models)",
                        path.display()
                    )));
                }
            }
            let mut secret = [0u8; SECRET_KEY_LEN];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let signer = ModelSigner::from_secret(&secret);
            write_new(path, hex_encode(&secret).as_bytes(), true)?;
            let public = hex_encode(&signer.public_key());
            write_new(
                &public_key_path(path),
                format!("{public}\n").as_bytes(),
                false,
            )?;
            tracing::info!(
                file = %path.display(), public_key = %public,
                "created the model signing key (agents pin its public half at enrolment)"
            );
            Ok(signer)
        }
        Err(e) => Err(init(format!(
            "cannot read signing key file {}: {e}",
            path.display()
        ))),
    }
}

/// Refuses a key file that others than its owner may read.
fn check_private(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| init(format!("{}: {e}", path.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(init(format!(
                "signing key file {} has mode {:o}: others may read it; chmod 600 it",
                path.display(),
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `bytes` to a temporary file (mode 0600 when `private`), syncs it and renames it
/// into place, so a crash never leaves half a key.
fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), Error> {
    use hearth_edge::fsutil::{write_atomic, PRIVATE, SHARED};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| init(format!("{}: {e}", dir.display())))?;
    }
    write_atomic(path, bytes, if private { PRIVATE } else { SHARED })
        .map_err(|e| init(format!("cannot write {}: {e}", path.display())))
}

/// Signs `meta` (its model, version, parent version and recorded digest) in place.
pub(crate) fn sign(signer: &ModelSigner, meta: &mut VersionMeta) -> Result<(), Error> {
    let s = ModelStatement::with_hex_digest(
        &meta.model,
        meta.version,
        meta.parent_version,
        &meta.sha256,
    )
    .map_err(|e| Error::Internal(format!("cannot sign {}: {e}", meta.model)))?;
    meta.signature = hex_encode(&signer.sign(&s));
    Ok(())
}

/// Signs the stored versions of `models` that carry no signature (written before signing
/// existed): the parent of each is the version before it. The digest is recomputed from the
/// stored bytes, so a record that disagrees with its bytes is not signed.
pub(crate) fn sign_unsigned(
    signer: &ModelSigner,
    store: &Store,
    models: &[String],
) -> Result<(), Error> {
    for m in models {
        let mut parent = 0;
        for mut meta in store.versions(m)? {
            let version = meta.version;
            if meta.signature.is_empty() {
                let bytes = store
                    .model_bytes(m, version)?
                    .ok_or_else(|| init(format!("bytes of {m} version {version} are missing")))?;
                let digest = crate::state::sha256_hex(&bytes);
                if !digest.eq_ignore_ascii_case(&meta.sha256) {
                    return Err(init(format!(
                        "{m} version {version}: stored bytes do not match the recorded sha256"
                    )));
                }
                meta.parent_version = parent;
                sign(signer, &mut meta)?;
                store.update_version_meta(&meta)?;
                tracing::info!(model = %m, version, parent, "signed a version stored before model signing");
            }
            parent = version;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::signing::ModelVerifier;

    fn meta(v: u64) -> VersionMeta {
        VersionMeta {
            model: "m".into(),
            version: v,
            sha256: crate::state::sha256_hex(&[v as u8]),
            size_bytes: 1,
            eval_accuracy: None,
            created_unix_ms: 0,
            from_round: 0,
            parent_version: 0,
            signature: String::new(),
            ..VersionMeta::default()
        }
    }

    #[test]
    fn key_is_created_private_reloaded_and_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let path = dir.path().join("keys/signing-key");
        let models = vec!["m".to_string()];
        let a = load_or_create(&path, &store, &models).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let public = std::fs::read_to_string(public_key_path(&path)).unwrap();
        assert_eq!(public.trim(), hex_encode(&a.public_key()));
        let b = load_or_create(&path, &store, &models).unwrap();
        assert_eq!(a.public_key(), b.public_key(), "the key survives a restart");

        // A key file others can read is refused.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = load_or_create(&path, &store, &models).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }

        // Unsigned versions (an older database) are signed at start-up, in a chain.
        for v in [1u64, 2] {
            store.put_version(&meta(v), &[v as u8]).unwrap();
        }
        sign_unsigned(&a, &store, &models).unwrap();
        let verifier = ModelVerifier::from_bytes(&a.public_key()).unwrap();
        for (v, parent) in [(1u64, 0u64), (2, 1)] {
            let m = store.version("m", v).unwrap().unwrap();
            assert_eq!(m.parent_version, parent);
            let s = ModelStatement::for_bytes("m", v, parent, &[v as u8]);
            verifier
                .verify(&s, &hex_decode(&m.signature).unwrap())
                .unwrap();
        }

        // With signed versions stored, a lost key file is not silently replaced.
        std::fs::remove_file(&path).unwrap();
        let e = load_or_create(&path, &store, &models).unwrap_err();
        assert!(e.to_string().contains("restore the file"), "{e}");
        assert!(!path.exists());
    }
}
