//! The agent's persisted state directory: enrollment credentials, the current
//! global model (ONNX bytes + version) and, per federated model, one
//! [`FedState`] file: the committed error-feedback residual, the rounds already
//! joined and the update of the round in flight (see [`PendingUpdate`]). Every
//! write is atomic (temp file + rename), so a crash leaves either the old or the
//! new file; what must change together lives in one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hearth_model::bytes::{DecodeError, Put, Reader};
use hearth_model::{Tensor, Weights};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// Identity obtained at enrollment (stored in `credentials.json`, mode 0600; `Debug` leaves
/// the secrets out).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Coordinator URL the identity belongs to.
    pub coordinator: String,
    pub client_id: String,
    /// Insecure (`http://`) coordinators: the shared key sent with every call.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_key: String,
    /// The coordinator's model-signing public key (hex) received at enrolment: the key every
    /// model must be signed with. Absent in credentials from before model signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_signing_key: Option<String>,
    /// TLS: the client certificate the coordinator's CA issued (CN = `client_id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_pem: String,
    /// TLS: the private key generated on this device for `cert_pem`; it never leaves it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_pem: String,
    /// TLS: the coordinator's CA certificate (as returned at enrolment).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("coordinator", &self.coordinator)
            .field("client_id", &self.client_id)
            .field("client_key", &"<redacted>")
            .field("model_signing_key", &self.model_signing_key)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// Description of a persisted model file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub model: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
    /// Signed lineage: the version this one succeeds.
    #[serde(default)]
    pub parent_version: u64,
    /// The coordinator's signature (hex) it was verified with before it was stored.
    #[serde(default)]
    pub signature: String,
}

/// A model download in progress (see [`StateDir::load_download`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialDownload {
    /// Version, announced size and digest.
    pub meta: ModelMeta,
    /// The bytes received so far.
    pub bytes: Vec<u8>,
}

/// How many joined round ids are remembered per model.
const MAX_ROUNDS_KEPT: usize = 256;
const RESIDUAL_MAGIC: &[u8; 8] = b"HRESID01";
const FED_MAGIC: &[u8; 8] = b"HFEDST01";

/// An update trained for one round whose outcome is not known yet: what was (or is
/// being) uploaded, byte for byte, and the error-feedback residual that becomes the
/// committed one only if the round completes (a failed round rolls it back).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpdate {
    pub round_id: u64,
    pub base_version: u64,
    /// The round's deadline (Unix ms; 0 = none announced).
    pub deadline_unix_ms: u64,
    /// Whether the coordinator acknowledged the upload (accepted or duplicate).
    pub acked: bool,
    pub num_samples: u64,
    pub train_loss: f32,
    /// The encoded update, re-sent unchanged on every retry (uploads are idempotent).
    pub payload: Vec<u8>,
    /// The residual after this update (error feedback of what the payload left out).
    pub residual: Weights,
    /// Federated evaluation of the base version on the held-out share, sent with the
    /// update: (samples, mean loss, accuracy); samples 0 = none.
    pub eval: (u64, f32, f32),
}

/// Everything the agent keeps about its part in the federation of one model,
/// saved as one file so that its parts never disagree after a crash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FedState {
    /// The error-feedback residual matching what the coordinator aggregated.
    pub residual: Option<Weights>,
    /// Rounds this device's update was acknowledged in (the latest few).
    pub joined: Vec<u64>,
    /// The update of the round in flight, if any.
    pub pending: Option<PendingUpdate>,
}

impl FedState {
    /// Records round `id` as joined (keeps the latest few).
    pub fn join(&mut self, id: u64) {
        if !self.joined.contains(&id) {
            self.joined.push(id);
        }
        if self.joined.len() > MAX_ROUNDS_KEPT {
            let cut = self.joined.len() - MAX_ROUNDS_KEPT;
            self.joined.drain(..cut);
        }
    }

