//! The local HTTP API and the diagnostics listener.
//!
//! The token API ([`router`]):
//! - `GET /v1/token/{name}`: the current token (needs `X-Rekeyd-Key`).
//!   `name` is a credential or one of its token profiles
//!   (`[[credentials.tokens]]`); every route below takes either.
//! - `POST /v1/token/{name}/refresh`: log in again now and answer like
//!   `GET /v1/token/{name}` (needs the key); see [`post_refresh`].
//! - `GET /v1/status`: per-credential status (needs `X-Rekeyd-Key`), one
//!   entry per token: a token profile's carries `profile_of`, the name of
//!   its credential (whose entry shows the rotation).
//! - `POST /v1/rotate/{name}`: request a secret rotation now (needs the key).
//! - `GET /v1/history/{name}`: the credential's rotation history from the
//!   store, as `rekeyd history NAME --json` prints it (needs the key).
//!
//! The diagnostics ([`diag_router`]): `GET /livez`, `GET /readyz`,
//! `GET /readyz/{name}`, `GET /metrics`; no key, they hold no secrets. With
//! a `[diag]` listener they are served there only (the token API answers
//! `404 served_by_diag` for them); without one, the token API serves them
//! too, as it always did.
//!
//! Requests to the token API carrying `X-Forwarded-For` (or `Forwarded`,
//! `X-Real-IP`) are refused: the API is meant for programs on the same host
//! or pod, and a proxy in front of it would turn a local secret into a
//! remote one (the SSRF pattern). The diagnostics listener serves nothing
//! a proxy could leak, so it does not check.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::credential::{CredentialHandle, SinkFreshness};
use crate::daemon::Registry;
use crate::fsutil;
use crate::metrics::{self, ForcedLabels};
use crate::token::Token;
use crate::token::forced::{self, Ticket, Wait};

pub const KEY_HEADER: &str = "x-rekeyd-key";

#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub key: Arc<SecretString>,
    /// How long `POST /v1/token/{name}/refresh` waits for its login before
    /// answering `504 refresh_pending` ([`forced_wait`]).
    pub forced_wait: Duration,
    /// Where `GET /v1/history/{name}` reads the rotation history.
    pub store: Arc<dyn crate::store::Store>,
}

/// Largest body `POST /v1/token/{name}/refresh` reads, in bytes. The one
/// it takes, `{"rejected_sha256": "<64 hex digits>"}`, is 87 bytes; this
/// leaves room for whitespace and no more, because the body is read before
/// the key is checked (axum's default would buffer 2 MiB per request for
/// anyone who can connect).
pub const MAX_REFRESH_BODY: usize = 4096;

/// How long a forced refresh waits for its login: nine tenths of the
/// listener's `request_timeout`, so that the answer is written before the
/// listener gives up on the request and closes the connection.
pub fn forced_wait(request_timeout: Duration) -> Duration {
    request_timeout - request_timeout / 10
}

/// The diagnostics paths, which [`diag_router`] serves.
pub const DIAG_PATHS: [&str; 4] = ["/livez", "/readyz", "/readyz/{name}", "/metrics"];

/// The token API. `diag_elsewhere`: a `[diag]` listener serves the
/// diagnostics, so this one answers them with a pointer there.
pub fn router(state: ApiState, diag_elsewhere: bool) -> Router {
    let registry = state.registry.clone();
    let tokens = Router::new()
        .route("/v1/token/{name}", get(get_token))
        .route(
            "/v1/token/{name}/refresh",
            post(post_refresh).layer(DefaultBodyLimit::max(MAX_REFRESH_BODY)),
        )
        .route("/v1/status", get(get_status))
        .route("/v1/rotate/{name}", post(post_rotate))
        .route("/v1/history/{name}", get(get_history))
        .with_state(state);
    let diag = if diag_elsewhere {
        DIAG_PATHS
            .iter()
            .fold(Router::new(), |r, path| r.route(path, get(served_by_diag)))
    } else {
        diag_routes().with_state(registry)
    };
    tokens
        .merge(diag)
        .layer(middleware::from_fn(refuse_forwarded))
}

/// The diagnostics listener: probes and metrics, never a token.
pub fn diag_router(registry: Arc<Registry>) -> Router {
    diag_routes()
        .fallback(jwks_or_not_found)
        .with_state(registry)
}

/// How long a server may cache a served JWK Set (RFC 9111 `max-age`):
/// well inside the rotation's verify window, so that a server honouring
/// it fetches a newly published key while rekeyd still tries it.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(30);

