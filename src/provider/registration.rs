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
        // §3 lets a server replace the token on a read too: the update
        // then goes out with the new one, which is reported as new unless
        // the update replaces it again. (Should the update fail, that
        // token is lost with it: the refused-token error says what to do.)
        let read_token = new_token(&metadata, &bearer.access_token);
        let update_bearer = match &read_token {
            Some(token) => &Token::new(token.clone(), "Bearer".into(), None, bearer.lifetime),
            None => bearer,
        };
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
                update_bearer,
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
            registration_access_token: new_token(&reply, &update_bearer.access_token)
                .or(read_token),
            client_secret_expires_at: reply
                .get("client_secret_expires_at")
                .and_then(Value::as_u64)
                .filter(|t| *t > 0),
        })
    }
}

/// The reply's `registration_access_token` when it is not `sent`, the
/// one the request carried.
fn new_token(reply: &Map<String, Value>, sent: &SecretString) -> Option<SecretString> {
    reply
        .get("registration_access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && *t != sent.expose_secret())
        .map(|t| SecretString::from(t.to_string()))
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
                // RFC 7591 §3.2.1: seconds since the epoch, UTC (0, never,
                // is `None` already); beyond the clock's range, unknown.
                expires_at: updated.client_secret_expires_at.and_then(|t| {
                    std::time::SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t))
                }),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;

    use super::*;
    use crate::config::EndpointsConfig;
    use crate::provider::{HttpClient, Redactor};

    const JSON: [(axum::http::HeaderName, &str); 1] =
        [(axum::http::header::CONTENT_TYPE, "application/json")];

    /// A registration endpoint that replaces its token on every read and
    /// on every update (RFC 7592 §3 allows both) and keeps the secret; it
    /// records the token each request carried.
    async fn server() -> (Url, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = Arc::new(Mutex::new(0u32));
        let reply = {
            let seen = seen.clone();
            move |headers: HeaderMap| {
                let seen = seen.clone();
                let token = token.clone();
                async move {
                    let auth = headers["authorization"].to_str().unwrap().to_string();
                    seen.lock().unwrap().push(auth.clone());
                    let mut current = token.lock().unwrap();
                    if auth != format!("Bearer rat-{current}") {
                        return (
                            StatusCode::UNAUTHORIZED,
                            JSON,
                            r#"{"error":"invalid_token"}"#.to_string(),
                        );
                    }
                    *current += 1;
                    let body = serde_json::json!({
                        "client_id": "c",
                        "client_secret": "kept-secret",
                        "client_name": "x",
                        "registration_access_token": format!("rat-{current}"),
                        "registration_client_uri": "ignored",
                        "client_secret_expires_at": 0,
                    });
                    (StatusCode::OK, JSON, body.to_string())
                }
            }
        };
        let app = Router::new().route("/reg/c", get(reply.clone()).put(reply));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/reg/c").parse().unwrap(), seen)
    }

    fn api(url: Url) -> RegistrationApi {
        let endpoints = EndpointsConfig {
            token_url: url.clone(),
            secrets_url: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        };
        let transport = Transport {
            http: HttpClient::new(&endpoints).unwrap(),
            redactor: Redactor::new(Vec::<String>::new()),
            default_lifetime: Duration::from_secs(3600),
        };
        RegistrationApi::new(transport, url, "c".into(), std::path::Path::new("/etc/rat"))
    }

    fn bearer(value: &str) -> Token {
        Token::new(
            SecretString::from(value.to_string()),
            "Bearer".into(),
            None,
            Duration::from_secs(60),
        )
    }

    #[tokio::test]
    async fn a_token_replaced_by_the_read_carries_the_update() {
        let (url, seen) = server().await;
        let updated = api(url).update(&bearer("rat-0")).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            ["Bearer rat-0", "Bearer rat-1"],
            "the update went out with the token the read returned"
        );
        assert_eq!(
            updated.registration_access_token.unwrap().expose_secret(),
            "rat-2"
        );
        assert_eq!(updated.client_secret.expose_secret(), "kept-secret");
        assert_eq!(updated.client_secret_expires_at, None, "0 is never");
    }

    #[tokio::test]
    async fn a_refused_token_needs_an_operator_and_names_the_file() {
        let (url, _) = server().await;
        let e = api(url).update(&bearer("stale")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert_eq!(e.status, Some(401));
        assert_eq!(e.code.as_deref(), Some("invalid_token"));
        let text = e.to_string();
        assert!(
            text.contains("client authentication is not affected"),
            "{text}"
        );
        assert!(text.contains("/etc/rat"), "{text}");
    }
}
