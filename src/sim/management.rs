//! The Okta and Auth0 profiles: their token endpoints and the management
//! APIs that change a client's secrets, written from their public
//! documentation (Okta Management API "Application Client Auth
//! Credentials"; Auth0 Management API v2 "Update a client").
//!
//! - **Okta**: `POST /oauth2/v1/token` (RFC 6749); secrets under
//!   `/api/v1/apps/{app}/credentials/secrets`, at most two per app, with a
//!   caller-chosen value when the create body carries `client_secret`;
//!   deactivate with `POST …/{id}/lifecycle/deactivate`; only an inactive
//!   secret may be deleted. The sim takes the app id to be the client id.
//! - **Auth0**: `POST /oauth/token` answers a wrong secret with
//!   `401 {"error":"access_denied"}`; `PATCH /api/v2/clients/{client_id}`
//!   with `client_secret` replaces the client's secret atomically (the old
//!   one stops at once, the new one works after the propagation delay).
//!
//! - **Keycloak**: the realm's token endpoint
//!   `/realms/{realm}/protocol/openid-connect/token` (RFC 6749, `401
//!   invalid_client`); `PUT /admin/realms/{realm}/clients/{id}` with
//!   `secret` replaces the client's secret (`204`). The sim takes the
//!   client's internal id to be its client id.
//!
//! - **Entra**: `POST /{tenant}/oauth2/v2.0/token` answers a wrong secret
//!   with `401 invalid_client` and `AADSTS7000215` in `error_description`;
//!   Microsoft Graph lists an application's `passwordCredentials`
//!   (`GET /v1.0/applications/{id}`), `addPassword` makes a secret whose
//!   `secretText` only that reply shows, `removePassword` deletes one by
//!   `keyId` (`204`). The sim takes the application's object id to be its
//!   client id. Every password credential has an `endDateTime` (Graph's
//!   default two years after creation, or the sim's secret lifetime when a
//!   test sets one); a login with a secret past it is `401 invalid_client`
//!   with `AADSTS7000222`.
//!
//! The management APIs take a bearer token of any client of their issuer
//! (an administrative client in real deployments).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::debug;

use super::Shared;
use super::faults::Endpoint;
use super::routes::{LoginError, field, is_form, json_response, parse_basic, parse_form, rfc3339};
use super::state::{AuthError, Issuer, Secret};

/// Okta's documented limit of client secrets per app.
pub const OKTA_MAX_SECRETS: usize = 2;

/// The client of a valid bearer token from `issuer`, recorded as a
/// caller; `None`: answer [`unauthorized`].
pub(super) fn bearer_client(sh: &Shared, headers: &HeaderMap, issuer: Issuer) -> Option<String> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    let mut st = sh.lock();
    let client = st
        .registry
        .token(token.trim(), Instant::now())
        .filter(|t| t.issuer == issuer)
        .map(|t| t.client_id.clone())?;
    *st.stats
        .management_callers
        .entry(client.clone())
        .or_default() += 1;
    Some(client)
}

pub(super) fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(WWW_AUTHENTICATE, "Bearer")]).into_response()
}

pub(super) fn okta_error(
    status: StatusCode,
    code: &str,
    summary: &str,
    cause: Option<&str>,
) -> Response {
    let causes: Vec<Value> = cause
        .map(|c| json!({"errorSummary": c}))
        .into_iter()
        .collect();
    json_response(
        status,
        json!({
            "errorCode": code,
            "errorSummary": summary,
            "errorLink": code,
            "errorId": "sim",
            "errorCauses": causes,
        }),
    )
}

fn okta_not_found(id: &str) -> Response {
    okta_error(
        StatusCode::NOT_FOUND,
        "E0000007",
        &format!("Not found: Resource not found: {id} (OAuth2ClientSecret)"),
        None,
    )
}

