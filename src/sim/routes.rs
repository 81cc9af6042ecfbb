//! HTTP face of the simulation: one handler per provider endpoint, plus a
//! middleware that counts requests and injects the scripted faults.
//!
//! Each handler reproduces its provider's wire quirks on purpose (status
//! codes, casing of `token_type`, content-type strictness), because those
//! quirks are exactly what the daemon's provider modules must cope with.
//! Request bodies are parsed by hand rather than with axum's `Form`
//! extractor so that a wrong content type gets the provider's own error body
//! instead of axum's generic rejection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use base64::Engine as _;
use futures_util::StreamExt;
use futures_util::stream;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::debug;

use super::faults::{Endpoint, Fault};
use super::state::{AuthError, Issued, Issuer};
use super::{Shared, management, okta_keys};

/// Size of the body sent by the `huge` fault, and the chunk it is cut into.
const HUGE_BODY_BYTES: usize = 50 * 1024 * 1024;
const HUGE_CHUNK_BYTES: usize = 64 * 1024;

/// The scope MapsIndoors grants when none is requested.
const MAPSINDOORS_DEFAULT_SCOPE: &str = "client-apis";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/connect/token", post(mapsindoors_token))
        .route(
            "/api/clientcredentials",
            get(list_secrets).post(create_secret).delete(delete_secret),
        )
        .route("/api/security/oauth/token", post(mappls_token))
        .route("/oauth2/token", post(oauth2_token))
        .route("/oauth2/introspect", post(oauth2_introspect))
        .route("/oauth2/v1/token", post(okta_keys::token))
        .route(
            "/api/v1/apps/{app}/credentials/jwks",
            get(okta_keys::list).post(okta_keys::add),
        )
        .route(
            "/api/v1/apps/{app}/credentials/jwks/{id}",
            delete(okta_keys::delete),
        )
        .route(
            "/api/v1/apps/{app}/credentials/jwks/{id}/lifecycle/deactivate",
            post(okta_keys::deactivate),
        )
        .route(
            "/api/v1/apps/{app}/credentials/secrets",
            get(management::okta_list).post(management::okta_create),
        )
        .route(
            "/api/v1/apps/{app}/credentials/secrets/{id}",
            delete(management::okta_delete),
        )
        .route(
            "/api/v1/apps/{app}/credentials/secrets/{id}/lifecycle/deactivate",
            post(management::okta_deactivate),
        )
        .route("/oauth/token", post(management::auth0_token))
        .route(
            "/realms/{realm}/protocol/openid-connect/token",
            post(oauth2_token),
        )
        .route(
            "/admin/realms/{realm}/clients/{id}",
            put(management::keycloak_update_client),
        )
        .route("/{tenant}/oauth2/v2.0/token", post(management::entra_token))
        .route(
            "/v1.0/applications/{id}",
            get(management::entra_application),
        )
        .route(
            "/v1.0/applications/{id}/addPassword",
            post(management::entra_add_password),
        )
        .route(
            "/v1.0/applications/{id}/removePassword",
            post(management::entra_remove_password),
        )
        .route(
            "/api/v2/clients/{client_id}",
            patch(management::auth0_update_client),
        )
        .route("/healthz", get(|| async { "ok" }))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            faults_and_stats,
        ))
        .with_state(shared)
}

// ---------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------