    /// Binary form: magic, joined ids, then the residual and the pending update, each
    /// behind a presence byte (weights as [`encode_weights`], length-prefixed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_bytes(FED_MAGIC);
        out.put_u32(self.joined.len() as u32);
        for &id in &self.joined {
            out.put_u64(id);
        }
        let put_blob = |out: &mut Vec<u8>, b: &[u8]| {
            out.put_u64(b.len() as u64);
            out.put_bytes(b);
        };
        match &self.residual {
            None => out.put_u8(0),
            Some(w) => {
                out.put_u8(1);
                put_blob(&mut out, &encode_weights(w));
            }
        }
        match &self.pending {
            None => out.put_u8(0),
            Some(p) => {
                out.put_u8(1);
                out.put_u64(p.round_id);
                out.put_u64(p.base_version);
                out.put_u64(p.deadline_unix_ms);
                out.put_u8(u8::from(p.acked));
                out.put_u64(p.num_samples);
                out.put_f32(p.train_loss);
                put_blob(&mut out, &p.payload);
                put_blob(&mut out, &encode_weights(&p.residual));
                // A trailing section (files written before it end here).
                if p.eval.0 > 0 {
                    out.put_u64(p.eval.0);
                    out.put_f32(p.eval.1);
                    out.put_f32(p.eval.2);
                }
            }
        }
        out
    }

    /// Inverse of [`FedState::encode`], with bounds checks on every length.
    pub fn decode(b: &[u8]) -> Result<FedState, Error> {
        let bad = |e: DecodeError| Error::State(format!("federation state file: {e}"));
        let mut r = Reader::new(b);
        r.expect(FED_MAGIC, "a federation state file")
            .map_err(bad)?;
        let n = r.u32_len("round count", b.len() / 8).map_err(bad)?;
        let mut joined = Vec::with_capacity(n);
        for _ in 0..n {
            joined.push(r.u64().map_err(bad)?);
        }
        let flag = |r: &mut Reader| match r.u8().map_err(bad)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::State(format!("federation state file: flag {v}"))),
        };
        let blob = |r: &mut Reader<'_>| -> Result<Vec<u8>, Error> {
            let len = r.u64_len("blob length", b.len()).map_err(bad)?;
            Ok(r.take(len).map_err(bad)?.to_vec())
        };
        let residual = if flag(&mut r)? {
            Some(decode_weights(&blob(&mut r)?)?)
        } else {
            None
        };
        let pending = if flag(&mut r)? {
            Some(PendingUpdate {
                round_id: r.u64().map_err(bad)?,
                base_version: r.u64().map_err(bad)?,
                deadline_unix_ms: r.u64().map_err(bad)?,
                acked: flag(&mut r)?,
                num_samples: r.u64().map_err(bad)?,
                train_loss: r.f32().map_err(bad)?,
                payload: blob(&mut r)?,
                residual: decode_weights(&blob(&mut r)?)?,
                eval: if r.remaining() > 0 {
                    (
                        r.u64().map_err(bad)?,
                        r.f32().map_err(bad)?,
                        r.f32().map_err(bad)?,
                    )
                } else {
                    (0, 0.0, 0.0)
                },
            })
        } else {
            None
        };
        r.finish().map_err(bad)?;
        Ok(FedState {
            residual,
            joined,
            pending,
        })
    }
}

/// A state directory on disk.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Hex SHA-256 of `b`.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

