//! The hub's side of federation: `refresh` (Admin.StartRound on the coordinator) and the
//! follower that mirrors `Federation.Subscribe` model publications onto retained MQTT
//! topics `hearth/federation/model/<name>`.

use std::time::Duration;

use hearth_edge::Backoff;
use hearth_proto::mqtt::{model_topic, valid_name, ModelAnnouncement};
use hearth_proto::v1::{
    admin_client::AdminClient, federation_client::FederationClient, federation_event, RoundState,
    StartRoundRequest, SubscribeRequest,
};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::metrics::Metrics;
use std::sync::Arc;

/// Time allowed to open a connection to the coordinator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for a whole refresh call.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two follower reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// State of a federated round (domain copy of the wire enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundPhase {
    /// The coordinator did not say.
    Unspecified,
    /// Collecting updates.
    Open,
    /// Aggregated; `new_version` is set.
    Completed,
    /// Deadline passed without a quorum.
    Failed,
}

impl std::fmt::Display for RoundPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoundPhase::Unspecified => "unspecified",
            RoundPhase::Open => "open",
            RoundPhase::Completed => "completed",
            RoundPhase::Failed => "failed",
        })
    }
}

/// What the coordinator answered to a refresh (a round it opened).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundInfo {
    pub model: String,
    pub round_id: u64,
    pub state: RoundPhase,
    pub base_version: u64,
    /// Set when completed.
    pub new_version: u64,
    pub updates: u32,
    pub min_clients: u32,
    pub max_clients: u32,
    pub uplink_bytes: u64,
    /// Held-out accuracy of `new_version`, if evaluated.
    pub eval_accuracy: Option<f32>,
    pub detail: String,
}

impl From<hearth_proto::v1::RoundStatus> for RoundInfo {
    fn from(s: hearth_proto::v1::RoundStatus) -> Self {
        let state = match s.state() {
            RoundState::Unspecified => RoundPhase::Unspecified,
            RoundState::Open => RoundPhase::Open,
            RoundState::Completed => RoundPhase::Completed,
            RoundState::Failed => RoundPhase::Failed,
        };
        RoundInfo {
            state,
            eval_accuracy: (s.eval_accuracy >= 0.0).then_some(s.eval_accuracy),
            model: s.model,
            round_id: s.round_id,
            base_version: s.base_version,
            new_version: s.new_version,
            updates: s.updates,
            min_clients: s.min_clients,
            max_clients: s.max_clients,
            uplink_bytes: s.uplink_bytes,
            detail: s.detail,
        }
    }
}

/// An endpoint for `url`; `https://` trusts `ca_pem` (the coordinator's CA).
fn endpoint(url: &str, ca_pem: Option<&str>) -> Result<Endpoint, Error> {
    let bad = |e: tonic::transport::Error| {
        Error::Coordinator(format!("invalid coordinator URL `{url}`: {e}"))
    };
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(bad)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    let ca = ca_pem.ok_or_else(|| {
        Error::Coordinator(format!(
            "coordinator `{url}` uses TLS: its CA certificate (coordinator_ca_file) is needed"
        ))
    })?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    ep.tls_config(tls).map_err(bad)
}

fn with_bearer<T>(msg: T, token: &str) -> Result<tonic::Request<T>, Error> {
    let mut req = tonic::Request::new(msg);
    let v = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Error::Coordinator("admin token contains invalid characters".into()))?;
    req.metadata_mut().insert("authorization", v);
    Ok(req)
}

fn status_error(s: tonic::Status) -> Error {
    Error::Coordinator(format!("{:?}: {}", s.code(), s.message()))
}

/// Asks the coordinator to start a round for `model` (reason `"cli"`).
/// `ca_pem` is the coordinator's CA certificate, needed for an `https://` URL.
pub async fn refresh(
    coordinator_url: &str,
    ca_pem: Option<&str>,
    token: &str,
    model: &str,
) -> Result<RoundInfo, Error> {
    start_round(coordinator_url, ca_pem, token, model, "cli").await
}