async fn faults_and_stats(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(endpoint) = Endpoint::classify(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let decision = {
        let mut st = sh.lock();
        *st.stats.requests.entry(endpoint).or_default() += 1;
        let decision = st.faults.decide(endpoint, &mut rand::rng());
        if let Some(fault) = decision.fault {
            st.stats.faults_injected += 1;
            if fault == Fault::Drop {
                st.stats.responses_dropped += 1;
            }
            debug!(?endpoint, ?fault, "sim: injecting fault");
        }
        decision
    };
    if let Some(delay) = decision.latency {
        tokio::time::sleep(delay).await;
    }
    let mut response = match decision.fault {
        None => next.run(req).await,
        Some(Fault::Hang) => {
            // Released only by shutdown, so that a hung request cannot keep
            // the server (and the test that owns it) alive forever.
            sh.cancel.cancelled().await;
            html(StatusCode::SERVICE_UNAVAILABLE, SERVICE_UNAVAILABLE_PAGE)
        }
        Some(Fault::Fail) => html(StatusCode::SERVICE_UNAVAILABLE, SERVICE_UNAVAILABLE_PAGE),
        Some(Fault::Random5xx(code)) => server_error(code),
        Some(Fault::Quota { retry_after }) => quota_exceeded(endpoint, retry_after),
        Some(Fault::Garbage) => html(StatusCode::OK, GARBAGE_PAGE),
        Some(Fault::Huge) => huge_json(&sh),
        Some(Fault::Drop) => lose_response(next.run(req).await).await,
        Some(Fault::Echo) => echo_refusal(&sh, req).await,
    };
    if endpoint != Endpoint::Health {
        // Tokens and secret values must never be cached by an intermediary.
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if endpoint.is_token() {
            headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        }
    }
    response
}

const SERVICE_UNAVAILABLE_PAGE: &str = "<html>Service Unavailable</html>";

/// A 400 that echoes every secret value the request carried and the sim
/// knows for its client, in every field and header a client might read.
async fn echo_refusal(sh: &Shared, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1024 * 1024)
        .await
        .unwrap_or_default();
    let mut values = Vec::new();
    let mut client = None;
    for (key, value) in parse_form(&body) {
        match key.as_str() {
            "client_id" => client = Some(value),
            "grant_type" | "scope" => {}
            // client_secret, client_assertion and any other extra field.
            _ => values.push(value),
        }
    }
    let authorization = parts.headers.get(AUTHORIZATION);
    if let Some(header) = authorization {
        if let Some((id, secret)) = parse_basic(header) {
            client = Some(id);
            values.push(secret);
        }
        if let Some(credentials) = header.to_str().ok().and_then(|v| v.split_once(' ')) {
            // The Basic credentials as sent (base64), or the bearer token.
            values.push(credentials.1.trim().to_owned());
        }
    }
    {
        let st = sh.lock();
        if let Some(token) = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| strip_scheme(v, "Bearer"))
            .and_then(|t| st.registry.token(t, Instant::now()))
        {
            client = Some(token.client_id.clone());
        }
        if let Some(client) = &client {
            values.extend(
                st.registry
                    .secrets_of_client(client)
                    .map(|s| s.value.clone()),
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    values.retain(|v| !v.is_empty() && seen.insert(v.clone()));
    let first = values.first().cloned().unwrap_or_default();
    let all = values.join(" ");
    let mut response = json_response(
        StatusCode::BAD_REQUEST,
        json!({
            "error": first,
            "error_description": format!("rejected: {all}"),
            "error_uri": format!("https://sim.invalid/errors?echo={first}"),
            "code": first,
            "title": first,
            "message": all,
            "detail": all,
            "echo": values,
            "request": String::from_utf8_lossy(&body),
        }),
    );
    let headers = response.headers_mut();
    for (name, value) in [
        (
            WWW_AUTHENTICATE.as_str(),
            format!("Basic realm=\"sim\", error=\"{first}\""),
        ),
        ("x-echo", all),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

const GARBAGE_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\
<body><h1>Please sign in</h1><p>Your session has expired. \
This page is what a captive portal or a misrouted WAF returns with a 200.</p></body></html>\n";

fn html(status: StatusCode, page: &'static str) -> Response {
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// A load balancer's error page; the request never reached the provider.
fn server_error(code: u16) -> Response {
    match code {
        503 => html(StatusCode::SERVICE_UNAVAILABLE, SERVICE_UNAVAILABLE_PAGE),
        502 => html(
            StatusCode::BAD_GATEWAY,
            "<html><head><title>502 Bad Gateway</title></head><body><center>\
             <h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Internal Server Error",
        )
            .into_response(),
    }
}

/// Mappls reports an exhausted daily/hourly quota as 403; the others use
/// the conventional 429.
fn quota_exceeded(endpoint: Endpoint, retry_after: Option<u64>) -> Response {
    let status = if endpoint == Endpoint::MapplsToken {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let mut response = json_response(status, json!({"error": "quota_exceeded"}));
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A 200 whose JSON body never seems to end: produced chunk by chunk as the
/// client reads it, so the sim itself never holds more than one chunk.
fn huge_json(sh: &Shared) -> Response {
    let filler = Bytes::from(vec![b'A'; HUGE_CHUNK_BYTES]);
    let chunks = std::iter::once(Bytes::from_static(b"{\"access_token\":\"")).chain(
        std::iter::repeat_n(filler, HUGE_BODY_BYTES / HUGE_CHUNK_BYTES),
    );
    let body = stream::iter(chunks)
        .map(Ok::<_, Infallible>)
        // A client that stops reading must not be able to stall shutdown.
        .take_until(sh.cancel.clone().cancelled_owned());
    (
        StatusCode::OK,
        [(CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// The request has been performed; now lose the reply. Status and headers
/// go out with the first half of the body, then the body fails, which makes
/// hyper abort the connection: the client sees a transport error after the
/// server's state has already changed.
async fn lose_response(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let full = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let prefix = full.slice(..full.len() / 2);
    parts.headers.remove(CONTENT_LENGTH);
    if full.is_empty() {
        // A 204 carries no body for the failure to cut: answer as if it
        // had one, so that the client sees the connection break all the
        // same.
        parts.status = StatusCode::OK;
    }
    let body = stream::unfold(Some(prefix), |state| async move {
        match state {
            Some(prefix) => Some((Ok(prefix), None)),
            None => {
                // Give hyper a chance to flush the head before the error
                // tears the connection down.
                tokio::task::yield_now().await;
                Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "simulated lost response",
                    )),
                    None,
                ))
            }
        }
    })
    // The error ends the body for hyper; `take` keeps the stream finite
    // should anything poll it again.
    .take(2);
    Response::from_parts(parts, Body::from_stream(body))
}

// ---------------------------------------------------------------------------
// Token endpoints
// ---------------------------------------------------------------------------

pub(super) enum LoginError {
    InvalidClient,
    UnsupportedGrantType,
}

/// How the token endpoints write a successful reply: the lifetime field
/// and the kind of access token. The default is what real providers send:
/// an opaque token and `expires_in` in whole seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenReply {
    pub expires_in: ExpiresIn,
    /// Issue JWTs (`header.payload.signature`, unsigned; the signature part
    /// is the sim's opaque token, which is all the sim checks) whose `exp`
    /// claim is this many seconds after the moment of issue (negative:
    /// already past). `None`: opaque tokens.
    pub jwt_exp_in: Option<i64>,
}

/// The `expires_in` field of a successful token reply.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ExpiresIn {
    /// The token's lifetime in whole seconds, a JSON number.
    #[default]
    Seconds,
    /// The same, as a JSON string (`"3600"`), as some servers send it.
    SecondsAsString,
    /// No `expires_in` at all (RFC 6749 §5.1 only recommends it).
    Omitted,
    /// Exactly this value, whatever the token's real lifetime (`0`, `-5`,
    /// `"4.0"`, `3.5`, `"soon"`).
    Fixed(Value),
}

impl Shared {
    /// A successful token reply: `fields` plus `access_token` and
    /// `expires_in` as the current [`TokenReply`] says.
    pub(super) fn token_body(&self, issued: Issued, mut fields: Value) -> Value {
        let reply = self.lock().token_reply.clone();
        let access_token = match reply.jwt_exp_in {
            None => issued.access_token,
            Some(offset) => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                let b64 = |v: &Value| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
                };
                format!(
                    "{}.{}.{}",
                    b64(&json!({"alg": "none", "typ": "JWT"})),
                    b64(&json!({"sub": "sim", "iat": now, "exp": now + offset})),
                    issued.access_token
                )
            }
        };
        fields["access_token"] = Value::String(access_token);
        match reply.expires_in {
            ExpiresIn::Seconds => fields["expires_in"] = json!(issued.expires_in),
            ExpiresIn::SecondsAsString => {
                fields["expires_in"] = json!(issued.expires_in.to_string())
            }
            ExpiresIn::Omitted => {}
            ExpiresIn::Fixed(value) => fields["expires_in"] = value,
        }
        fields
    }
}

impl Shared {
    /// Authenticates the client and issues a token; shared by all three token
    /// endpoints because a client is a client whichever door it uses.
    pub(super) fn login(
        &self,
        endpoint: Endpoint,
        client_id: Option<&str>,
        secret: Option<&str>,
        grant_type: Option<&str>,
        issuer: Issuer,
        scope: Option<String>,
    ) -> Result<Issued, LoginError> {
        let now = Instant::now();
        let mut st = self.lock();
        let checked = match (client_id, secret) {
            (Some(id), Some(secret)) => st.registry.authenticate(id, secret, now),
            _ => Err(AuthError::UnknownClient),
        };
        if let Err(why) = checked {
            st.stats.logins_rejected += 1;
            if why == AuthError::Expired {
                st.stats.logins_expired += 1;
            }
            debug!(
                ?endpoint,
                client_id,
                reason = why.as_str(),
                "sim: login rejected"
            );
            return Err(LoginError::InvalidClient);
        }
        // Like IdentityServer, the client is authenticated before the grant
        // type is looked at.
        if grant_type != Some("client_credentials") {
            debug!(?endpoint, client_id, "sim: unsupported grant type");
            return Err(LoginError::UnsupportedGrantType);
        }
        let client_id = client_id.unwrap_or_default();
        let issued = st
            .registry
            .issue_token(client_id, issuer, scope, now, &mut rand::rng());
        st.stats.logins_ok += 1;
        debug!(?endpoint, client_id, "sim: login ok");
        Ok(issued)
    }
}

async fn mapsindoors_token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let form = parse_form(&body);
    let scope = field(&form, "scope")
        .unwrap_or(MAPSINDOORS_DEFAULT_SCOPE)
        .to_owned();
    match sh.login(
        Endpoint::MapsIndoorsToken,
        field(&form, "client_id"),
        field(&form, "client_secret"),
        field(&form, "grant_type"),
        Issuer::MapsIndoors,
        Some(scope.clone()),
    ) {
        Ok(t) => json_response(
            StatusCode::OK,
            sh.token_body(
                t,
                json!({
                    "token_type": "Bearer",
                    "scope": scope,
                }),
            ),
        ),
        // IdentityServer answers a bad secret with 400, not 401.
        Err(LoginError::InvalidClient) => oauth_error(StatusCode::BAD_REQUEST, "invalid_client"),
        Err(LoginError::UnsupportedGrantType) => {
            oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type")
        }
    }
}

async fn mappls_token(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_form(&headers) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let form = parse_form(&body);
    let client_id = field(&form, "client_id");
    match sh.login(
        Endpoint::MapplsToken,
        client_id,
        field(&form, "client_secret"),
        field(&form, "grant_type"),
        Issuer::Mappls,
        Some("READ".to_owned()),
    ) {
        Ok(t) => json_response(
            sh.mappls_success,
            sh.token_body(
                t,
                json!({
                    "token_type": "bearer",
                    "scope": "READ",
                    "project_code": "prj123",
                    "client_id": client_id,
                }),
            ),
        ),
        Err(LoginError::InvalidClient) => json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "Bad client credentials"}),
        ),
        Err(LoginError::UnsupportedGrantType) => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_description": "Unsupported grant type"}),
        ),
    }
}

