//! Providers: how a client secret becomes a bearer token.
//!
//! Every provider speaks a dialect of the OAuth2 client-credentials grant;
//! each dialect's quirks (status codes, error shapes) live in its own file
//! and end up as a [`ProviderError`] whose [`ErrorKind`] tells the token
//! engine how to react: retry soon, back off long, or re-read the secret.

pub mod http;
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

pub use http::{HttpClient, HttpClients};

/// Logs in with a client secret and returns a token.
pub trait TokenProvider: Send + Sync {
    fn login<'a>(&'a self, secret: &'a SecretString)
    -> BoxFuture<'a, Result<Token, ProviderError>>;
}

/// A secret as the provider lists it (never with its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSecret {
    pub id: String,
    pub description: String,
    /// The client the secret belongs to, when the provider says.
    pub client_id: Option<String>,
    /// When the provider created it, when the provider says (MapsIndoors:
    /// `createdAt`, RFC 3339).
    pub created_at: Option<std::time::SystemTime>,
}

/// A secret just created; the provider shows its value only this once.
#[derive(Debug, Clone)]
pub struct NewSecret {
    pub id: String,
    pub value: SecretString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// Already gone: for an idempotent step that is as good as deleted.
    NotFound,
}

/// A provider's API for managing a client's secrets, authenticated with a
/// bearer token of that client.
pub trait SecretApi: Send + Sync {
    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>>;
    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        description: &'a str,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>>;
    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>>;
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

/// The secret API of a credential, if its provider has one and the
/// configuration enables rotation.
pub fn build_secret_api(
    cred: &CredentialConfig,
) -> Result<Option<Arc<dyn SecretApi>>, ProviderError> {
    build_secret_api_with(cred, &HttpClients::default())
}

/// [`build_secret_api`] with clients shared across credentials.
pub fn build_secret_api_with(
    cred: &CredentialConfig,
    clients: &HttpClients,
) -> Result<Option<Arc<dyn SecretApi>>, ProviderError> {
    match (
        cred.provider,
        &cred.endpoints.secrets_url,
        &cred.customer_id,
    ) {
        (ProviderKind::MapsIndoors, Some(url), Some(customer)) => {
            let http = clients.get(&cred.endpoints)?;
            Ok(Some(Arc::new(mapsindoors::MapsIndoorsSecrets::new(
                http,
                url.clone(),
                customer.clone(),
            ))))
        }
        _ => Ok(None),
    }
}

/// Builds the provider for a credential from its configuration.
pub fn build(cred: &CredentialConfig) -> Result<Arc<dyn TokenProvider>, ProviderError> {
    build_with(cred, &HttpClients::default())
}

/// [`build`] with clients shared across credentials.
pub fn build_with(
    cred: &CredentialConfig,
    clients: &HttpClients,
) -> Result<Arc<dyn TokenProvider>, ProviderError> {
    let http = clients.get(&cred.endpoints)?;
    Ok(match cred.provider {
        ProviderKind::MapsIndoors => Arc::new(mapsindoors::MapsIndoors::new(http, cred)),
        ProviderKind::Mappls => Arc::new(mappls::Mappls::new(http, cred)),
        ProviderKind::OAuth2 => Arc::new(oauth2::OAuth2::new(http, cred)),
    })
}
