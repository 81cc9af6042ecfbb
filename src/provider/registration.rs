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

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::http::{Reply, Transport, with_json};
use super::jwks;
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
    /// The registration access token a reply replaced the sent one with
    /// (§3), until the rotation takes it to store it
    /// ([`SecretApi::take_renewed_registration_token`]); calls meanwhile
    /// are sent with it, the one that works.
    renewed: Mutex<Option<SecretString>>,
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
            renewed: Mutex::new(None),
        }
    }

    fn renewed(&self) -> std::sync::MutexGuard<'_, Option<SecretString>> {
        self.renewed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The token to send: one a reply replaced `bearer` with, if any.
    fn live(&self, bearer: &Token) -> Token {
        match self.renewed().as_ref() {
            Some(token) => Token::new(token.clone(), "Bearer".into(), None, bearer.lifetime),
            None => bearer.clone(),
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
        let body = self.read(operation, &reply)?;
        if let Some(token) = new_token(&body, &bearer.access_token) {
            // The sent token is dead (§3): kept until stored, and sent
            // from now on.
            *self.renewed() = Some(token);
        }
        Ok(body)
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

    /// The client's metadata (RFC 7592 §2.1).
    async fn get(&self, bearer: &Token) -> Result<Map<String, Value>, ProviderError> {
        self.call("registration read", Method::GET, &self.live(bearer), None)
            .await
    }

    /// Reads the client's metadata, lets `edit` change it and writes all of
    /// it back (RFC 7592 §2.1, §2.2): the reply, or `None` when `edit`
    /// says nothing changes (no write). A token a reply replaces is sent
    /// from then on (§3 lets a server replace it on a read too) and kept
    /// for the rotation to store.
    async fn edit(
        &self,
        bearer: &Token,
        edit: impl FnOnce(&mut Map<String, Value>) -> Result<bool, ProviderError>,
    ) -> Result<Option<Map<String, Value>>, ProviderError> {
        let mut metadata = self.get(bearer).await?;
        if !edit(&mut metadata)? {
            return Ok(None);
        }
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
                &self.live(bearer),
                Some(&Value::Object(metadata)),
            )
            .await?;
        Ok(Some(reply))
    }

    /// Reads the client's metadata and writes it back unchanged (RFC 7592
    /// §2.1, §2.2): the update the server may answer with a new secret or
    /// a new registration access token.
    pub async fn update(&self, bearer: &Token) -> Result<Updated, ProviderError> {
        let Some(reply) = self.edit(bearer, |_| Ok(true)).await? else {
            unreachable!("an unchanged write is still written");
        };
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
            registration_access_token: self.renewed().take(),
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

    fn take_renewed_registration_token(&self) -> Option<SecretString> {
        self.renewed().take()
    }
}

/// A `private_key_jwt` client's keys in its registration's `jwks` (RFC
/// 7591 §2: the client's JWK Set by value): a new key is published *next
/// to* the current one by an update whose `jwks` holds both, and the old
/// one withdrawn by an update without it. Each update sends the whole set
/// as read just before, so the one-call steps are idempotent: publishing
/// a key the set holds, or withdrawing one it lacks, writes nothing.
pub struct RegistrationKeys {
    api: RegistrationApi,
}

/// Keys rekeyd generates, any number published at once, listed (by RFC
/// 7638 thumbprint, [`jwks`]) and withdrawn one by one.
pub const KEY_CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Key,
    overlap: Overlap::Many { max: None },
    retire: Retire::Delete,
    tags: false,
    lists: true,
};

impl RegistrationKeys {
    pub fn new(api: RegistrationApi) -> Self {
        RegistrationKeys { api }
    }
}

/// The registration's `jwks`; a client whose keys are fetched from its
/// `jwks_uri` is refused: its keys are published where that URI points
/// (`[credentials.jwks]`), not in the registration.
fn registered_keys(
    operation: &'static str,
    metadata: &Map<String, Value>,
) -> Result<Value, ProviderError> {
    if metadata.contains_key("jwks_uri") && !metadata.contains_key("jwks") {
        return Err(ProviderError {
            kind: ErrorKind::Refused,
            operation,
            status: None,
            code: None,
            detail: "the client's keys are fetched from its jwks_uri, not registered as jwks: \
                     publish them where jwks_uri points ([credentials.jwks]) instead"
                .into(),
            retry_after: None,
        });
    }
    match metadata.get("jwks") {
        // I1: RFC 7592 §2.1 has the read show every registered field, and
        // §2.2 has an update clear what it leaves out. A read without
        // `jwks` cannot be taken for an empty set: the server holds the
        // key the client signs with somewhere, and a set of the new key
        // alone would replace it before the new key is proven.
        None => Err(ProviderError {
            kind: ErrorKind::Refused,
            operation,
            status: None,
            code: None,
            detail: "the registration shows no jwks (nor jwks_uri): the server keeps the \
                     client's keys where its registration does not show them, so an update \
                     with a JWK Set would replace them; register the client's public key as \
                     jwks"
                .into(),
            retry_after: None,
        }),
        Some(set) if set.get("keys").is_some_and(Value::is_array) => Ok(set.clone()),
        // I1: a set rekeyd cannot read (a JSON string, `keys` not an array)
        // may hold the key the client signs with now; writing a set of
        // rekeyd's own in its place would withdraw it.
        Some(_) => Err(ProviderError {
            kind: ErrorKind::Refused,
            operation,
            status: None,
            code: None,
            detail: "the registration's jwks is not a JWK Set ({\"keys\": [...]}); \
                     rekeyd does not overwrite it"
                .into(),
            retry_after: None,
        }),
    }
}