/// `GET {serve_path}`: the JWKS file of a `[credentials.jwks]`, read
/// afresh for every request (a few hundred bytes, replaced atomically),
/// as `application/jwk-set+json` (RFC 7517 §8.5.1); any other path is
/// not found.
async fn jwks_or_not_found(
    State(registry): State<Arc<Registry>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let Some(file) = registry.jwks_file(uri.path()) else {
        return diag_only().await;
    };
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a JWK Set is read with GET",
        );
    }
    match tokio::fs::read(&file).await {
        // I7: this listener is often on every interface. Only a set of
        // public keys leaves through it, whatever the file holds (a private
        // JWK written into it by hand, the key file named as `file` by
        // mistake, a file replaced behind rekeyd's back).
        Ok(body) if !crate::provider::jwks::is_public_set(&body) => {
            tracing::warn!(path = %uri.path(), file = %file.display(), "the JWKS file holds no JWK Set of public keys; not served");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "jwks_unavailable",
                "the JWK Set is not published yet",
            )
        }
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/jwk-set+json".to_string()),
                (
                    header::CACHE_CONTROL,
                    format!("max-age={}", JWKS_MAX_AGE.as_secs()),
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(path = %uri.path(), file = %file.display(), error = %e, "cannot read the JWKS file to serve");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "jwks_unavailable",
                "the JWK Set is not published yet",
            )
        }
    }
}

fn diag_routes() -> Router<Arc<Registry>> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/readyz/{name}", get(readyz_one))
        .route("/metrics", get(metrics))
}

async fn served_by_diag() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "served_by_diag",
        "probes and metrics are served by the diagnostics listener ([diag] listen)",
    )
}

async fn diag_only() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "the diagnostics listener serves GET /livez, /readyz, /readyz/{name} and /metrics only",
    )
}

async fn refuse_forwarded(request: Request, next: Next) -> Response {
    let relayed = ["x-forwarded-for", "forwarded", "x-real-ip"]
        .iter()
        .any(|h| request.headers().contains_key(*h));
    if relayed {
        return error(
            StatusCode::FORBIDDEN,
            "forwarded_request",
            "requests relayed by a proxy (X-Forwarded-For, Forwarded, X-Real-IP) are refused",
        );
    }
    next.run(request).await
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response {
    (status, Json(json!({"error": code, "detail": detail}))).into_response()
}

fn lookup(registry: &Registry, name: &str) -> Option<CredentialHandle> {
    registry.snapshot().get(name).cloned()
}

fn unknown_credential() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "unknown_credential",
        "no credential of that name",
    )
}

/// The refusal to send, if the request lacks the right key.
fn check_key(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(KEY_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let expected = state.key.expose_secret().as_bytes();
    if given.is_empty() || !bool::from(given.ct_eq(expected)) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "missing_or_wrong_key",
            "send the content of the API key file in the X-Rekeyd-Key header",
        ));
    }
    None
}

/// The reply of `GET /v1/token/{name}`, fields in alphabetical order.
#[derive(Serialize)]
struct TokenReply<'a> {
    access_token: &'a str,
    #[serde(serialize_with = "serialize_display")]
    expires_at: humantime::Rfc3339Timestamp,
    expires_in: u64,
    token_type: &'a str,
}

fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// The hot path: borrows what it needs (no copy of the request headers, of
/// the credential's handle or of a JSON tree) and serializes once.
async fn get_token(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    request: Request,
) -> Response {
    if let Some(denied) = check_key(&state, request.headers()) {
        return denied;
    }
    let snapshot = state.registry.snapshot();
    let Some(handle) = snapshot.get(&name) else {
        return unknown_credential();
    };
    match handle.valid_token() {
        Some(token) => token_response(handle, &token),
        None => no_valid_token(handle),
    }
}

