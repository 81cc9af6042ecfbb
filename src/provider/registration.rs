//! RFC 7592 client registration management: the client's registration at
//! `registration_client_uri`, called with its registration access token.
//!
//! - `GET` reads the client's metadata (RFC 7592 §2.1), `client_secret`
//!   included;
//! - `PUT` with the *full* metadata updates it (§2.2: a field left out may
//!   be cleared, so rekeyd sends back everything the `GET` showed, minus the
//!   fields §2.2 forbids in a request and the secret). The reply (§2.2,
//!   RFC 7591 §3.2.1) carries the client's `client_secret`, which the
//!   server *may* have replaced, and may carry a new
//!   `registration_access_token`, after which the old one stops working
//!   (§3: "the authorization server MAY issue a new registration access
//!   token").
//!
//! A rotation is one update: whatever the reply carries is persisted
//! through the journal (the pending secret and the new registration
//! access token in one write) before anything uses it. The client cannot
//! choose its secret (§2.2: "The client MUST NOT be allowed to overwrite
//! its existing client secret with its own chosen value"), and a server
//! that replaces it does so atomically, so this is the server-generated,
//! replacing path, the one whose lost reply the journal cannot cover: a
//! reply lost after a server replaced the secret *and* the access token
//! loses both. rekeyd cannot prevent that; it says so in `rekeyd check`
//! and the README. A reply lost after a server rotated only the access
//! token (oidc-provider's `rotateRegistrationAccessToken`) loses the
//! management channel, never client authentication: the secret is the one
//! the journal holds, and a refused access token is reported as needing an
//! operator (a new token in `access_token_file`).
//!
//! Errors are RFC 6750 §3.1 bearer errors (`401 invalid_token`) for the
//! access token and RFC 7591 §3.2.2 (`400 invalid_client_metadata`) for
//! the metadata.

use futures_util::future::BoxFuture;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::http::{Reply, Transport, with_json};
use super::{
    Capabilities, CreateRequest, Deleted, ErrorKind, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, ValueOrigin, classify_secret_api,
};
use crate::token::Token;

/// Server-generated values that replace the one secret (or leave it as it
/// is); nothing to tag, list or delete.
pub const CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Server,
    overlap: Overlap::Replace,
    retire: Retire::Replaced,
    tags: false,
    lists: false,
};

/// Fields a client must not send in an update (RFC 7592 §2.2), and the
/// secret, which it may send only unchanged: leaving it out keeps it.
const NOT_SENT: [&str; 5] = [
    "registration_access_token",
    "registration_client_uri",
    "client_secret_expires_at",
    "client_id_issued_at",
    "client_secret",
];

/// The client's registration at `client_uri`.
pub struct RegistrationApi {
    transport: Transport,
    client_uri: Url,
    /// The client's id: the read metadata must be this client's.
    client_id: String,
    /// `access_token_file`, named in the error for a refused token.
    token_file: String,
}

/// What an update returned: the client's secret (perhaps unchanged), a new
/// registration access token when the server rotated it, and when the
/// secret expires (`client_secret_expires_at`, 0 = never).
#[derive(Debug)]
pub struct Updated {
    pub client_secret: SecretString,
    pub registration_access_token: Option<SecretString>,
    pub client_secret_expires_at: Option<u64>,
}

impl RegistrationApi {
    pub fn new(
        transport: Transport,
        client_uri: Url,
        client_id: String,
        token_file: &std::path::Path,
    ) -> Self {
        RegistrationApi {
            transport,
            client_uri,
            client_id,
            token_file: token_file.display().to_string(),
        }
    }

    async fn call(
        &self,
        operation: &'static str,
        method: Method,
        bearer: &Token,
        body: Option<&Value>,
    ) -> Result<Map<String, Value>, ProviderError> {
        let request = self
            .transport
            .http
            .inner()
            .request(method, self.client_uri.clone())
            .bearer_auth(bearer.access_token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        let request = match body {
            Some(body) => with_json(request, body),
            None => request,
        };
        let reply = self
            .transport
            .send(operation, request, &[&bearer.access_token])
            .await?;
        self.read(operation, &reply)
    }

    /// A 2xx reply's JSON object, which must describe this client; a
    /// refusal as [`refusal`].
    fn read(
        &self,
        operation: &'static str,
        reply: &Reply,
    ) -> Result<Map<String, Value>, ProviderError> {
        if !(200..300).contains(&reply.status) {
            return Err(refusal(operation, reply, &self.token_file));
        }
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&reply.body) else {
            return Err(
                reply.unexpected(operation, "expected the client's metadata as a JSON object")
            );
        };
        if body.get("client_id").and_then(Value::as_str) != Some(self.client_id.as_str()) {
            return Err(reply.unexpected(
                operation,
                "the metadata's client_id is not the configured client_id",
            ));
        }
        Ok(body)
    }

    /// Reads the client's metadata and writes it back unchanged (RFC 7592
    /// §2.1, §2.2): the update the server may answer with a new secret or
    /// a new registration access token.
    pub async fn update(&self, bearer: &Token) -> Result<Updated, ProviderError> {
        let mut metadata = self
            .call("registration read", Method::GET, bearer, None)
            .await?;
        for field in NOT_SENT {
            metadata.remove(field);
        }
        // §2.2: a null value asks the server to delete the field; what the
        // read showed as null is absent anyway.
        metadata.retain(|_, v| !v.is_null());
        let reply = self
            .call(
                "registration update",
                Method::PUT,
                bearer,
                Some(&Value::Object(metadata)),
            )
            .await?;
        let text = |field: &str| {
            reply
                .get(field)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .map(|v| SecretString::from(v.to_string()))
        };
        let Some(client_secret) = text("client_secret") else {
            return Err(ProviderError::transient(
                "registration update",
                "the reply carries no client_secret (is the client registered with a secret-based token_endpoint_auth_method?)",
            ));
        };
        Ok(Updated {
            client_secret,
            registration_access_token: text("registration_access_token")
                .filter(|t| t.expose_secret() != bearer.access_token.expose_secret()),
            client_secret_expires_at: reply
                .get("client_secret_expires_at")
                .and_then(Value::as_u64)
                .filter(|t| *t > 0),
        })
    }
}

/// A refused read or update. A refused registration access token (401,
/// RFC 6750 `invalid_token`) will not come back by itself: it needs an
/// operator, and the error says what was lost and what was not.
fn refusal(operation: &'static str, reply: &Reply, token_file: &str) -> ProviderError {
    let mut error = reply.refusal(operation, classify_secret_api);
    if reply.status == 401 || reply.status == 403 {
        error.kind = ErrorKind::Refused;
        error.detail = format!(
            "the registration access token was refused ({}): the management channel is lost, \
             perhaps to a lost reply of an update that replaced the token; client authentication \
             is not affected. Put a new registration access token in {token_file}",
            if error.detail.is_empty() {
                "no reason given"
            } else {
                error.detail.as_str()
            }
        );
    }
    error
}

impl SecretApi for RegistrationApi {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        _bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        _request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            let updated = self.update(bearer).await?;
            Ok(NewSecret {
                id: None,
                value: updated.client_secret,
                registration_access_token: updated.registration_access_token,
            })
        })
    }

    fn delete<'a>(
        &'a self,
        _bearer: &'a Token,
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        // Never asked: the one secret is replaced, never deleted.
        Box::pin(async { Ok(Deleted::NotFound) })
    }
}
