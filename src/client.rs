//! The client side of the local API, for `rekeyd token` and `rekeyd status`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::{ApiConfig, ListenAddr};
use crate::serve::api::KEY_HEADER;

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
    #[error("{path}: HTTP {status}: {detail}")]
    Status {
        path: String,
        status: u16,
        detail: String,
    },
}

/// Sends `GET path` with the API key and returns the JSON body.
pub async fn get_json(
    api: Option<&ApiConfig>,
    path: &str,
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
    let client = builder
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .map_err(|e| ClientError::Unreachable {
            addr: api.listen.to_string(),
            reason: e.to_string(),
        })?;
    let response = client
        .get(format!("{base}{path}"))
        .header(KEY_HEADER, key.trim())
        .send()
        .await
        .map_err(|e| ClientError::Unreachable {
            addr: api.listen.to_string(),
            reason: e.to_string(),
        })?;
    let status = response.status().as_u16();
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
        });
    }
    Ok(json)
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