pub(super) async fn oauth2_token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let form = parse_form(&body);
    let authorization = headers.get(AUTHORIZATION);
    let post_secret = field(&form, "client_secret");
    // RFC 6749 §2.3: a client must not use more than one authentication
    // method in a request.
    if authorization.is_some() && post_secret.is_some() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let via_basic = authorization.is_some() || post_secret.is_none();
    let (client_id, secret) = if via_basic {
        match authorization.and_then(parse_basic) {
            Some((id, secret)) => (Some(id), Some(secret)),
            None => (None, None),
        }
    } else {
        (
            field(&form, "client_id").map(str::to_owned),
            post_secret.map(str::to_owned),
        )
    };
    let scope = field(&form, "scope").map(str::to_owned);
    let result = sh.login(
        Endpoint::OAuth2Token,
        client_id.as_deref(),
        secret.as_deref(),
        field(&form, "grant_type"),
        Issuer::OAuth2,
        scope.clone(),
    );
    match result {
        Ok(t) => {
            {
                let mut st = sh.lock();
                if via_basic {
                    st.stats.oauth2_basic_logins += 1;
                } else {
                    st.stats.oauth2_post_logins += 1;
                }
            }
            let mut fields = json!({"token_type": "Bearer"});
            if let Some(scope) = scope {
                fields["scope"] = Value::String(scope);
            }
            json_response(StatusCode::OK, sh.token_body(t, fields))
        }
        // RFC 6749 §5.2: a client that tried the Authorization header gets
        // 401 with a challenge; one that authenticated in the body gets 400.
        Err(LoginError::InvalidClient) if via_basic => {
            let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sim\""),
            );
            response
        }
        Err(LoginError::InvalidClient) => oauth_error(StatusCode::BAD_REQUEST, "invalid_client"),
        Err(LoginError::UnsupportedGrantType) => {
            oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type")
        }
    }
}

