//! Providers: how a client secret becomes a bearer token.
//!
//! Every provider speaks a dialect of the OAuth2 client-credentials grant;
//! each dialect's quirks (status codes, error shapes) live in its own file
//! and end up as a [`ProviderError`] whose [`ErrorKind`] tells the token
//! engine how to react: retry soon, back off long, or re-read the secret.
//! Whatever text a provider sends reaches an error only scrubbed of the
//! credential's secrets ([`redact`]).

pub mod assertion;
pub mod auth0;
pub mod entra;
pub mod http;
pub mod jwks;
pub mod jwks_publish;
pub mod key;
pub mod keycloak;
pub mod mappls;
pub mod mapsindoors;
pub mod oauth2;
pub mod okta;
pub mod okta_api;
pub mod okta_keys;
pub mod redact;
pub mod registration;
pub mod replace;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::SecretString;

use crate::config::{AuthMethod, CredentialConfig, ProviderKind};
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
    /// When the provider says it expires, on the provider's clock (Entra
    /// `endDateTime`); `None`: never, or the API does not say.
    pub expires_at: Option<std::time::SystemTime>,
}

/// A secret just created; the provider shows its value only this once.
#[derive(Debug, Clone)]
pub struct NewSecret {
    /// The provider's id for it; `None` where the API replaces the client's
    /// one secret and has no ids ([`Overlap::Replace`]).
    pub id: Option<String>,
    pub value: SecretString,
    /// When the provider says it expires, on the provider's clock (Entra
    /// `endDateTime`; RFC 7591 `client_secret_expires_at`, where 0 means
    /// never and is `None` here); `None`: never, or the API does not say.
    pub expires_at: Option<std::time::SystemTime>,
    /// A new RFC 7592 registration access token the reply carried (the old
    /// one then stops working); persisted with the new secret.
    pub registration_access_token: Option<SecretString>,
}

/// What rekeyd asks a secret API to create.
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    /// rekeyd's tag ([`crate::rotation::secret_description`]); an API that
    /// cannot carry one ignores it ([`Capabilities::tags`]).
    pub description: &'a str,
    /// The value rekeyd generated and persisted before this call
    /// ([`ValueOrigin::Caller`]; with [`ValueOrigin::Key`] the private JWK,
    /// of which the API publishes the public part); `None`: the provider
    /// generates it.
    pub value: Option<&'a SecretString>,
}

/// Who makes a new secret's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueOrigin {
    /// The provider generates it and shows it once, in the create reply: a
    /// reply lost after the provider created the secret loses the value,
    /// so created secrets must carry a tag to be found and deleted (I3).
    Server,
    /// The API accepts a value rekeyd generates: characters drawn
    /// uniformly by a CSPRNG from `alphabet` (ASCII, at least 2
    /// characters), as many as 256 bits need. The journal holds the value
    /// before the call, so a lost reply loses nothing: a retry sends the
    /// same value.
    Caller { alphabet: &'static str },
    /// A key-based client (`private_key_jwt`, RFC 7523 §2.2): rekeyd
    /// generates a key pair of the current key's type and the journal
    /// holds its private JWK before the call ([`key`]); the API is given
    /// only the public JWK. As with [`ValueOrigin::Caller`], a lost reply
    /// loses nothing, and ids are key ids (`kid`), which rekeyd knows
    /// before the call.
    Key,
}

/// How a new secret lives next to the old one at the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Several secrets may be valid at once (at most `max`, when the
    /// provider documents a limit): the old one stays valid until rekeyd
    /// retires it after the grace period.
    Many { max: Option<u32> },
    /// Creating replaces the client's secret atomically: the old one stops
    /// working at once. Only safe with [`ValueOrigin::Caller`] (the new
    /// value is in the journal before the call; RFC 7592, which cannot
    /// offer it, is the documented exception), and logins try both values
    /// until the new one is proven. The replaced value stays in the
    /// journal through the grace period all the same (promoted), so a
    /// value set again by a delayed request is met by the final check (S5).
    Replace,
}

