//! The one builder of MQTT client options (hub, agent, actuator): a parsed [`MqttUrl`],
//! a client id, keep-alive, packet size limit, an optional retained last will, and for
//! `mqtts://` real TLS — rustls 0.23 with the *ring* provider, trusting only the
//! certificates of a CA file (no system or webpki roots).
//!
//! A `mqtts://` URL without a CA file, a CA file with a plain URL, and a CA file that is
//! missing or holds no certificate are configuration errors ([`Error::is_config`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::{Error, MqttUrl};

/// Default keep-alive interval.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default largest incoming and outgoing packet.
pub const DEFAULT_MAX_PACKET: usize = 256 * 1024;
/// Default capacity of the client's request queue.
pub const DEFAULT_REQUEST_CAPACITY: usize = 256;

/// Installs rustls' ring provider as the process default, once (later calls and a provider
/// installed by someone else are fine). Hearth's own TLS configs name ring explicitly anyway.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Everything needed to open one MQTT client connection.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Broker and credentials.
    pub url: MqttUrl,
    /// MQTT client id.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Largest incoming and outgoing packet in bytes.
    pub max_packet_size: usize,
    /// Capacity of the request queue of [`AsyncClient`].
    pub request_capacity: usize,
    /// Topic of a retained QoS 1 `offline` last will (availability), if any.
    pub last_will: Option<String>,
    /// PEM file of the CA certificates trusted for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// File holding the password of the URL's user (first line, surrounding whitespace
    /// ignored): credentials stay out of configuration files and command lines.
    pub password_file: Option<PathBuf>,
    /// A persistent session (`clean_session = false`): the broker keeps the client's
    /// subscriptions and queues its QoS 1 messages while it is away, and rumqttc
    /// re-sends unacknowledged publishes when the broker still has the session. Needs a
    /// stable client id. Off by default (clean session).
    pub persistent_session: bool,
}

impl ClientSettings {
    /// Settings with the defaults above, no last will and no CA file.
    pub fn new(url: MqttUrl, client_id: impl Into<String>) -> ClientSettings {
        ClientSettings {
            url,
            client_id: client_id.into(),
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_packet_size: DEFAULT_MAX_PACKET,
            request_capacity: DEFAULT_REQUEST_CAPACITY,
            last_will: None,
            ca_file: None,
            password_file: None,
            persistent_session: false,
        }
    }

    /// Sets the keep-alive interval.
    pub fn keep_alive(mut self, d: Duration) -> Self {
        self.keep_alive = d;
        self
    }

    /// Sets the packet size limit (both directions).
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// Sets the request queue capacity.
    pub fn request_capacity(mut self, n: usize) -> Self {
        self.request_capacity = n;
        self
    }

    /// A retained QoS 1 `offline` last will on `topic`.
    pub fn offline_will(mut self, topic: impl Into<String>) -> Self {
        self.last_will = Some(topic.into());
        self
    }

    /// The CA file trusted for `mqtts://`.
    pub fn ca_file(mut self, path: Option<PathBuf>) -> Self {
        self.ca_file = path;
        self
    }

    /// The file holding the password of the URL's user (the URL must name a user and carry
    /// no password of its own).
    pub fn password_file(mut self, path: Option<PathBuf>) -> Self {
        self.password_file = path;
        self
    }

    /// Asks for a persistent session (`clean_session = false`) when `on`.
    pub fn persistent_session(mut self, on: bool) -> Self {
        self.persistent_session = on;
        self
    }

    /// Checks what can be checked without a network: URL and CA file agree, the CA file
    /// loads, a password file goes with a URL that names a user and carries no password.
    /// Call it while validating a configuration, so problems exit with 64. (The password
    /// file itself is read when connecting: a secret may be installed after the config.)
    pub fn check(&self) -> Result<(), Error> {
        check_tls(&self.url, self.ca_file.as_deref())?;
        self.check_password_source()
    }

    fn check_password_source(&self) -> Result<(), Error> {
        let Some(path) = &self.password_file else {
            return Ok(());
        };
        if self.url.username.is_none() {
            return Err(Error::Settings(format!(
                "a password file ({}) is configured but the broker URL {} names no user",
                path.display(),
                self.url
            )));
        }
        if self.url.password.is_some() {
            return Err(Error::Settings(format!(
                "the broker URL {} carries a password and a password file ({}) is configured: \
                 give one of them",
                self.url,
                path.display()
            )));
        }
        Ok(())
    }

    /// The password: from the URL, or read from [`ClientSettings::password_file`].
    pub fn password(&self) -> Result<Option<String>, Error> {
        let Some(path) = &self.password_file else {
            return Ok(self.url.password.clone());
        };
        self.check_password_source()?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Settings(format!("cannot read password file {}: {e}", path.display()))
        })?;
        let pw = text.lines().next().unwrap_or("").trim();
        if pw.is_empty() {
            return Err(Error::Settings(format!(
                "password file {} is empty",
                path.display()
            )));
        }
        Ok(Some(pw.to_string()))
    }

    /// rumqttc options for these settings (clean session unless
    /// [`ClientSettings::persistent_session`]).
    pub fn options(&self) -> Result<MqttOptions, Error> {
        let mut o = MqttOptions::new(self.client_id.clone(), self.url.host.clone(), self.url.port);
        o.set_keep_alive(self.keep_alive)
            .set_clean_session(!self.persistent_session)
            .set_max_packet_size(self.max_packet_size, self.max_packet_size)
            .set_request_channel_capacity(self.request_capacity);
        if let Some(u) = &self.url.username {
            o.set_credentials(u.clone(), self.password()?.unwrap_or_default());
        }
        if let Some(topic) = &self.last_will {
            o.set_last_will(LastWill::new(topic, "offline", QoS::AtLeastOnce, true));
        }
        if let Some(tls) = check_tls(&self.url, self.ca_file.as_deref())? {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        Ok(o)
    }

    /// The client and its event loop (drive it with [`crate::Connection`]).
    pub fn connect(&self) -> Result<(AsyncClient, EventLoop), Error> {
        Ok(AsyncClient::new(self.options()?, self.request_capacity))
    }
}

