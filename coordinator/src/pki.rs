//! The coordinator's small certificate authority (rcgen, ring): a CA key and certificate kept
//! in `pki_dir` (key file mode 0600), the server certificate issued from it at every start for
//! the configured names, and client certificates issued for agents' CSRs at enrolment. The
//! subject CN of a client certificate is the client id; the store also keeps each issued
//! certificate's sha256, so only the certificate issued last for a client is accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

/// File names inside `pki_dir`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate issued at the last start (for operators' tools; re-issued each start).
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server key (0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// Lifetime of the CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Lifetime of the server certificate (re-issued at every start).
const SERVER_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Back-dating of `not_before`, for devices whose clock is a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// PKI failures.
#[derive(thiserror::Error, Debug)]
pub enum PkiError {
    /// Reading or writing a file in `pki_dir`.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// rcgen refused (bad CSR, bad key, bad name).
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path`, mode 0600 when `secret`, replacing it by rename.
pub fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), PkiError> {
    use hearth_edge::fsutil::{write_atomic, PRIVATE, SHARED};
    write_atomic(path, data, if secret { PRIVATE } else { SHARED }).map_err(io(path))
}

/// Hex sha256 of a certificate's DER (its fingerprint).
pub fn fingerprint(der: &[u8]) -> String {
    crate::state::sha256_hex(der)
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    (p.label == "CERTIFICATE").then_some(p.contents)
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The CA and the server identity.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_sha256: String,
    ca_path: PathBuf,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca_path)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

fn after(d: Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() + d
}

fn before(d: Duration) -> OffsetDateTime {
    OffsetDateTime::now_utc() - d
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

impl Pki {
    /// Loads the CA from `dir` (creating the directory, mode 0700, and a new CA when there is
    /// none) and issues the server certificate for `names` (DNS names or IP addresses).
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Pki, PkiError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let ca_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let (issuer, ca_pem) = if key_path.exists() && ca_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let ca_pem = std::fs::read_to_string(&ca_path).map_err(io(&ca_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            (Issuer::from_ca_cert_pem(&ca_pem, key)?, ca_pem)
        } else {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "Hearth coordinator CA");
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = before(CLOCK_SKEW);
            p.not_after = after(CA_VALIDITY);
            p.serial_number = Some(random_serial());
            let cert = p.self_signed(&key)?;
            let ca_pem = cert.pem();
            write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&ca_path, ca_pem.as_bytes(), false)?;
            tracing::info!(path = %ca_path.display(), "created the coordinator CA");
            (Issuer::new(p, key), ca_pem)
        };
        let ca_der = pem_to_der(&ca_pem).ok_or(rcgen::Error::CouldNotParseCertificate)?;
        // The server certificate, for the configured names.
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "hearth-coordinator");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = before(CLOCK_SKEW);
        p.not_after = after(SERVER_VALIDITY);
        p.serial_number = Some(random_serial());
        let server = p.signed_by(&key, &issuer)?;
        let server_cert_pem = server.pem();
        let server_key_pem = key.serialize_pem();
        write_file(&dir.join(SERVER_KEY_FILE), server_key_pem.as_bytes(), true)?;
        write_file(
            &dir.join(SERVER_CERT_FILE),
            server_cert_pem.as_bytes(),
            false,
        )?;
        Ok(Pki {
            issuer,
            ca_sha256: fingerprint(&ca_der),
            ca_pem,
            ca_path,
            server_cert_pem,
            server_key_pem,
        })
    }

    /// The CA certificate (PEM) agents trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Where the CA certificate is.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Hex sha256 of the CA certificate's DER.
    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    /// The server certificate and key (PEM).
    pub fn server_identity(&self) -> (&str, &str) {
        (&self.server_cert_pem, &self.server_key_pem)
    }

    /// Issues a client certificate (CN = `client_id`, client auth only, `validity` long) for
    /// the key in `csr_pem`, whose signature is checked. Only the CSR's public key is used.
    pub fn sign_client(
        &self,
        csr_pem: &str,
        client_id: &str,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, client_id);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = before(CLOCK_SKEW);
        p.not_after = after(validity);
        p.serial_number = Some(random_serial());
        Ok(p.signed_by(&csr.public_key, &self.issuer)?.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(key: &KeyPair) -> String {
        CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn ca_persists_and_signs_csrs_with_the_client_id_as_cn() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let a = Pki::load_or_create(dir.path(), &names).unwrap();
        let b = Pki::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(a.ca_sha256(), b.ca_sha256(), "the CA is kept across starts");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY_FILE, SERVER_KEY_FILE] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{f} readable by others");
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = b
            .sign_client(&csr(&key), "c-123", Duration::from_secs(60))
            .unwrap();
        let der = pem_to_der(&cert).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("c-123"));
        assert!(b
            .sign_client("not a csr", "c", Duration::from_secs(1))
            .is_err());
    }
}