/// RFC 7662 token introspection. The real thing requires the caller to
/// authenticate; the sim does not, since only tests call it.
async fn oauth2_introspect(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let form = parse_form(&body);
    let now = Instant::now();
    let st = sh.lock();
    let Some(token) = field(&form, "token").and_then(|t| st.registry.token(t, now)) else {
        return json_response(StatusCode::OK, json!({"active": false}));
    };
    // `exp` is wall-clock seconds; derive it from the monotonic remainder so
    // that it agrees with what the registry enforces.
    let exp = (SystemTime::now() + token.expires_at.saturating_duration_since(now))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut body = json!({
        "active": true,
        "client_id": token.client_id,
        "token_type": "Bearer",
        "exp": exp,
    });
    if let Some(scope) = &token.scope {
        body["scope"] = Value::String(scope.clone());
    }
    json_response(StatusCode::OK, body)
}

// ---------------------------------------------------------------------------
// MapsIndoors secret API
// ---------------------------------------------------------------------------

type Params = Query<HashMap<String, String>>;

/// Who is calling the secret API: the token's client and its customer.
struct Caller {
    client_id: String,
    customer_id: String,
}

/// Why the secret API refused a caller.
enum Denied {
    /// No, unknown, expired or foreign-issuer bearer token: 401, empty body.
    Unauthorized,
    MissingCustomer,
    /// The token's client belongs to another customer.
    Forbidden,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Unauthorized => {
                (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")]).into_response()
            }
            Denied::MissingCustomer => json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "customerId is required"}),
            ),
            Denied::Forbidden => StatusCode::FORBIDDEN.into_response(),
        }
    }
}