/// The answer of `GET /v1/token/{name}` for `token`.
fn token_response(handle: &CredentialHandle, token: &Token) -> Response {
    let reply = TokenReply {
        access_token: token.access_token.expose_secret(),
        expires_at: humantime::format_rfc3339_seconds(token.expires_at_wall()),
        expires_in: token.remaining(handle.clock.now()).as_secs(),
        token_type: &token.token_type,
    };
    let mut response = Json(reply).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn no_valid_token(handle: &CredentialHandle) -> Response {
    let detail = handle
        .status
        .borrow()
        .last_error
        .clone()
        .unwrap_or_else(|| "no token obtained yet".to_string());
    error(StatusCode::SERVICE_UNAVAILABLE, "no_valid_token", &detail)
}

/// `POST /v1/token/{name}/refresh`: an application whose token was refused
/// asks for a new one now (decided by [`forced::decide`]).
///
/// Body: empty, or `{"rejected_sha256": "<64 hex digits>"}`, the SHA-256
/// of the `access_token` the application saw refused. Answers:
/// - `200` with the body of `GET /v1/token/{name}`: the token of the
///   forced login this request started or joined, or, without a login,
///   the token served now when it is not the refused one;
/// - `429 refresh_rate_limited` with `Retry-After` (seconds): a forced
///   login of this credential started less than
///   `refresh.min_forced_interval` ago (and is over), or the provider's
///   quota backoff is running;
/// - `502 refresh_failed`: the login failed; `detail` says why (the
///   provider's status and error, no secret), `serving_previous_token`
///   whether the previous token is still served (I8), and `Retry-After`
///   is the provider's when it sent one;
/// - `504 refresh_pending`: the login did not finish within
///   [`forced_wait`]; it goes on, and `GET /v1/token/{name}` serves its
///   token once it lands;
/// - `400 bad_request` for a body of another shape, `413 body_too_large`
///   for one over [`MAX_REFRESH_BODY`], `401`, `404` as `GET`.
async fn post_refresh(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(denied) = check_key(&state, &headers) {
        return denied;
    }
    let Some(handle) = lookup(&state.registry, &name) else {
        return unknown_credential();
    };
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!(
                    "the body must be empty or a JSON object {{\"rejected_sha256\": \"<64 hex digits>\"}}, at most {MAX_REFRESH_BODY} bytes"
                ),
            );
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the request body could not be read",
            );
        }
    };
    let rejected = match rejected_sha256(&body) {
        Ok(rejected) => rejected,
        Err(detail) => return error(StatusCode::BAD_REQUEST, "bad_request", detail),
    };
    let current = handle.valid_token();
    let serves_other = rejected
        .zip(current.as_ref())
        .is_some_and(|(rejected, token)| !forced::is_rejected(token, &rejected));
    let (outcome, response) = match handle.forced.request(serves_other, handle.clock.now()) {
        Ticket::ServeCurrent => {
            let token = current.expect("another token is served");
            ("served_current", token_response(&handle, &token))
        }
        Ticket::TooSoon { retry_after, cause } => {
            let detail = match cause {
                Wait::Interval => {
                    "a forced login of this credential started less than refresh.min_forced_interval ago; ask again after Retry-After"
                }
                Wait::ProviderQuota => {
                    "the provider answered the last login with a quota error; rekeyd waits as long as it asked before logging in again"
                }
            };
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "refresh_rate_limited",
                detail,
            );
            set_retry_after(&mut response, retry_after);
            ("rate_limited", response)
        }
        Ticket::Await { finished, started } => {
            if started {
                handle.refresh_now.notify_one();
            }
            match tokio::time::timeout(state.forced_wait, handle.forced.outcome(finished)).await {
                Err(_) => (
                    "pending",
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "refresh_pending",
                        "the login is still running; GET /v1/token/{name} serves its token once it lands",
                    ),
                ),
                Ok(Ok(())) => match handle.valid_token() {
                    Some(token) => ("refreshed", token_response(&handle, &token)),
                    None => ("failed", no_valid_token(&handle)),
                },
                Ok(Err(failure)) => {
                    let body = json!({
                        "error": "refresh_failed",
                        "detail": failure.reason,
                        "serving_previous_token": handle.valid_token().is_some(),
                    });
                    let mut response = (StatusCode::BAD_GATEWAY, Json(body)).into_response();
                    if let Some(wait) = failure.retry_after {
                        set_retry_after(&mut response, wait);
                    }
                    ("failed", response)
                }
            }
        }
    };
    metrics::global()
        .forced_refreshes
        .get_or_create(&ForcedLabels {
            credential: name,
            outcome,
        })
        .inc();
    response
}

/// Reads the body of `POST /v1/token/{name}/refresh`. The errors never
/// quote the body: an application may send its token where the digest
/// belongs (I7).
fn rejected_sha256(body: &[u8]) -> Result<Option<[u8; 32]>, &'static str> {
    const SHAPE: &str =
        "the body must be empty or a JSON object {\"rejected_sha256\": \"<64 hex digits>\"}";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| SHAPE)?;
    let object = value.as_object().ok_or(SHAPE)?;
    if object.keys().any(|k| k != "rejected_sha256") {
        return Err(SHAPE);
    }
    match object.get("rejected_sha256") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(text, &mut digest).map_err(|_| {
                "rejected_sha256 must be 64 hex digits: the SHA-256 of the access_token that was refused"
            })?;
            Ok(Some(digest))
        }
        Some(_) => Err(
            "rejected_sha256 must be a string of 64 hex digits: the SHA-256 of the access_token that was refused",
        ),
    }
}

fn set_retry_after(response: &mut Response, wait: Duration) {
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(forced::retry_after_seconds(wait)),
    );
}