/// A secret as Okta shows it: the value only as a hash, except in the
/// create reply.
fn okta_secret(s: &Secret, with_value: bool) -> Value {
    use sha2::Digest;
    let hash = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        sha2::Sha256::digest(s.value.as_bytes()),
    );
    json!({
        "id": s.id,
        "status": if s.active { "ACTIVE" } else { "INACTIVE" },
        "client_secret": if with_value { s.value.clone() } else { format!("{}****", &hash[..4]) },
        "secret_hash": hash,
        "created": rfc3339(s.created_at),
        "lastUpdated": rfc3339(s.created_at),
    })
}

pub(super) async fn okta_list(
    State(sh): State<Arc<Shared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let st = sh.lock();
    let list: Vec<Value> = st
        .registry
        .secrets_of_client(&app)
        .map(|s| okta_secret(s, false))
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn okta_create(
    State(sh): State<Arc<Shared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let chosen = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => v
                .get("client_secret")
                .and_then(Value::as_str)
                .map(str::to_owned),
            Err(_) => {
                return okta_error(
                    StatusCode::BAD_REQUEST,
                    "E0000003",
                    "The request body was not well-formed.",
                    None,
                );
            }
        }
    };
    let mut st = sh.lock();
    if st.registry.customer_of(&app).is_none() {
        return okta_error(
            StatusCode::NOT_FOUND,
            "E0000007",
            &format!("Not found: Resource not found: {app} (App)"),
            None,
        );
    }
    let count = st.registry.secrets_of_client(&app).count();
    if count >= OKTA_MAX_SECRETS || st.faults.refuses_create() {
        st.stats.faults_injected += u64::from(count < OKTA_MAX_SECRETS);
        return okta_error(
            StatusCode::BAD_REQUEST,
            "E0000001",
            "Api validation failed: client_secret",
            Some("You can't create more than two client secrets for an app."),
        );
    }
    let now = Instant::now();
    let created = match chosen {
        Some(value) if value.len() < 14 => {
            return okta_error(
                StatusCode::BAD_REQUEST,
                "E0000001",
                "Api validation failed: client_secret",
                Some("client_secret: must be at least 14 characters"),
            );
        }
        Some(value) => st
            .registry
            .create_secret_with_value(&app, &value, now, &mut rand::rng()),
        None => st
            .registry
            .create_secret(&app, "", now, true, &mut rand::rng()),
    };
    let Some(secret) = created else {
        return okta_not_found(&app);
    };
    st.stats.secrets_created += 1;
    debug!(client_id = %app, id = %secret.id, "sim: okta secret created");
    json_response(StatusCode::OK, okta_secret(&secret, true))
}

pub(super) async fn okta_deactivate(
    State(sh): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let mut st = sh.lock();
    match st.registry.deactivate_secret(&app, &id) {
        Some(secret) => json_response(StatusCode::OK, okta_secret(&secret, false)),
        None => okta_not_found(&id),
    }
}

pub(super) async fn okta_delete(
    State(sh): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let mut st = sh.lock();
    let Some(secret) = st.registry.secret_of_client(&app, &id) else {
        return okta_not_found(&id);
    };
    if secret.active {
        return okta_error(
            StatusCode::BAD_REQUEST,
            "E0000001",
            "Api validation failed: Cannot delete an active client secret",
            Some("Deactivate the client secret before deleting it."),
        );
    }
    st.registry.remove_secret(&id);
    st.stats.secrets_deleted += 1;
    debug!(client_id = %app, %id, "sim: okta secret deleted");
    StatusCode::NO_CONTENT.into_response()
}

/// The client's id and secret from HTTP Basic, else from the form body
/// (RFC 6749 §2.3.1: either, as Auth0 and Entra take them).
fn client_credentials(
    headers: &HeaderMap,
    form: &std::collections::HashMap<String, String>,
) -> (Option<String>, Option<String>) {
    match headers.get(AUTHORIZATION).and_then(parse_basic) {
        Some((id, secret)) => (Some(id), Some(secret)),
        None => (
            field(form, "client_id").map(str::to_owned),
            field(form, "client_secret").map(str::to_owned),
        ),
    }
}