impl Shared {
    /// Checks the bearer token and that it belongs to the customer named in
    /// the query.
    fn authorize(
        &self,
        headers: &HeaderMap,
        params: &HashMap<String, String>,
    ) -> Result<Caller, Denied> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| strip_scheme(v, "Bearer"))
            .ok_or(Denied::Unauthorized)?;
        let st = self.lock();
        let token = st
            .registry
            .token(token, Instant::now())
            .filter(|t| t.issuer == Issuer::MapsIndoors)
            .ok_or(Denied::Unauthorized)?;
        let customer_id = params
            .get("customerId")
            .filter(|c| !c.is_empty())
            .ok_or(Denied::MissingCustomer)?;
        if st.registry.customer_of(&token.client_id) != Some(customer_id.as_str()) {
            debug!(client_id = %token.client_id, "sim: secret API call for another customer");
            return Err(Denied::Forbidden);
        }
        Ok(Caller {
            client_id: token.client_id.clone(),
            customer_id: customer_id.clone(),
        })
    }
}

/// Lists every secret of the customer, whichever client owns it: the
/// daemon must not assume that what it sees is its own.
async fn list_secrets(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let caller = match sh.authorize(&headers, &params) {
        Ok(c) => c,
        Err(denied) => return denied.into_response(),
    };
    let st = sh.lock();
    let list: Vec<Value> = st
        .registry
        .secrets_of_customer(&caller.customer_id)
        .map(|s| {
            json!({
                "id": s.id,
                "description": s.description,
                "client_id": s.client_id,
                "createdAt": rfc3339(s.created_at),
            })
        })
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

async fn create_secret(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let caller = match sh.authorize(&headers, &params) {
        Ok(c) => c,
        Err(denied) => return denied.into_response(),
    };
    let Some(description) = params.get("description").filter(|d| !d.is_empty()) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "description is required"}),
        );
    };
    let mut st = sh.lock();
    if st.faults.refuses_create() {
        st.stats.faults_injected += 1;
        let count = st.registry.secrets_of_client(&caller.client_id).count();
        debug!(client_id = %caller.client_id, "sim: too many secrets");
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({
                "error": "too_many_secrets",
                "error_description": format!(
                    "client {} already has the maximum number of secrets ({count}); delete one before creating another",
                    caller.client_id
                ),
            }),
        );
    }
    let Some(secret) = st.registry.create_secret(
        &caller.client_id,
        description,
        Instant::now(),
        true,
        &mut rand::rng(),
    ) else {
        // The client was removed between authorisation and now; cannot
        // happen with the current API, but answer like a vanished resource.
        return StatusCode::NOT_FOUND.into_response();
    };
    st.stats.secrets_created += 1;
    debug!(client_id = %caller.client_id, id = %secret.id, "sim: secret created");
    json_response(
        StatusCode::OK,
        json!({
            "id": secret.id,
            "description": secret.description,
            "createdAt": rfc3339(secret.created_at),
            "secret": secret.value,
        }),
    )
}

