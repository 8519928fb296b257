//! Model signatures: the coordinator signs every published model version
//! with its ed25519 key; agents verify it against the key they pinned at enrolment.
//!
//! What is signed is a [`ModelStatement`] — model name, version, parent version and the SHA-256
//! of the ONNX bytes — as one domain-separated canonical message:
//!
//! ```text
//! "hearth-model-signature-v1\0" || model (UTF-8) || 0x00 || version (u64 BE) || parent (u64 BE) || sha256 (32 bytes)
//! ```
//!
//! Everything after the model name has a fixed length (49 bytes), so the message is unambiguous
//! whatever bytes the name holds. The parent is the version that was current when this one was
//! published (0 for a model's first version); a rollback is a new version with older bytes whose
//! parent is the version it replaces, signed the same way.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain separator: no other Hearth signature can be mistaken for a model signature.
pub const DOMAIN: &[u8] = b"hearth-model-signature-v1\0";
/// Length of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of a secret key (the ed25519 seed).
pub const SECRET_KEY_LEN: usize = 32;

/// Why a key or a signature was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// The key bytes are not an ed25519 public key.
    #[error("not an ed25519 public key ({0})")]
    BadKey(String),
    /// The signature does not have 64 bytes.
    #[error("signature has {0} bytes, expected 64")]
    SignatureLength(usize),
    /// The digest is not 64 hex characters.
    #[error("digest {0:?} is not a hex SHA-256")]
    BadDigest(String),
    /// The signature does not verify with this key over this statement.
    #[error("signature does not verify with the pinned key")]
    Invalid,
}

/// What a model signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatement {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// The version this one succeeds (0 for the first).
    pub parent: u64,
    /// SHA-256 of the ONNX bytes.
    pub sha256: [u8; 32],
}

impl ModelStatement {
    /// A statement about `bytes` (hashes them).
    pub fn for_bytes(model: &str, version: u64, parent: u64, bytes: &[u8]) -> ModelStatement {
        ModelStatement {
            model: model.to_string(),
            version,
            parent,
            sha256: Sha256::digest(bytes).into(),
        }
    }

    /// A statement with the digest given as hex.
    pub fn with_hex_digest(
        model: &str,
        version: u64,
        parent: u64,
        sha256_hex: &str,
    ) -> Result<ModelStatement, SignError> {
        let bad = || SignError::BadDigest(sha256_hex.to_string());
        let v = hex_decode(sha256_hex).ok_or_else(bad)?;
        Ok(ModelStatement {
            model: model.to_string(),
            version,
            parent,
            sha256: v.try_into().map_err(|_| bad())?,
        })
    }

    /// The canonical message that is signed.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + self.model.len() + 49);
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(self.model.as_bytes());
        m.push(0);
        m.extend_from_slice(&self.version.to_be_bytes());
        m.extend_from_slice(&self.parent.to_be_bytes());
        m.extend_from_slice(&self.sha256);
        m
    }
}

/// The coordinator's signing key.
pub struct ModelSigner(SigningKey);

impl std::fmt::Debug for ModelSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ModelSigner")
            .field(&hex_encode(&self.public_key()))
            .finish()
    }
}

impl ModelSigner {
    /// The key with this 32-byte secret (seed). Give it uniformly random bytes.
    pub fn from_secret(secret: &[u8; SECRET_KEY_LEN]) -> ModelSigner {
        ModelSigner(SigningKey::from_bytes(secret))
    }

    /// The public key agents pin.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `s`.
    pub fn sign(&self, s: &ModelStatement) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&s.message()).to_bytes()
    }
}

/// A pinned public key that checks model signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVerifier(VerifyingKey);

impl ModelVerifier {
    /// Parses a 32-byte public key (refuses weak keys: small-order points).
    pub fn from_bytes(b: &[u8]) -> Result<ModelVerifier, SignError> {
        let a: [u8; PUBLIC_KEY_LEN] = b
            .try_into()
            .map_err(|_| SignError::BadKey(format!("{} bytes, expected 32", b.len())))?;
        let k = VerifyingKey::from_bytes(&a).map_err(|e| SignError::BadKey(e.to_string()))?;
        if k.is_weak() {
            return Err(SignError::BadKey("small-order point".into()));
        }
        Ok(ModelVerifier(k))
    }

