//! The client side of the local API, for `rekeyd token` and `rekeyd status`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::{ApiConfig, ListenAddr};
use crate::serve::api::KEY_HEADER;

/// The shortest time a request is given: the daemon answers a `GET` at
/// once, but a slow machine should not make `rekeyd status` fail.
const MIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the config has no [api] section; `rekeyd token` and `rekeyd status` talk to the daemon through it"
    )]
    NoApi,
    #[error("cannot read the API key: {0}")]
    Key(String),
    #[error("rekeyd is not reachable at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("{path}: HTTP {status}: {detail}{}", retry_hint(*retry_after))]
    Status {
        path: String,
        status: u16,
        detail: String,
        /// The daemon's `Retry-After`, in seconds.
        retry_after: Option<u64>,
    },
}

/// Sends `GET path` with the API key and returns the JSON body.
pub async fn get_json(
    api: Option<&ApiConfig>,
    path: &str,
) -> Result<serde_json::Value, ClientError> {
    request_json(api, reqwest::Method::GET, path, None).await
}

/// Sends `POST path` with the API key and `body` as JSON, and returns the
/// JSON answer. Waits as long as the daemon may take to answer (its
/// listener's `request_timeout`): a forced refresh waits for a login.
pub async fn post_json(
    api: Option<&ApiConfig>,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    request_json(api, reqwest::Method::POST, path, Some(body)).await
}

async fn request_json(
    api: Option<&ApiConfig>,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let api = api.ok_or(ClientError::NoApi)?;
    let key = std::fs::read_to_string(&api.key_file)
        .map_err(|e| ClientError::Key(format!("{}: {e}", api.key_file.display())))?;
    let (builder, base) = match &api.listen {
        ListenAddr::Tcp(addr) => (
            reqwest::Client::builder(),
            format!("http://{}", connectable(*addr)),
        ),
        ListenAddr::Unix(sock) => (
            reqwest::Client::builder().unix_socket(sock.clone()),
            "http://localhost".to_string(),
        ),
    };
    let timeout = (api.limits.request_timeout + Duration::from_secs(1)).max(MIN_TIMEOUT);
    let client =
        builder
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Unreachable {
                addr: api.listen.to_string(),
                reason: e.to_string(),
            })?;
    let mut request = client
        .request(method, format!("{base}{path}"))
        .header(KEY_HEADER, key.trim());
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.map_err(|e| ClientError::Unreachable {
        addr: api.listen.to_string(),
        reason: e.to_string(),
    })?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .bytes()
        .await
        .map_err(|e| ClientError::Unreachable {
            addr: api.listen.to_string(),
            reason: e.to_string(),
        })?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if status != 200 {
        let detail = [json["error"].as_str(), json["detail"].as_str()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return Err(ClientError::Status {
            path: path.to_string(),
            status,
            detail,
            retry_after,
        });
    }
    Ok(json)
}

fn retry_hint(retry_after: Option<u64>) -> String {
    retry_after.map_or_else(String::new, |s| format!(" (retry after {s}s)"))
}

/// A wildcard listen address is reached through loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