impl StateDir {
    /// Opens (creating if needed) a state directory.
    /// It holds the device's credentials, so it is made private to the agent's user (0700).
    pub fn open(root: &Path) -> Result<StateDir, Error> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(root, e))?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn read_opt(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let p = self.path(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(p, e)),
        }
    }

    fn write_atomic(&self, name: &str, bytes: &[u8], private: bool) -> Result<(), Error> {
        use hearth_edge::fsutil::{write_atomic, PRIVATE, SHARED};
        let p = self.path(name);
        write_atomic(&p, bytes, if private { PRIVATE } else { SHARED })
            .map_err(|e| Error::io(&p, e))
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.read_opt(name)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::State(format!("{name}: {e}"))),
        }
    }

    /// Stored credentials, if any.
    pub fn load_credentials(&self) -> Result<Option<Credentials>, Error> {
        self.read_json("credentials.json")
    }

    /// Stores credentials (file mode 0600).
    pub fn save_credentials(&self, c: &Credentials) -> Result<(), Error> {
        let b = serde_json::to_vec_pretty(c).expect("credentials serialise");
        self.write_atomic("credentials.json", &b, true)
    }

    /// The stored model `name`, verified against its recorded size and digest.
    pub fn load_model(&self, name: &str) -> Result<Option<(ModelMeta, Vec<u8>)>, Error> {
        let Some(meta) = self.read_json::<ModelMeta>(&format!("model-{name}.json"))? else {
            return Ok(None);
        };
        let Some(bytes) = self.read_opt(&format!("model-{name}.onnx"))? else {
            return Ok(None);
        };
        if bytes.len() as u64 != meta.size_bytes || sha256_hex(&bytes) != meta.sha256 {
            return Err(Error::Integrity(format!(
                "stored model {name} v{} does not match its digest",
                meta.version
            )));
        }
        Ok(Some((meta, bytes)))
    }

    /// Stores a model: bytes first, then the description that points at them.
    pub fn save_model(&self, meta: &ModelMeta, bytes: &[u8]) -> Result<(), Error> {
        self.write_atomic(&format!("model-{}.onnx", meta.model), bytes, false)?;
        let b = serde_json::to_vec_pretty(meta).expect("meta serialises");
        self.write_atomic(&format!("model-{}.json", meta.model), &b, false)
    }

    /// The federation state of model `name` (empty if none is stored). A state directory
    /// written before the single file existed is read from its separate residual and
    /// round files.
    pub fn load_federation(&self, name: &str) -> Result<FedState, Error> {
        if let Some(b) = self.read_opt(&format!("federation-{name}.bin"))? {
            return FedState::decode(&b);
        }
        let residual = match self.read_opt(&format!("residual-{name}.bin"))? {
            None => None,
            Some(b) => Some(decode_weights(&b)?),
        };
        let joined = self
            .read_json::<Vec<u64>>(&format!("rounds-{name}.json"))?
            .unwrap_or_default();
        Ok(FedState {
            residual,
            joined,
            pending: None,
        })
    }

    /// Stores the federation state of model `name`: one file, replaced atomically.
    pub fn save_federation(&self, name: &str, s: &FedState) -> Result<(), Error> {
        self.write_atomic(&format!("federation-{name}.bin"), &s.encode(), false)
    }

    /// The download of model `name` in progress, if any: its version, size, digest and the
    /// bytes received so far (a torn tail is caught by the digest check at the end).
    pub fn load_download(&self, name: &str) -> Result<Option<PartialDownload>, Error> {
        let Some(meta) = self.read_json::<ModelMeta>(&format!("download-{name}.json"))? else {
            return Ok(None);
        };
        let bytes = self
            .read_opt(&format!("download-{name}.part"))?
            .unwrap_or_default();
        if bytes.len() as u64 > meta.size_bytes {
            return Ok(None);
        }
        Ok(Some(PartialDownload { meta, bytes }))
    }

    /// Starts recording the download of `meta` (its size and digest are the announced ones).
    pub fn begin_download(&self, meta: &ModelMeta) -> Result<(), Error> {
        self.write_atomic(&format!("download-{}.part", meta.model), b"", false)?;
        let b = serde_json::to_vec_pretty(meta).expect("meta serialises");
        self.write_atomic(&format!("download-{}.json", meta.model), &b, false)
    }

    /// Appends received bytes to the download of model `name`.
    pub fn append_download(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        use std::io::Write;
        let p = self.path(&format!("download-{name}.part"));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&p, e))
    }

    /// Forgets the download of model `name` (finished or unusable).
    pub fn clear_download(&self, name: &str) -> Result<(), Error> {
        for f in [
            format!("download-{name}.json"),
            format!("download-{name}.part"),
        ] {
            let p = self.path(&f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(p, e)),
            }
        }
        Ok(())
    }

    /// The committed error-feedback residual of model `name`.
    pub fn load_residual(&self, name: &str) -> Result<Option<Weights>, Error> {
        Ok(self.load_federation(name)?.residual)
    }

    /// Round ids of model `name` this device's update was acknowledged in.
    pub fn load_rounds(&self, name: &str) -> Result<Vec<u64>, Error> {
        Ok(self.load_federation(name)?.joined)
    }
}

/// Little-endian binary form of a weight map: magic, count, then per tensor
/// name length, name, rank, dims, values.
pub fn encode_weights(w: &Weights) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + w.values().map(|t| t.data.len() * 4 + 64).sum::<usize>());
    out.put_bytes(RESIDUAL_MAGIC);
    out.put_u32(w.len() as u32);
    for (name, t) in w {
        out.put_state_header(name, &t.shape);
        for &v in &t.data {
            out.put_f32(v);
        }
    }
    out
}