impl SecretApi for RegistrationKeys {
    fn capabilities(&self) -> Capabilities {
        KEY_CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move {
            let metadata = self.api.get(bearer).await?;
            let set = registered_keys("registration read", &metadata)?;
            Ok(jwks::listing(jwks::ids(&set), &self.api.client_id))
        })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            let op = "registration update";
            let (id, public) = jwks::public_of(op, request.value)?;
            self.api
                .edit(bearer, |metadata| {
                    let set = registered_keys(op, metadata)?;
                    match jwks::with_key(&set, &public) {
                        Some(set) => {
                            metadata.insert("jwks".into(), set);
                            Ok(true)
                        }
                        None => Ok(false),
                    }
                })
                .await?;
            Ok(NewSecret {
                id: Some(id),
                value: request.value.cloned().expect("public_of checked it"),
                expires_at: None,
                registration_access_token: self.api.renewed().take(),
            })
        })
    }

    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            let op = "registration update";
            let written = self
                .api
                .edit(bearer, |metadata| {
                    let set = registered_keys(op, metadata)?;
                    let Some(left) = jwks::without(&set, id) else {
                        return Ok(false);
                    };
                    if jwks::ids(&left).is_empty() {
                        // I1: the machine withdraws a key only once another
                        // is proven; a set this would empty means the
                        // registration is not what the journal says.
                        return Err(ProviderError {
                            kind: ErrorKind::Refused,
                            operation: op,
                            status: None,
                            code: None,
                            detail: format!(
                                "withdrawing key {id} would leave the client without a registered key; \
                                 nothing was changed"
                            ),
                            retry_after: None,
                        });
                    }
                    metadata.insert("jwks".into(), left);
                    Ok(true)
                })
                .await?;
            Ok(match written {
                Some(_) => Deleted::Deleted,
                None => Deleted::NotFound,
            })
        })
    }

    fn take_renewed_registration_token(&self) -> Option<SecretString> {
        self.api.renewed().take()
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

    /// A registration holding `metadata`; every `PUT` body replaces it.
    async fn key_server(metadata: Value) -> (Url, Arc<Mutex<Value>>) {
        let state = Arc::new(Mutex::new(metadata));
        let get_state = state.clone();
        let put_state = state.clone();
        let app = Router::new().route(
            "/reg/c",
            get(move || {
                let state = get_state.clone();
                async move { (JSON, state.lock().unwrap().to_string()) }
            })
            .put(move |body: String| {
                let state = put_state.clone();
                async move {
                    let mut written: Value = serde_json::from_str(&body).unwrap();
                    written["client_id"] = "c".into();
                    *state.lock().unwrap() = written.clone();
                    (JSON, written.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/reg/c").parse().unwrap(), state)
    }

    #[tokio::test]
    async fn keys_are_published_next_to_the_old_and_the_last_one_is_never_withdrawn() {
        use crate::provider::key::{Alg, generate};
        let old = generate(Alg::Es256).unwrap();
        let new = generate(Alg::Es256).unwrap();
        let metadata = serde_json::json!({
            "client_id": "c",
            "client_name": "kept",
            "jwks": {"keys": [old.public_jwk()]},
        });
        let (url, state) = key_server(metadata).await;
        let keys = RegistrationKeys::new(api(url));
        let bearer = bearer("rat");
        let request = CreateRequest {
            description: "",
            value: Some(&new.to_secret()),
        };
        let created = keys.create(&bearer, request).await.unwrap();
        assert_eq!(created.id, Some(new.thumbprint()));
        let listed: Vec<String> = keys
            .list(&bearer)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(listed, [old.thumbprint(), new.thumbprint()]);
        assert_eq!(
            state.lock().unwrap()["client_name"],
            "kept",
            "the rest is written back"
        );
        let written = state.lock().unwrap().to_string();
        assert!(
            !written.contains(&private_d(&new)),
            "only the public key is sent"
        );

        assert_eq!(
            keys.delete(&bearer, &old.thumbprint()).await.unwrap(),
            Deleted::Deleted
        );
        assert_eq!(
            keys.delete(&bearer, &old.thumbprint()).await.unwrap(),
            Deleted::NotFound
        );
        let e = keys.delete(&bearer, &new.thumbprint()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.detail.contains("without a registered key"), "{e}");
        let listed: Vec<String> = keys
            .list(&bearer)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(listed, [new.thumbprint()]);
    }

    #[tokio::test]
    async fn a_jwks_that_is_no_set_is_never_overwritten() {
        use crate::provider::key::{Alg, generate};
        let old = generate(Alg::Es256).unwrap();
        let new = generate(Alg::Es256).unwrap();
        // A server that keeps the set as a JSON string, and one whose
        // `keys` is an object: both hold the key the client signs with.
        let encoded = serde_json::json!({"keys": [old.public_jwk()]}).to_string();
        let odd = [
            Value::String(encoded),
            serde_json::json!({"keys": {"0": old.public_jwk()}}),
        ];
        for jwks in odd {
            let metadata = serde_json::json!({"client_id": "c", "jwks": jwks.clone()});
            let (url, state) = key_server(metadata.clone()).await;
            let keys = RegistrationKeys::new(api(url));
            let request = CreateRequest {
                description: "",
                value: Some(&new.to_secret()),
            };
            let e = keys.create(&bearer("rat"), request).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Refused, "{e}");
            assert!(e.detail.contains("not a JWK Set"), "{e}");
            assert_eq!(*state.lock().unwrap(), metadata, "nothing was written");
        }
    }

    #[tokio::test]
    async fn a_key_is_withdrawn_by_its_thumbprint_whatever_the_server_did_to_its_kid() {
        use crate::provider::key::{Alg, generate, generate_with_kid};
        // The operator's bootstrap key, registered with a kid of its own,
        // stored by the server once without the kid and once under another;
        // another key carries the operator's kid (RFC 7517 §4.5 allows it).
        let ours = generate_with_kid(Alg::Es256, "op-key-1");
        let theirs = generate(Alg::Rs256).unwrap();
        let current = generate(Alg::Es256).unwrap();
        let mut dropped = ours.public_jwk();
        dropped.as_object_mut().unwrap().remove("kid");
        let mut rewritten = ours.public_jwk();
        rewritten["kid"] = "server-7".into();
        let mut shared = theirs.public_jwk();
        shared["kid"] = "op-key-1".into();
        let metadata = serde_json::json!({
            "client_id": "c",
            "jwks": {"keys": [dropped, rewritten, shared.clone(), current.public_jwk()]},
        });
        let (url, state) = key_server(metadata).await;
        let keys = RegistrationKeys::new(api(url));
        let id = ours.thumbprint();
        let listed: Vec<String> = (keys.list(&bearer("rat")).await.unwrap())
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert!(listed.contains(&id), "listed by thumbprint: {listed:?}");
        assert_eq!(
            keys.delete(&bearer("rat"), &id).await.unwrap(),
            Deleted::Deleted
        );
        let left = state.lock().unwrap()["jwks"].clone();
        assert_eq!(
            jwks::ids(&left),
            [theirs.thumbprint(), current.thumbprint()]
        );
        assert_eq!(left["keys"][0], shared, "the other key is untouched");
    }

    /// RFC 7592 §2.1 has the read show all registered metadata, and §2.2
    /// has the server clear what an update leaves out. A server whose read
    /// leaves out `jwks` (keys kept elsewhere, or hidden from reads) would
    /// take a set of the new key alone as the whole set: the key the client
    /// signs with now would go before the new one is proven (I1).
    #[tokio::test]
    async fn a_registration_whose_read_shows_no_jwks_gets_no_set_written() {
        use crate::provider::key::{Alg, generate};
        let new = generate(Alg::Es256).unwrap();
        let metadata = serde_json::json!({
            "client_id": "c",
            "token_endpoint_auth_method": "private_key_jwt",
        });
        let (url, state) = key_server(metadata.clone()).await;
        let keys = RegistrationKeys::new(api(url));
        let request = CreateRequest {
            description: "",
            value: Some(&new.to_secret()),
        };
        let e = keys.create(&bearer("rat"), request).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused, "{e}");
        assert!(e.detail.contains("shows no jwks"), "{e}");
        assert_eq!(*state.lock().unwrap(), metadata, "nothing was written");
    }

    #[tokio::test]
    async fn a_client_whose_keys_are_at_a_jwks_uri_is_refused_with_the_reason() {
        let metadata = serde_json::json!({"client_id": "c", "jwks_uri": "https://c.example/jwks"});
        let (url, _) = key_server(metadata).await;
        let e = RegistrationKeys::new(api(url))
            .list(&bearer("rat"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.detail.contains("jwks_uri"), "{e}");
    }

    fn private_d(key: &crate::provider::key::ClientKey) -> String {
        let jwk: Value = serde_json::from_str(key.to_secret().expose_secret()).unwrap();
        jwk["d"].as_str().unwrap().to_string()
    }
}