/// Auth0's token endpoint: the client authenticates in the body or with
/// Basic; a wrong secret is `401 access_denied`.
pub(super) async fn auth0_token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "unsupported content type"}),
        );
    }
    let form = parse_form(&body);
    let (client_id, secret) = client_credentials(&headers, &form);
    let audience = field(&form, "audience").map(str::to_owned);
    match sh.login(
        Endpoint::Auth0Token,
        client_id.as_deref(),
        secret.as_deref(),
        field(&form, "grant_type"),
        Issuer::Auth0,
        audience,
    ) {
        Ok(t) => json_response(
            StatusCode::OK,
            sh.token_body(t, json!({"token_type": "Bearer"})),
        ),
        Err(LoginError::InvalidClient) => json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "access_denied", "error_description": "Unauthorized"}),
        ),
        Err(LoginError::UnsupportedGrantType) => json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "unauthorized_client", "error_description": "Grant type not allowed"}),
        ),
    }
}

fn auth0_error(status: StatusCode, error: &str, message: &str, code: &str) -> Response {
    json_response(
        status,
        json!({
            "statusCode": status.as_u16(),
            "error": error,
            "message": message,
            "errorCode": code,
        }),
    )
}

/// `PATCH /api/v2/clients/{client_id}`: only `client_secret` is honoured;
/// setting it replaces the client's secret atomically.
pub(super) async fn auth0_update_client(
    State(sh): State<Arc<Shared>>,
    Path(client_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::Auth0).is_none() {
        return unauthorized();
    }
    let value = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("client_secret")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return auth0_error(
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "Payload validation error: 'Expected type string' on property client_secret",
            "invalid_body",
        );
    };
    let mut st = sh.lock();
    if st.faults.refuses_create() {
        st.stats.faults_injected += 1;
        return auth0_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Insufficient scope, expected any of: update:client_keys",
            "insufficient_scope",
        );
    }
    // Setting the value the client already has changes nothing.
    let same = st
        .registry
        .secrets_of_client(&client_id)
        .any(|s| s.value == value);
    if !same
        && st
            .registry
            .replace_secrets(&client_id, &value, Instant::now(), &mut rand::rng())
            .is_none()
    {
        return auth0_error(
            StatusCode::NOT_FOUND,
            "Not Found",
            "The client does not exist",
            "inexistent_client",
        );
    }
    if !same {
        st.stats.secrets_created += 1;
    }
    debug!(%client_id, "sim: auth0 client secret replaced");
    json_response(
        StatusCode::OK,
        json!({
            "client_id": client_id,
            "client_secret": value,
            "name": "sim client",
            "app_type": "non_interactive",
        }),
    )
}

/// Keycloak's client update: only `secret` is honoured; it replaces the
/// client's secret atomically. `204` on success, `404 {"error": "Could
/// not find client"}` for an unknown client.
pub(super) async fn keycloak_update_client(
    State(sh): State<Arc<Shared>>,
    Path((_realm, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let Ok(Value::Object(rep)) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unknown_error", "errorMessage": "Cannot parse the JSON"}),
        );
    };
    let mut st = sh.lock();
    if st.faults.refuses_create() {
        st.stats.faults_injected += 1;
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "HTTP 403 Forbidden"}),
        );
    }
    let Some(value) = rep
        .get("secret")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    else {
        // A client update without a secret changes nothing here.
        return StatusCode::NO_CONTENT.into_response();
    };
    let same = st.registry.secrets_of_client(&id).any(|s| s.value == value);
    if !same
        && st
            .registry
            .replace_secrets(&id, value, Instant::now(), &mut rand::rng())
            .is_none()
    {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "Could not find client"}),
        );
    }
    if !same {
        st.stats.secrets_created += 1;
    }
    debug!(client_id = %id, "sim: keycloak client secret set");
    StatusCode::NO_CONTENT.into_response()
}