/// `Admin.StartRound` with the admin bearer token; `reason` is `cli`, `mqtt`, `schedule` or `drift`.
/// Bounded by [`REFRESH_TIMEOUT`].
pub async fn start_round(
    coordinator_url: &str,
    ca_pem: Option<&str>,
    token: &str,
    model: &str,
    reason: &str,
) -> Result<RoundInfo, Error> {
    if !valid_name(model) {
        return Err(Error::Coordinator(format!(
            "`{model}` is not a valid model name"
        )));
    }
    let ep = endpoint(coordinator_url, ca_pem)?.timeout(REFRESH_TIMEOUT);
    let req = with_bearer(
        StartRoundRequest {
            model: model.to_string(),
            reason: reason.to_string(),
            ..StartRoundRequest::default()
        },
        token,
    )?;
    let call = async {
        let channel = ep.connect().await.map_err(|e| {
            Error::Coordinator(format!(
                "cannot reach {coordinator_url}: {}",
                source_chain(&e)
            ))
        })?;
        let mut client = AdminClient::new(channel);
        let status = client.start_round(req).await.map_err(status_error)?;
        Ok::<_, Error>(RoundInfo::from(status.into_inner()))
    };
    tokio::time::timeout(REFRESH_TIMEOUT, call)
        .await
        .map_err(|_| {
            Error::Coordinator(format!(
                "{coordinator_url} did not answer within {REFRESH_TIMEOUT:?}"
            ))
        })?
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Mirrors model publications from `Federation.Subscribe` to retained MQTT announcements,
/// reconnecting with the edge [`Backoff`] (capped at [`MAX_BACKOFF`], reset once a session
/// delivered something) until `shutdown` turns true.
pub(crate) async fn follow(
    url: String,
    ca_pem: Option<String>,
    token: String,
    models: Vec<String>,
    mqtt: AsyncClient,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), MAX_BACKOFF);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let session = follow_once(&url, ca_pem.as_deref(), &token, &models, &mqtt, &metrics);
        let got_any = tokio::select! {
            _ = shutdown.changed() => return,
            r = session => match r {
                Ok(n) => {
                    tracing::warn!(coordinator = %url, "federation stream ended; reconnecting");
                    n > 0
                }
                Err((n, e)) => {
                    tracing::warn!(coordinator = %url, error = %e, "federation follower");
                    n > 0
                }
            }
        };
        if got_any {
            backoff.reset();
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
}

/// One subscription; returns how many events it handled (and the error that ended it).
async fn follow_once(
    url: &str,
    ca_pem: Option<&str>,
    token: &str,
    models: &[String],
    mqtt: &AsyncClient,
    metrics: &Metrics,
) -> Result<u64, (u64, Error)> {
    let ep = endpoint(url, ca_pem)
        .map_err(|e| (0, e))?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel: Channel = ep.connect().await.map_err(|e| {
        (
            0,
            Error::Coordinator(format!("cannot reach {url}: {}", source_chain(&e))),
        )
    })?;
    let mut client = FederationClient::new(channel);
    let req = with_bearer(
        SubscribeRequest {
            models: models.to_vec(),
        },
        token,
    )
    .map_err(|e| (0, e))?;
    let mut stream = client
        .subscribe(req)
        .await
        .map_err(|s| (0, status_error(s)))?
        .into_inner();
    tracing::info!(coordinator = %url, "following model publications");
    let mut handled = 0u64;
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|s| (handled, status_error(s)))?;
        let Some(ev) = msg else { return Ok(handled) };
        handled += 1;
        match ev.event {
            Some(federation_event::Event::Published(p)) => {
                if !valid_name(&p.model) {
                    tracing::warn!(model = %p.model, "ignoring publication with an invalid model name");
                    continue;
                }
                let ann = ModelAnnouncement {
                    model: p.model.clone(),
                    version: p.version,
                    sha256: p.sha256,
                    size_bytes: p.size_bytes,
                };
                let body = serde_json::to_vec(&ann).expect("announcement serialises");
                match mqtt
                    .publish(model_topic(&p.model), QoS::AtLeastOnce, true, body)
                    .await
                {
                    Ok(()) => {
                        Metrics::inc(&metrics.models_announced);
                        tracing::info!(model = %p.model, version = p.version, "announced model");
                    }
                    Err(e) => {
                        return Err((
                            handled,
                            Error::Broker(format!("cannot publish announcement: {e}")),
                        ))
                    }
                }
            }
            Some(federation_event::Event::Round(r)) => {
                tracing::debug!(model = %r.model, round = r.round_id, "round opened");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn refresh_against_unreachable_coordinator_fails_fast() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let e = refresh(&format!("http://127.0.0.1:{port}"), None, "tok", "plaid")
            .await
            .unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let m = e.to_string();
        assert!(
            m.starts_with("coordinator: cannot reach http://127.0.0.1:"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn refresh_refuses_bad_inputs_without_network() {
        let e = refresh("http://127.0.0.1:1", None, "tok", "a/b")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a valid model name"), "{e}");
        let e = refresh("not a url", None, "tok", "plaid")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid coordinator URL"), "{e}");
        let e = refresh("http://127.0.0.1:1", None, "bad\ntoken", "plaid")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid characters"), "{e}");
    }

    #[test]
    fn round_status_converts() {
        let s = hearth_proto::v1::RoundStatus {
            model: "plaid".into(),
            round_id: 3,
            state: RoundState::Completed as i32,
            new_version: 4,
            eval_accuracy: -1.0,
            ..Default::default()
        };
        let r = RoundInfo::from(s);
        assert_eq!(r.state, RoundPhase::Completed);
        assert_eq!(r.eval_accuracy, None);
        assert_eq!(r.new_version, 4);
    }
}