async fn get_status(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(denied) = check_key(&state, &headers) {
        return denied;
    }
    let credentials: Vec<_> = state
        .registry
        .snapshot()
        .values()
        .map(|h| {
            let mut value = serde_json::to_value(&*h.status.borrow()).expect("status serializes");
            if let Some(credential) = state.registry.profile_of(&h.name) {
                value["profile_of"] = json!(credential);
            }
            value["ready"] = json!(h.ready());
            value["sinks"] = json!(h.sink_reports());
            value
        })
        .collect();
    Json(json!({ "credentials": credentials })).into_response()
}

/// `GET /v1/history/{name}`: `200` with `{credential, verified,
/// verify_error, entries: [{seq, at, step, rid?, secret_id?, detail?,
/// dropped?, prev, digest}]}` (oldest first; no entries before the first
/// step); `409 token_profile` for a token profile (its credential's name
/// is in `detail`); `503 store_unavailable` when the store cannot be read;
/// `500 history_unreadable` when it holds a history that does not parse
/// (no retry helps: an operator inspects it, `rekeyd history --verify`);
/// `401`, `404` as elsewhere.
async fn get_history(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = check_key(&state, &headers) {
        return denied;
    }
    if lookup(&state.registry, &name).is_none() {
        return unknown_credential();
    }
    if let Some(credential) = state.registry.profile_of(&name) {
        return error(
            StatusCode::CONFLICT,
            "token_profile",
            &format!(
                "{name:?} is a token profile of credential {credential:?}, whose history holds its rotations"
            ),
        );
    }
    match crate::history::load(state.store.as_ref(), &name).await {
        Ok(doc) => {
            let doc = doc.unwrap_or_else(|| crate::history::Document::new(&name));
            Json(crate::history::to_json(&doc, &name)).into_response()
        }
        Err(e @ crate::history::HistoryError::Corrupt { .. }) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "history_unreadable",
            &e.to_string(),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            &e.to_string(),
        ),
    }
}

async fn post_rotate(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = check_key(&state, &headers) {
        return denied;
    }
    let Some(handle) = lookup(&state.registry, &name) else {
        return unknown_credential();
    };
    if let Some(credential) = state.registry.profile_of(&name) {
        return error(
            StatusCode::CONFLICT,
            "token_profile",
            &format!(
                "{name:?} is a token profile of credential {credential:?}, whose rotation \
                 replaces the secret of all its tokens: rotate {credential:?}"
            ),
        );
    }
    if !handle.rotates {
        return error(
            StatusCode::CONFLICT,
            "rotation_not_configured",
            "this credential has no [credentials.rotation] section",
        );
    }
    handle.rotate_now.notify_one();
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "rotation requested", "credential": name})),
    )
        .into_response()
}

async fn readyz_one(
    State(registry): State<Arc<Registry>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    let Some(handle) = lookup(&registry, &name) else {
        return unknown_credential();
    };
    // Not ready while a token file holds an expired token (or none): the
    // application reading it fails as if rekeyd had no token.
    let ready = handle.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let sinks: BTreeMap<String, &str> = handle
        .sink_reports()
        .into_iter()
        .map(|s| (s.path, s.freshness.as_str()))
        .collect();
    let body = json!({
        "ready": ready,
        "credential": name,
        "token": handle.valid_token().is_some(),
        "sinks": sinks,
    });
    (status, Json(body)).into_response()
}

/// OpenMetrics exposition. Token validity changes with time alone, so it is
/// brought up to date at each scrape.
async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    let m = crate::metrics::global();
    let snapshot = registry.snapshot();
    for (name, handle) in snapshot.iter() {
        m.token_valid
            .get_or_create(&crate::metrics::credential(name))
            .set(i64::from(handle.valid_token().is_some()));
    }
    let sinks = snapshot.iter().flat_map(|(name, h)| {
        h.sink_reports().into_iter().map(move |s| {
            let current = s.freshness == SinkFreshness::Current;
            (name.clone(), s.path, s.freshness.is_valid(), current)
        })
    });
    let text = m.encode_with_sinks(sinks);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn livez() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(registry): State<Arc<Registry>>) -> Response {
    let snapshot = registry.snapshot();
    let per: BTreeMap<&str, bool> = snapshot
        .iter()
        .map(|(name, h)| (name.as_str(), h.ready()))
        .collect();
    let ready = per.values().all(|r| *r);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "credentials": per}))).into_response()
}

/// Reads the API key, creating a random one (mode 0640) if the file is missing.
pub fn load_or_create_key(path: &Path) -> io::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = text.trim();
            if key.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("API key file {} is empty", path.display()),
                ));
            }
            Ok(SecretString::from(key.to_string()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = hex::encode(rand::random::<[u8; 32]>());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            fsutil::write_atomic(path, format!("{key}\n").as_bytes(), 0o640)?;
            Ok(SecretString::from(key))
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read API key file {}: {e}", path.display()),
        )),
    }
}