/// Entra's token endpoint: RFC 6749, with Entra's refusal body.
pub(super) async fn entra_token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "AADSTS900144: The request body must contain the following parameter: 'grant_type'.", "error_codes": [900144]}),
        );
    }
    let form = parse_form(&body);
    let (client_id, secret) = client_credentials(&headers, &form);
    let scope = field(&form, "scope").map(str::to_owned);
    match sh.login(
        Endpoint::EntraToken,
        client_id.as_deref(),
        secret.as_deref(),
        field(&form, "grant_type"),
        Issuer::OAuth2,
        scope,
    ) {
        Ok(t) => json_response(
            StatusCode::OK,
            sh.token_body(t, json!({"token_type": "Bearer", "ext_expires_in": 3599})),
        ),
        // An expired secret has its own code (AADSTS7000222), also a 401
        // `invalid_client`: the value is right but past its endDateTime.
        Err(LoginError::InvalidClient) if expired(&sh, client_id.as_deref(), secret.as_deref()) => {
            json_response(
                StatusCode::UNAUTHORIZED,
                json!({
                    "error": "invalid_client",
                    "error_description": format!(
                        "AADSTS7000222: The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
                        client_id.as_deref().unwrap_or_default()
                    ),
                    "error_codes": [7000222],
                }),
            )
        }
        Err(LoginError::InvalidClient) => json_response(
            StatusCode::UNAUTHORIZED,
            json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "error_codes": [7000215],
            }),
        ),
        Err(LoginError::UnsupportedGrantType) => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_codes": [70003]}),
        ),
    }
}

/// Whether `secret` is a secret of `client_id` that is refused only
/// because it expired.
fn expired(sh: &Shared, client_id: Option<&str>, secret: Option<&str>) -> bool {
    let (Some(client_id), Some(secret)) = (client_id, secret) else {
        return false;
    };
    sh.lock()
        .registry
        .authenticate(client_id, secret, Instant::now())
        == Err(AuthError::Expired)
}

/// Graph's default lifetime of a password credential whose `addPassword`
/// request sets no `endDateTime` ("application: addPassword": the default
/// is `startDateTime` + 2 years).
const GRAPH_DEFAULT_SECRET_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(2 * 365 * 86400);

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

fn password_credential(s: &Secret) -> Value {
    json!({
        "keyId": s.id,
        "displayName": s.description,
        "hint": s.value.chars().take(3).collect::<String>(),
        "startDateTime": rfc3339(s.created_at),
        "endDateTime": rfc3339(s.expires_at.unwrap_or(s.created_at + GRAPH_DEFAULT_SECRET_LIFETIME)),
    })
}

pub(super) async fn entra_application(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let st = sh.lock();
    if st.registry.customer_of(&id).is_none() {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!(
                "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
            ),
        );
    }
    let creds: Vec<Value> = st
        .registry
        .secrets_of_client(&id)
        .map(password_credential)
        .collect();
    json_response(
        StatusCode::OK,
        json!({"id": id, "passwordCredentials": creds}),
    )
}

pub(super) async fn entra_add_password(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let display_name = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("passwordCredential")?
                .get("displayName")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let mut st = sh.lock();
    if st.faults.refuses_create() {
        st.stats.faults_injected += 1;
        return graph_error(
            StatusCode::BAD_REQUEST,
            "TooManyPasswords",
            "The application has reached its maximum number of password credentials.",
        );
    }
    let Some(secret) =
        st.registry
            .create_secret(&id, &display_name, Instant::now(), true, &mut rand::rng())
    else {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!("Resource '{id}' does not exist."),
        );
    };
    st.stats.secrets_created += 1;
    let mut reply = password_credential(&secret);
    reply["secretText"] = Value::String(secret.value.clone());
    json_response(StatusCode::OK, reply)
}

pub(super) async fn entra_remove_password(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let Some(key_id) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("keyId")?.as_str().map(str::to_owned))
    else {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "Request_BadRequest",
            "keyId is required",
        );
    };
    let mut st = sh.lock();
    if st.registry.secret_of_client(&id, &key_id).is_none() {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!("No password credential found with keyId {key_id}."),
        );
    }
    st.registry.remove_secret(&key_id);
    st.stats.secrets_deleted += 1;
    StatusCode::NO_CONTENT.into_response()
}