async fn delete_secret(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Params,
) -> Response {
    let caller = match sh.authorize(&headers, &params) {
        Ok(c) => c,
        Err(denied) => return denied.into_response(),
    };
    let Some(id) = params.get("id").filter(|i| !i.is_empty()) else {
        return json_response(StatusCode::BAD_REQUEST, json!({"error": "id is required"}));
    };
    let mut st = sh.lock();
    if st.registry.delete_secret(&caller.customer_id, id) {
        st.stats.secrets_deleted += 1;
        debug!(client_id = %caller.client_id, %id, "sim: secret deleted");
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

pub(super) fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn oauth_error(status: StatusCode, error: &'static str) -> Response {
    json_response(status, json!({ "error": error }))
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

pub(super) fn parse_form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// A form field; empty counts as absent, as it does for the real servers.
pub(super) fn field<'a>(form: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    form.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// `value` without its auth scheme prefix (scheme compared
/// case-insensitively), or `None` if it uses another scheme.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    (given.eq_ignore_ascii_case(scheme) && !rest.is_empty()).then_some(rest)
}

/// Parses `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
pub(super) fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = strip_scheme(value.to_str().ok()?, "Basic")?;
    let decoded = String::from_utf8(decode_base64(encoded)?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Standard base64 with or without padding.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(input.trim_end_matches('='))
        .ok()
}

/// Decodes one `application/x-www-form-urlencoded` component: `%XX`
/// escapes and `+` for space.
fn form_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(decode_base64("YWJj").unwrap(), b"abc");
        assert_eq!(decode_base64("YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64("YWI").unwrap(), b"ab");
        assert_eq!(decode_base64("YQ==").unwrap(), b"a");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("Y").is_none());
        assert!(decode_base64("Y!==").is_none());
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        // "my+client%3A1:s%25cret" = base64 below
        let header = HeaderValue::from_static("basic bXkrY2xpZW50JTNBMTpzJTI1Y3JldA==");
        assert_eq!(
            parse_basic(&header),
            Some(("my client:1".to_owned(), "s%cret".to_owned()))
        );
        assert_eq!(parse_basic(&HeaderValue::from_static("Bearer abc")), None);
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
    }

    #[test]
    fn form_content_type_is_recognised_with_parameters() {
        let mut h = HeaderMap::new();
        assert!(!is_form(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
        );
        assert!(is_form(&h));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_form(&h));
    }
}