/// How a secret leaves the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// One delete call.
    Delete,
    /// Deactivate, then delete (Okta deletes only inactive secrets). Both
    /// calls are licensed by the same journal write (S1) and both are
    /// idempotent, so no journal phase sits between them.
    DeactivateThenDelete,
    /// Nothing to do: the replacement already removed the old secret
    /// ([`Overlap::Replace`]).
    Replaced,
}

/// What a provider's secret API can do; the rotation machine chooses its
/// steps from this (see `rotation::machine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub value: ValueOrigin,
    pub overlap: Overlap,
    pub retire: Retire,
    /// Created secrets carry rekeyd's tag, and listings show it: a secret
    /// whose create reply was lost is found by its tag (I3).
    pub tags: bool,
    /// The API lists the client's secrets (ids, no values): S7 checks
    /// what is ours before deleting, and sweeps orphans.
    pub lists: bool,
}

/// Letters and digits: accepted by every API that takes a caller-chosen
/// secret (43 characters carry 256 bits).
pub const ALPHANUMERIC: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh secret value for [`ValueOrigin::Caller`]: at least 256 bits,
/// each character drawn uniformly from `alphabet` by the thread's CSPRNG
/// (`rand::rng()`, ChaCha seeded from the operating system).
pub fn generate_value(alphabet: &str) -> SecretString {
    use rand::Rng;
    let symbols = alphabet.as_bytes();
    assert!(symbols.len() >= 2, "an alphabet needs two symbols");
    let bits = (symbols.len() as f64).log2();
    let length = (256.0 / bits).ceil() as usize;
    let mut rng = rand::rng();
    let value: String = (0..length)
        .map(|_| symbols[rng.random_range(0..symbols.len())] as char)
        .collect();
    SecretString::from(value)
}

impl Capabilities {
    /// MapsIndoors' client-credentials API, the shape rekeyd started with.
    pub const SERVER_TAGGED: Capabilities = Capabilities {
        value: ValueOrigin::Server,
        overlap: Overlap::Many { max: None },
        retire: Retire::Delete,
        tags: true,
        lists: true,
    };

    /// Whether creating replaces the old secret at once.
    pub fn replaces(&self) -> bool {
        self.overlap == Overlap::Replace
    }