/// Inverse of [`encode_weights`], with bounds checks on every length.
pub fn decode_weights(b: &[u8]) -> Result<Weights, Error> {
    let bad = |e: DecodeError| Error::State(format!("residual file: {e}"));
    let mut r = Reader::new(b);
    r.expect(RESIDUAL_MAGIC, "a residual file").map_err(bad)?;
    // Every tensor takes at least 8 bytes, which bounds the count by the input size.
    let n = r.u32_len("tensor count", b.len() / 8).map_err(bad)?;
    let mut w = BTreeMap::new();
    for _ in 0..n {
        let (name, shape) = r.state_header(8, b.len() / 4).map_err(bad)?;
        let data = r.f32s(shape.iter().product()).map_err(bad)?;
        w.insert(name, Tensor::new(shape, data));
    }
    r.finish().map_err(bad)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights() -> Weights {
        let mut w = Weights::new();
        w.insert(
            "fc1.weight".into(),
            Tensor::new(vec![2, 3], vec![1.0, -2.5, 0.0, 3.25, 1e-7, -0.0]),
        );
        w.insert("fc1.bias".into(), Tensor::new(vec![2], vec![0.5, -0.5]));
        w
    }

    #[test]
    fn residual_round_trips_and_rejects_corruption() {
        let b = encode_weights(&weights());
        assert_eq!(decode_weights(&b).unwrap(), weights());
        assert!(decode_weights(&b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode_weights(&extra).is_err());
        assert!(decode_weights(b"HRESID02\0\0\0\0").is_err());
    }

    #[test]
    fn model_and_credentials_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(&dir.path().join("nested")).unwrap();
        assert!(s.load_model("faces").unwrap().is_none());
        let bytes = b"not really onnx but bytes".to_vec();
        let meta = ModelMeta {
            model: "faces".into(),
            version: 3,
            sha256: sha256_hex(&bytes),
            size_bytes: bytes.len() as u64,
            parent_version: 2,
            signature: "ab".repeat(64),
        };
        s.save_model(&meta, &bytes).unwrap();
        let (m, b) = s.load_model("faces").unwrap().unwrap();
        assert_eq!((m, b), (meta.clone(), bytes));
        // A corrupted file is detected.
        std::fs::write(dir.path().join("nested/model-faces.onnx"), b"tampered").unwrap();
        assert!(matches!(s.load_model("faces"), Err(Error::Integrity(_))));

        let c = Credentials {
            coordinator: "http://127.0.0.1:50051".into(),
            client_id: "c1".into(),
            client_key: "k".into(),
            model_signing_key: Some("cd".repeat(32)),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
            ca_pem: String::new(),
        };
        s.save_credentials(&c).unwrap();
        assert_eq!(s.load_credentials().unwrap(), Some(c.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("nested/credentials.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "credentials readable by others");
            let mode = std::fs::metadata(dir.path().join("nested"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "state directory open to others");
            // A stale temporary left world-readable by a crash does not leak the next write.
            let tmp = dir.path().join("nested/.credentials.json.tmp");
            std::fs::write(&tmp, b"stale").unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
            s.save_credentials(&c).unwrap();
            let mode = std::fs::metadata(dir.path().join("nested/credentials.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "credentials written through a stale temporary"
            );
        }
    }

    #[test]
    fn federation_state_round_trips_in_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.load_federation("faces").unwrap(), FedState::default());
        let mut f = FedState::default();
        f.join(4);
        f.join(4);
        f.join(9);
        assert_eq!(f.joined, vec![4, 9]);
        f.residual = Some(weights());
        f.pending = Some(PendingUpdate {
            round_id: 10,
            base_version: 3,
            deadline_unix_ms: 1_700_000_000_000,
            acked: true,
            num_samples: 42,
            train_loss: 0.25,
            payload: b"encoded update".to_vec(),
            residual: weights(),
            eval: (0, 0.0, 0.0),
        });
        s.save_federation("faces", &f).unwrap();
        assert_eq!(s.load_federation("faces").unwrap(), f);
        // With a federated evaluation (a trailing section).
        f.pending.as_mut().unwrap().eval = (7, 0.5, 0.75);
        s.save_federation("faces", &f).unwrap();
        assert_eq!(s.load_federation("faces").unwrap(), f);
        assert_eq!(s.load_residual("faces").unwrap(), Some(weights()));
        assert_eq!(s.load_rounds("faces").unwrap(), vec![4, 9]);
        let b = f.encode();
        assert!(FedState::decode(&b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(FedState::decode(&extra).is_err());
    }

    #[test]
    fn legacy_residual_and_round_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("residual-faces.bin"),
            encode_weights(&weights()),
        )
        .unwrap();
        std::fs::write(dir.path().join("rounds-faces.json"), b"[3,5]").unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let f = s.load_federation("faces").unwrap();
        assert_eq!((f.residual, f.joined), (Some(weights()), vec![3, 5]));
    }
}
