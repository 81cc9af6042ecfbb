//! Providers: how a client secret becomes a bearer token.
//!
//! Every provider speaks a dialect of the OAuth2 client-credentials grant;
//! each dialect's quirks (status codes, error shapes) live in its own file
//! and end up as a [`ProviderError`] whose [`ErrorKind`] tells the token
//! engine how to react: retry soon, back off long, or re-read the secret.
//! Whatever text a provider sends reaches an error only scrubbed of the
//! credential's secrets ([`redact`]).

pub mod http;
pub mod mappls;
pub mod mapsindoors;
pub mod oauth2;
pub mod redact;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::SecretString;

use crate::config::{CredentialConfig, ProviderKind};
use crate::token::Token;

pub use http::{HttpClient, HttpClients};
pub use redact::Redactor;

/// Logs in with a client secret and returns a token.
pub trait TokenProvider: Send + Sync {
    /// A token whose lifetime follows [`crate::token::lifetime`]; a reply
    /// whose token is already expired is an error.
    fn login<'a>(&'a self, secret: &'a SecretString)
    -> BoxFuture<'a, Result<Token, ProviderError>>;

    /// Tells the provider a secret of this credential that a reply may echo
    /// although the request did not carry it (the journal's current,
    /// pending or old one), so that it is scrubbed all the same. The secret
    /// a request carries is scrubbed from its reply anyway.
    fn remember(&self, _secret: &SecretString) {}
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

/// How the token engine and the rotation should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The provider rejected the client secret (401, `invalid_client`).
    Rejected,
    /// Quota or rate limit (403 on Mappls, 429): back off longer.
    Quota,
    /// Network trouble, timeouts, 5xx, garbage bodies, a token that is
    /// already expired: retry with backoff.
    Transient,
    /// A permanent refusal: the request itself is wrong or not allowed (bad
    /// scope, unauthorized grant; a secret API that will not create another
    /// secret). Retrying will not help until an operator changes something
    /// at the provider or in the configuration.
    Refused,
}

/// A failed provider call. Carries the HTTP status, the provider's error code
/// and a short detail; never a secret or a token. `code` and `detail` are
/// scrubbed, bounded, printable ASCII whenever they hold provider text
/// ([`redact::scrub`]).
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
    /// A failure without a reply (network, timeout, a local problem). The
    /// detail is bounded and made printable like provider text.
    pub fn transient(operation: &'static str, detail: impl Into<String>) -> Self {
        ProviderError {
            kind: ErrorKind::Transient,
            operation,
            status: None,
            code: None,
            detail: redact::scrub(&detail.into(), &[]),
            retry_after: None,
        }
    }

    /// What to call the refusal in a status line: the provider's error code,
    /// else the HTTP status.
    pub fn reason(&self) -> String {
        match (&self.code, self.status) {
            (Some(code), _) => code.clone(),
            (None, Some(status)) => format!("HTTP {status}"),
            (None, None) => self.operation.to_string(),
        }
    }
}

/// A credential's token provider and, if it has one, its secret API,
/// sharing one [`Redactor`]: a refusal of either is scrubbed of what the
/// other was sent or given.
pub struct Built {
    pub token: Arc<dyn TokenProvider>,
    pub secrets: Option<Arc<dyn SecretApi>>,
}

/// Builds a credential's token provider and secret API (MapsIndoors with
/// `secrets_url` and `customer_id`) with clients shared across credentials.
pub fn build_all(cred: &CredentialConfig, clients: &HttpClients) -> Result<Built, ProviderError> {
    let transport = http::Transport {
        http: clients.get(&cred.endpoints)?,
        // extra_params may carry assertions (RFC 7521 `client_assertion`).
        redactor: Redactor::new(cred.extra_params.values().map(|v| v.expose().to_string())),
        default_lifetime: cred.refresh.default_lifetime,
    };
    let secrets: Option<Arc<dyn SecretApi>> = match (
        cred.provider,
        &cred.endpoints.secrets_url,
        &cred.customer_id,
    ) {
        (ProviderKind::MapsIndoors, Some(url), Some(customer)) => Some(Arc::new(
            mapsindoors::MapsIndoorsSecrets::new(transport.clone(), url.clone(), customer.clone()),
        )),
        _ => None,
    };
    let token: Arc<dyn TokenProvider> = match cred.provider {
        ProviderKind::MapsIndoors => Arc::new(mapsindoors::MapsIndoors::new(transport, cred)),
        ProviderKind::Mappls => Arc::new(mappls::Mappls::new(transport, cred)),
        ProviderKind::OAuth2 => Arc::new(oauth2::OAuth2::new(transport, cred)),
    };
    Ok(Built { token, secrets })
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
    Ok(build_all(cred, clients)?.secrets)
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
    Ok(build_all(cred, clients)?.token)
}