    /// The path a rotation takes with this API, in one sentence for
    /// `rekeyd check` and the README.
    pub fn path(&self) -> String {
        let value = match self.value {
            ValueOrigin::Server if self.tags => {
                "the provider generates the new secret; rekeyd tags it, so a secret whose reply was lost is found by its tag and deleted"
            }
            ValueOrigin::Server if self.replaces() => {
                "an update of the client's registration (RFC 7592) answers with its secret, which the server may have replaced, and perhaps a new registration access token; rekeyd stores both before using either (a reply lost after the server replaced the secret cannot be recovered: the server shows that value only once)"
            }
            ValueOrigin::Server => "the provider generates the new secret and shows it once",
            ValueOrigin::Caller { .. } => {
                "rekeyd generates the new secret (256 bits from a CSPRNG) and stores it before the call, so a lost reply loses nothing"
            }
            ValueOrigin::Key => {
                "rekeyd generates a new key pair of the current key's type and stores the private key before publishing the public one next to the current key, so a lost reply loses nothing (the key id finds an interrupted publish)"
            }
        };
        let overlap = match self.overlap {
            Overlap::Many { max: Some(max) } => format!(
                "old and new are both valid (at most {max} at once) until the grace period ends and the new one is proven again"
            ),
            Overlap::Many { max: None } => "old and new are both valid until the grace period ends and the new one is proven again".to_string(),
            Overlap::Replace => "the provider replaces the old secret at once, so logins try both values until the new one is proven, and the replaced one still through the grace period, at whose end the new one is proven again".to_string(),
        };
        let retire = match self.retire {
            _ if self.value == ValueOrigin::Key => {
                "then the old public key is withdrawn and the old private key forgotten"
            }
            Retire::Delete => "then the old secret is deleted",
            Retire::DeactivateThenDelete => "then the old secret is deactivated and deleted",
            Retire::Replaced => "nothing is left to delete",
        };
        format!("{value}; {overlap}; {retire}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// Already gone: for an idempotent step that is as good as deleted.
    NotFound,
}

/// A provider's API for managing a client's secrets, authenticated with a
/// bearer token: the client's own, or another credential's
/// (`secret_api_credential`, an administrative client).
pub trait SecretApi: Send + Sync {
    /// What this API can do; constant for its lifetime.
    fn capabilities(&self) -> Capabilities;
    /// Whether its listings say when each secret expires
    /// ([`RemoteSecret::expires_at`], Entra's `endDateTime`). Only then does
    /// rekeyd list to learn the expiry of a secret it did not create (the
    /// bootstrap one): an API that never says is not asked.
    fn lists_expiry(&self) -> bool {
        false
    }
    /// The client's secrets (never their values). An API without a listing
    /// ([`Capabilities::lists`] false) answers with an empty list.
    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>>;
    /// Creates (or, with [`Overlap::Replace`], sets) a secret. With a
    /// caller-chosen value the reply's value is that value.
    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>>;
    /// Makes a secret unusable before its delete ([`Retire::DeactivateThenDelete`]);
    /// an already inactive or missing secret is not an error.
    fn deactivate<'a>(
        &'a self,
        _bearer: &'a Token,
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async { Ok(Deleted::Deleted) })
    }
    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>>;
    /// A new RFC 7592 registration access token that a call since the last
    /// question returned (§3: any call may replace it, after which the old
    /// one stops working), taken out of the API: the rotation stores it
    /// before the next call. `create` returns its own in
    /// [`NewSecret::registration_access_token`].
    fn take_renewed_registration_token(&self) -> Option<SecretString> {
        None
    }
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

/// Secret API failures. 401: our bearer token is not accepted (the next run
/// logs in again). 408, 425 and 5xx are passing trouble, 429 or any 4xx with
/// a `Retry-After` a limit that lifts by itself. Every other 4xx (400, 403,
/// 404, 409, 422, ...) is a refusal that will be the same on every retry,
/// whatever its error code says: the client already has its maximum number
/// of secrets, the customer id is wrong, the client may not manage secrets.
/// Those are [`ErrorKind::Refused`], which the rotation reports as needing
/// an operator and retries only slowly.
pub fn classify_secret_api(status: u16, _code: Option<&str>, retry_after: bool) -> ErrorKind {
    match status {
        401 => ErrorKind::Rejected,
        429 => ErrorKind::Quota,
        408 | 425 => ErrorKind::Transient,
        400..=499 if retry_after => ErrorKind::Quota,
        400..=499 => ErrorKind::Refused,
        _ => ErrorKind::Transient,
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
        // A private_key_jwt app's keys (`…/credentials/jwks`), not secrets.
        (ProviderKind::Okta, Some(url), _) if cred.auth_method == AuthMethod::PrivateKeyJwt => {
            Some(Arc::new(okta_keys::OktaKeys::new(
                transport.clone(),
                url.clone(),
                cred.client_id.clone(),
            )))
        }
        (ProviderKind::Okta, Some(url), _) => Some(Arc::new(okta::OktaSecrets::new(
            transport.clone(),
            url.clone(),
            cred.client_id.clone(),
        ))),
        (ProviderKind::Auth0, Some(url), _) => {
            Some(Arc::new(auth0::secret_api(transport.clone(), url.clone())))
        }
        (ProviderKind::Keycloak, Some(url), _) => Some(Arc::new(keycloak::secret_api(
            transport.clone(),
            url.clone(),
        ))),
        (ProviderKind::Entra, Some(url), _) => Some(Arc::new(entra::EntraSecrets::new(
            transport.clone(),
            url.clone(),
            cred.client_id.clone(),
        ))),
        // Registration wins (configuration makes the two exclusive).
        (ProviderKind::OAuth2, _, _) if cred.registration.is_none() => {
            cred.jwks.as_ref().map(|j| {
                Arc::new(jwks_publish::JwksKeys::new(cred.client_id.clone(), j))
                    as Arc<dyn SecretApi>
            })
        }
        (ProviderKind::OAuth2, _, _) => cred.registration.as_ref().map(|r| {
            let api = registration::RegistrationApi::new(
                transport.clone(),
                r.client_uri.clone(),
                cred.client_id.clone(),
                &r.access_token_file,
            );
            if cred.auth_method == AuthMethod::PrivateKeyJwt {
                Arc::new(registration::RegistrationKeys::new(api)) as Arc<dyn SecretApi>
            } else {
                Arc::new(api) as Arc<dyn SecretApi>
            }
        }),
        _ => None,
    };
    let token: Arc<dyn TokenProvider> = match cred.provider {
        ProviderKind::MapsIndoors => Arc::new(mapsindoors::MapsIndoors::new(transport, cred)),
        ProviderKind::Mappls => Arc::new(mappls::Mappls::new(transport, cred)),
        // RFC 6749 token endpoints; a wrong secret is 401 (Okta, Keycloak
        // and Entra `invalid_client`, Entra's with an AADSTS code in the
        // description the refusal keeps; Auth0 `access_denied`).
        ProviderKind::OAuth2
        | ProviderKind::Okta
        | ProviderKind::Auth0
        | ProviderKind::Keycloak
        | ProviderKind::Entra => Arc::new(oauth2::OAuth2::new(transport, cred)),
    };
    Ok(Built { token, secrets })
}

/// What the secret API of `cred` can do, without building it; `None` for
/// a credential rekeyd cannot rotate (Mappls; oauth2 without
/// `[credentials.registration]` or `[credentials.jwks]`).
pub fn capabilities_of(cred: &CredentialConfig) -> Option<Capabilities> {
    match cred.provider {
        ProviderKind::OAuth2 if cred.registration.is_some() => Some(match cred.auth_method {
            AuthMethod::PrivateKeyJwt => registration::KEY_CAPABILITIES,
            _ => registration::CAPABILITIES,
        }),
        // `[credentials.jwks]`: keys published for the client's jwks_uri.
        ProviderKind::OAuth2 if cred.jwks.is_some() => Some(registration::KEY_CAPABILITIES),
        ProviderKind::MapsIndoors => Some(Capabilities::SERVER_TAGGED),
        ProviderKind::Okta if cred.auth_method == AuthMethod::PrivateKeyJwt => {
            Some(okta_keys::CAPABILITIES)
        }
        ProviderKind::Okta => Some(okta::CAPABILITIES),
        ProviderKind::Auth0 => Some(auth0::CAPABILITIES),
        ProviderKind::Keycloak => Some(keycloak::CAPABILITIES),
        ProviderKind::Entra => Some(entra::CAPABILITIES),
        ProviderKind::Mappls | ProviderKind::OAuth2 => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn generated_values_carry_256_bits_from_their_alphabet() {
        let a = generate_value(ALPHANUMERIC);
        let b = generate_value(ALPHANUMERIC);
        assert_eq!(a.expose_secret().len(), 43, "43 x log2(62) >= 256");
        assert!(a.expose_secret().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a.expose_secret(), b.expose_secret());
        let hex = generate_value("0123456789abcdef");
        assert_eq!(hex.expose_secret().len(), 64);
    }

    #[test]
    fn every_path_is_explained() {
        let path = Capabilities::SERVER_TAGGED.path();
        assert!(path.contains("tag"), "{path}");
        let replace = replace::CAPABILITIES.path();
        assert!(replace.contains("try both"), "{replace}");
        let okta = okta::CAPABILITIES.path();
        assert!(okta.contains("deactivated and deleted"), "{okta}");
    }
}