    /// Parses a public key written as 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<ModelVerifier, SignError> {
        let b = hex_decode(s.trim())
            .ok_or_else(|| SignError::BadKey("expected 64 hex characters".into()))?;
        Self::from_bytes(&b)
    }

    /// The key's bytes.
    pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0.to_bytes()
    }

    /// The key as hex.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.to_bytes())
    }

    /// Checks `signature` over `s` (strict verification: no malleable signatures).
    pub fn verify(&self, s: &ModelStatement, signature: &[u8]) -> Result<(), SignError> {
        let sig: [u8; SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| SignError::SignatureLength(signature.len()))?;
        let sig = Signature::from_bytes(&sig);
        self.0
            .verify_strict(&s.message(), &sig)
            .map_err(|_| SignError::Invalid)
    }
}

/// Lower-case hex of `b`.
pub fn hex_encode(b: &[u8]) -> String {
    hex::encode(b)
}

/// Bytes of an even-length hex string (either case), or `None`.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> ModelStatement {
        ModelStatement::for_bytes("faces", 7, 6, b"onnx bytes")
    }

    #[test]
    fn canonical_message_layout() {
        let s = statement();
        let m = s.message();
        let digest: [u8; 32] = Sha256::digest(b"onnx bytes").into();
        let mut want = b"hearth-model-signature-v1\0faces\0".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 6]);
        want.extend_from_slice(&digest);
        assert_eq!(m, want);
        // Every field changes the message.
        let mut other = s.clone();
        other.model = "face".into();
        assert_ne!(other.message(), m);
        let mut other = s.clone();
        other.version = 8;
        assert_ne!(other.message(), m);
        let mut other = s.clone();
        other.parent = 5;
        assert_ne!(other.message(), m);
        let mut other = s.clone();
        other.sha256[31] ^= 1;
        assert_ne!(other.message(), m);
        // The hex form names the same digest.
        let h = ModelStatement::with_hex_digest("faces", 7, 6, &hex_encode(&digest)).unwrap();
        assert_eq!(h, s);
        assert!(ModelStatement::with_hex_digest("faces", 7, 6, "abc").is_err());
        assert!(ModelStatement::with_hex_digest("faces", 7, 6, &"zz".repeat(32)).is_err());
    }

    #[test]
    fn signatures_bind_every_field_and_the_key() {
        let signer = ModelSigner::from_secret(&[7u8; 32]);
        let verifier = ModelVerifier::from_bytes(&signer.public_key()).unwrap();
        let s = statement();
        let sig = signer.sign(&s);
        verifier.verify(&s, &sig).unwrap();
        for f in [
            |s: &mut ModelStatement| s.model = "plaid".into(),
            |s: &mut ModelStatement| s.version = 5,
            |s: &mut ModelStatement| s.parent = 0,
            |s: &mut ModelStatement| s.sha256[0] ^= 0x80,
        ] {
            let mut other = s.clone();
            f(&mut other);
            assert_eq!(verifier.verify(&other, &sig), Err(SignError::Invalid));
        }
        let stranger = ModelSigner::from_secret(&[8u8; 32]);
        assert_eq!(
            verifier.verify(&s, &stranger.sign(&s)),
            Err(SignError::Invalid)
        );
        assert_eq!(
            verifier.verify(&s, &sig[..63]),
            Err(SignError::SignatureLength(63))
        );
        let back = ModelVerifier::from_hex(&format!(" {}\n", verifier.to_hex())).unwrap();
        assert_eq!(back, verifier);
        assert!(ModelVerifier::from_hex("00").is_err());
        // The identity point is a weak key: refused.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(ModelVerifier::from_bytes(&identity).is_err());
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex_encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex_decode("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("0g"), None);
    }
}
