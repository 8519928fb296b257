//! The client side of the coordinator's own tools (`enroll-token`, `revoke`) and of tests: a
//! tonic channel to a coordinator URL, over TLS trusting the given CA for `https://`.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A connected channel to `url` (`https://host:port` needs `ca_pem`; `http://` is plaintext),
/// presenting `identity` (certificate PEM, key PEM) as client certificate when given.
pub async fn connect(
    url: &str,
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    endpoint(url, ca_pem, identity)?.connect().await
}

/// The endpoint [`connect`] connects to.
pub fn endpoint(
    url: &str,
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
) -> Result<Endpoint, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(tls)?;
    }
    Ok(ep)
}

/// `request` with `authorization: Bearer <token>`; `None` when the token is not valid metadata.
pub fn with_admin<T>(msg: T, token: &str) -> Option<tonic::Request<T>> {
    let v = MetadataValue::try_from(format!("Bearer {token}")).ok()?;
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", v);
    Some(r)
}
