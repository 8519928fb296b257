//! The TLS handshake of every gRPC connection, done here rather than inside tonic so that a
//! refused handshake is logged and counted like every other refusal (`call = "connect"`):
//! an expired client certificate (`cert_expired`), one the CA did not sign or otherwise
//! invalid (`bad_cert`), any other failure such as plaintext on the TLS port
//! (`tls_handshake`), and a peer that does not finish the handshake within the time limit
//! (`handshake_timeout`; tonic's own acceptor has no limit, so a silent peer held its
//! connection slot forever).
//!
//! The server certificate is the coordinator's; client certificates of its CA are verified
//! (chain, validity, key usage) when presented but optional at this layer, because `Enroll`
//! needs none; every Federation call requires one (`Services::client`). Handshakes run
//! concurrently, each on its own task, so a slow peer never delays the next one.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::limits::CappedConn;
use crate::metrics::Metrics;

/// Why a TLS server configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("unreadable PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server side: `cert_pem`/`key_pem` its identity, client certificates verified against
/// `ca_pem` when presented; HTTP/2 by ALPN (what tonic's own acceptor sets up).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The refusal reason of a failed handshake (a label of `rejections_total`).
pub fn reason(e: &io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => "cert_expired",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_cert",
        _ => "tls_handshake",
    }
}

/// TLS over `conns` (the capped accept loop): every accepted connection is handshaken on a
/// task of its own within `timeout`; established ones are yielded, refused ones logged,
/// counted and closed (which frees their connection slot). Stops accepting as soon as the
/// server drops the stream.
pub fn incoming(
    conns: impl Stream<Item = io::Result<CappedConn>> + Send + 'static,
    config: Arc<ServerConfig>,
    timeout: Duration,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<TlsStream<CappedConn>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsStream<CappedConn>>>(16);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut conns = std::pin::pin!(conns);
        loop {
            let next = tokio::select! {
                c = conns.next() => c,
                // The server stopped: release the listener now.
                _ = tx.closed() => return,
            };
            let conn = match next {
                None => return,
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Ok(c)) => c,
            };
            let peer = conn
                .peer_addr()
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => metrics.reject("connect", reason(&e), &peer, &e),
                    Err(_) => metrics.reject(
                        "connect",
                        "handshake_timeout",
                        &peer,
                        &format!("TLS handshake not finished within {timeout:?}"),
                    ),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