/// `None` for a plain URL without a CA file; the TLS client config for `mqtts://` with one;
/// an error for any other combination.
fn check_tls(
    url: &MqttUrl,
    ca_file: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, Error> {
    match (url.tls, ca_file) {
        (false, None) => Ok(None),
        (false, Some(p)) => Err(Error::Settings(format!(
            "a CA file ({}) is configured but the broker URL {url} is not mqtts://",
            p.display()
        ))),
        (true, None) => Err(Error::Tls(format!(
            "{url} needs a CA file (`ca_file`) holding the certificate of the CA that signed \
             the broker's certificate"
        ))),
        (true, Some(p)) => tls_config(p).map(Some),
    }
}

/// A rustls client config (ring provider, TLS 1.2 and 1.3) trusting exactly the
/// certificates of the PEM file `ca_file`.
pub fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    install_crypto_provider();
    let pem = std::fs::read(ca_file)
        .map_err(|e| Error::Tls(format!("cannot read CA file {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert
            .map_err(|e| Error::Tls(format!("CA file {}: invalid PEM: {e}", ca_file.display())))?;
        roots.add(cert).map_err(|e| {
            Error::Tls(format!(
                "CA file {}: unusable certificate: {e}",
                ca_file.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "CA file {} holds no PEM certificate",
            ca_file.display()
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> MqttUrl {
        MqttUrl::parse(s).unwrap()
    }

    #[test]
    fn plain_options() {
        let s = ClientSettings::new(url("mqtt://u:p@127.0.0.1:1999"), "dev")
            .keep_alive(Duration::from_secs(15))
            .max_packet_size(4096)
            .offline_will("hearth/dev/availability");
        let o = s.options().unwrap();
        assert_eq!(o.broker_address(), ("127.0.0.1".to_string(), 1999));
        assert_eq!(o.client_id(), "dev");
        assert_eq!(o.keep_alive(), Duration::from_secs(15));
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
        let will = o.last_will().unwrap();
        assert_eq!(will.topic, "hearth/dev/availability");
        assert_eq!(&will.message[..], b"offline");
        assert!(will.retain);
        assert_eq!(o.max_packet_size(), 4096);
        assert!(matches!(o.transport(), Transport::Tcp));
        assert!(o.clean_session());
        let o = s.persistent_session(true).options().unwrap();
        assert!(
            !o.clean_session(),
            "a persistent session asks for clean_session = false"
        );
    }

    #[test]
    fn password_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kitchen.password");
        std::fs::write(&p, "  s3cret  \n").unwrap();
        let o = ClientSettings::new(url("mqtt://kitchen@h"), "x")
            .password_file(Some(p.clone()))
            .options()
            .unwrap();
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("kitchen", "s3cret")
        );
        for (u, f) in [("mqtt://h", p.clone()), ("mqtt://k:pw@h", p.clone())] {
            let e = ClientSettings::new(url(u), "x")
                .password_file(Some(f))
                .check()
                .unwrap_err();
            assert!(e.is_config(), "{u}: {e}");
        }
        // The file is read when connecting (a configuration check does not need it yet).
        let missing = ClientSettings::new(url("mqtt://k@h"), "x")
            .password_file(Some(dir.path().join("missing")));
        missing.check().unwrap();
        let e = missing.options().unwrap_err();
        assert!(
            e.is_config() && e.to_string().contains("cannot read"),
            "{e}"
        );
        std::fs::write(&p, "\n").unwrap();
        let e = ClientSettings::new(url("mqtt://k@h"), "x")
            .password_file(Some(p))
            .options()
            .unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn tls_needs_a_ca_file_and_only_tls_takes_one() {
        let e = ClientSettings::new(url("mqtts://h"), "x")
            .options()
            .unwrap_err();
        assert!(
            e.is_config() && e.to_string().contains("needs a CA file"),
            "{e}"
        );
        let e = ClientSettings::new(url("mqtt://h"), "x")
            .ca_file(Some("/etc/ca.pem".into()))
            .check()
            .unwrap_err();
        assert!(
            e.is_config() && e.to_string().contains("not mqtts://"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = ClientSettings::new(url("mqtts://h"), "x")
            .ca_file(Some(missing))
            .check()
            .unwrap_err();
        assert!(
            e.is_config() && e.to_string().contains("cannot read CA file"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = ClientSettings::new(url("mqtts://h"), "x")
            .ca_file(Some(empty))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn tls_options_use_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, ca.cert.pem()).unwrap();
        let o = ClientSettings::new(url("mqtts://127.0.0.1"), "x")
            .ca_file(Some(p))
            .options()
            .unwrap();
        assert_eq!(o.broker_address().1, 8883);
        assert!(matches!(
            o.transport(),
            Transport::Tls(TlsConfiguration::Rustls(_))
        ));
    }
}
