//! Providers: how a client secret becomes a bearer token.
//!
//! Every provider speaks a dialect of the OAuth2 client-credentials grant;
//! each dialect's quirks (status codes, error shapes) live in its own file
//! and end up as a [`ProviderError`] whose [`ErrorKind`] tells the token
//! engine how to react: retry soon, back off long, or re-read the secret.

mod http;
pub mod mappls;
pub mod mapsindoors;
pub mod oauth2;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::SecretString;

use crate::config::{CredentialConfig, ProviderKind};
use crate::token::Token;

pub use http::HttpClient;

/// Logs in with a client secret and returns a token.
pub trait TokenProvider: Send + Sync {
    fn login<'a>(&'a self, secret: &'a SecretString)
    -> BoxFuture<'a, Result<Token, ProviderError>>;
}

/// How the token engine should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The provider rejected the client secret (401, `invalid_client`).
    Rejected,
    /// Quota or rate limit (403 on Mappls, 429): back off longer.
    Quota,
    /// Network trouble, timeouts, 5xx, garbage bodies: retry with backoff.
    Transient,
    /// The request itself is wrong (bad scope, unauthorized grant): retrying
    /// soon will not help, but the operator may fix the provider side.
    Refused,
}

/// A failed provider call. Carries the HTTP status, the provider's error code
/// and a short detail; never a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ProviderError {
    pub kind: ErrorKind,
    pub operation: &'static str,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub detail: String,
    /// From a `Retry-After` header, when the provider sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.operation)?;
        if let Some(status) = self.status {
            write!(f, ": HTTP {status}")?;
        }
        if let Some(code) = &self.code {
            write!(f, " error={code}")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

impl ProviderError {
    pub fn transient(operation: &'static str, detail: impl Into<String>) -> Self {
        ProviderError {
            kind: ErrorKind::Transient,
            operation,
            status: None,
            code: None,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

/// Builds the provider for a credential from its configuration.
pub fn build(cred: &CredentialConfig) -> Result<Arc<dyn TokenProvider>, ProviderError> {
    let http = HttpClient::new(&cred.endpoints)?;
    Ok(match cred.provider {
        ProviderKind::MapsIndoors => Arc::new(mapsindoors::MapsIndoors::new(http, cred)),
        ProviderKind::Mappls => Arc::new(mappls::Mappls::new(http, cred)),
        ProviderKind::OAuth2 => Arc::new(oauth2::OAuth2::new(http, cred)),
    })
}
