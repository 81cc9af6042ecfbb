//! Okta's `private_key_jwt` profile: an app's public keys under
//! `/api/v1/apps/{app}/credentials/jwks` (Management API, OAuth 2.0 client
//! JSON Web Keys) and client assertions (RFC 7523 §2.2, §3) at Okta's
//! token endpoint `/oauth2/v1/token`.
//!
//! - list answers the documented `{"jwks": {"keys": [...]}}`, each key
//!   with Okta's `id` (`pks…`), its `kid` and `status`;
//! - add (`POST`) takes a public JWK with a `kid` (Okta refuses a key
//!   without one, and a second key with a `kid` already listed), answers
//!   `201` with the key;
//! - `POST …/{id}/lifecycle/deactivate` makes a key `INACTIVE`; only an
//!   inactive key may be deleted (`DELETE …/{id}`, `204`);
//! - a login with `client_assertion` is accepted when the JWS verifies
//!   with an ACTIVE key of the client whose `kid` its header names, `iss`
//!   = `sub` = the client id, `aud` the token endpoint's URL, `exp` is
//!   ahead and its `jti` was not seen before; anything else is `401
//!   invalid_client`.
//!
//! The key registry and the assertion check are plain data and functions
//! with the time passed in, unit-tested below; the handlers translate.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    UnparsedPublicKey,
};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::debug;

use super::Shared;
use super::management::{bearer_client, okta_error, unauthorized};
use super::routes::{field, is_form, json_response, parse_form};
use super::state::Issuer;

/// `client_assertion_type` of a JWT assertion (RFC 7523 §2.2).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Okta's token endpoint, the audience its assertions must name.
const TOKEN_PATH: &str = "/oauth2/v1/token";

/// One published key: its public JWK as added, Okta's id and status.
#[derive(Clone, Debug, PartialEq)]
pub struct SimKey {
    /// Okta's id (`pks…`).
    pub id: String,
    pub kid: String,
    pub active: bool,
    /// The public JWK as added (without `status`).
    pub jwk: Value,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// Why an add was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddError {
    NoKid,
    DuplicateKid,
    NotAKey,
}

/// The apps' keys, in the order they were added.
#[derive(Default)]
pub(crate) struct KeyRegistry {
    keys: BTreeMap<String, Vec<SimKey>>,
    /// `jti` of accepted assertions with their `exp`, for replay refusal;
    /// expired ones are forgotten (an expired assertion is refused anyway).
    seen: HashMap<String, u64>,
}

impl KeyRegistry {
    pub fn keys(&self, app: &str) -> &[SimKey] {
        self.keys.get(app).map(Vec::as_slice).unwrap_or_default()
    }

    /// Adds a public JWK (any `status` member other than `INACTIVE` makes
    /// it active, as Okta's default is).
    pub fn add(
        &mut self,
        app: &str,
        jwk: &Value,
        now: u64,
        rng: &mut impl Rng,
    ) -> Result<SimKey, AddError> {
        let Some(object) = jwk.as_object() else {
            return Err(AddError::NotAKey);
        };
        if !matches!(
            object.get("kty").and_then(Value::as_str),
            Some("RSA" | "EC" | "OKP")
        ) {
            return Err(AddError::NotAKey);
        }
        let kid = match object.get("kid").and_then(Value::as_str) {
            Some(kid) if !kid.is_empty() => kid.to_string(),
            _ => return Err(AddError::NoKid),
        };
        if self.keys(app).iter().any(|k| k.kid == kid) {
            return Err(AddError::DuplicateKid);
        }
        let mut public = object.clone();
        let active = public
            .remove("status")
            .and_then(|s| s.as_str().map(str::to_owned))
            != Some("INACTIVE".into());
        let id: String = (0..17)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
            .collect();
        let key = SimKey {
            id: format!("pks{id}"),
            kid,
            active,
            jwk: Value::Object(public),
            created: now,
        };
        self.keys
            .entry(app.to_string())
            .or_default()
            .push(key.clone());
        Ok(key)
    }

    fn find_mut(&mut self, app: &str, id: &str) -> Option<&mut SimKey> {
        self.keys.get_mut(app)?.iter_mut().find(|k| k.id == id)
    }

    pub fn deactivate(&mut self, app: &str, id: &str) -> Option<SimKey> {
        let key = self.find_mut(app, id)?;
        key.active = false;
        Some(key.clone())
    }

    /// `Err(true)`: the key is active and stays; `Err(false)`: no such key.
    pub fn delete(&mut self, app: &str, id: &str) -> Result<(), bool> {
        let keys = self.keys.get_mut(app).ok_or(false)?;
        let at = keys.iter().position(|k| k.id == id).ok_or(false)?;
        if keys[at].active {
            return Err(true);
        }
        keys.remove(at);
        Ok(())
    }

    /// Checks a client assertion (RFC 7523 §3) at `now` (seconds since
    /// the epoch) and records its `jti`: the client it authenticates, or
    /// why not. `client_id` is the form's, when it carries one.
    pub fn authenticate(
        &mut self,
        client_id: Option<&str>,
        assertion: &str,
        now: u64,
    ) -> Result<String, &'static str> {
        let mut parts = assertion.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWS compact serialization");
        };
        let json = |part: &str| {
            B64.decode(part)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        };
        let (Some(head), Some(body), Ok(signature)) =
            (json(header), json(claims), B64.decode(signature))
        else {
            return Err("malformed JWS");
        };
        let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
        let (Some(iss), Some(sub)) = (text(&body, "iss"), text(&body, "sub")) else {
            return Err("no iss or sub");
        };
        if iss != sub || client_id.is_some_and(|c| c != iss) {
            return Err("iss, sub and client_id differ");
        }
        // Okta wants its token endpoint's URL as the audience.
        if !text(&body, "aud").is_some_and(|aud| aud.ends_with(TOKEN_PATH)) {
            return Err("aud is not the token endpoint");
        }
        let kid = text(&head, "kid").ok_or("no kid in the header")?;
        let key = self
            .keys(&iss)
            .iter()
            .find(|k| k.kid == kid && k.active)
            .ok_or("no active key with that kid")?;
        let alg = text(&head, "alg").unwrap_or_default();
        let input = &assertion[..header.len() + 1 + claims.len()];
        verify(&key.jwk, &alg, input.as_bytes(), &signature)?;
        let exp = body.get("exp").and_then(Value::as_u64).ok_or("no exp")?;
        if exp <= now {
            return Err("expired");
        }
        let jti = text(&body, "jti").ok_or("no jti")?;
        self.seen.retain(|_, until| *until > now);
        if self.seen.insert(jti, exp).is_some() {
            return Err("replayed jti");
        }
        Ok(iss)
    }
}

/// Verifies a JWS signature over `input` with the public `jwk`, for the
/// algorithm its key type signs with (RFC 7518 §3.3, §3.4; RFC 8037 §3.1).
fn verify(jwk: &Value, alg: &str, input: &[u8], signature: &[u8]) -> Result<(), &'static str> {
    let member = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|v| B64.decode(v).ok())
            .ok_or("incomplete public key")
    };
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
    let checked = match (kty, alg) {
        ("EC", "ES256") => {
            let mut point = vec![4u8];
            point.extend(member("x")?);
            point.extend(member("y")?);
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(input, signature)
        }
        ("RSA", "RS256") => RsaPublicKeyComponents {
            n: member("n")?,
            e: member("e")?,
        }
        .verify(&RSA_PKCS1_2048_8192_SHA256, input, signature),
        ("OKP", "EdDSA") => UnparsedPublicKey::new(&ED25519, member("x")?).verify(input, signature),
        _ => return Err("the alg does not fit the key"),
    };
    checked.map_err(|_| "bad signature")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A key as Okta shows it: the public JWK with `id`, `status` and times.
fn shown(k: &SimKey) -> Value {
    let mut v = k.jwk.clone();
    let at =
        super::routes::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(k.created));
    v["id"] = k.id.clone().into();
    v["status"] = if k.active { "ACTIVE" } else { "INACTIVE" }.into();
    v["created"] = at.clone().into();
    v["lastUpdated"] = at.into();
    v
}

fn not_found(id: &str) -> Response {
    okta_error(
        StatusCode::NOT_FOUND,
        "E0000007",
        &format!("Not found: Resource not found: {id} (OAuth2ClientJsonWebKey)"),
        None,
    )
}

pub(super) async fn list(
    State(sh): State<Arc<Shared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let st = sh.lock();
    let keys: Vec<Value> = st.okta_keys.keys(&app).iter().map(shown).collect();
    json_response(StatusCode::OK, json!({"jwks": {"keys": keys}}))
}

pub(super) async fn add(
    State(sh): State<Arc<Shared>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let Ok(jwk) = serde_json::from_slice::<Value>(&body) else {
        return okta_error(
            StatusCode::BAD_REQUEST,
            "E0000003",
            "The request body was not well-formed.",
            None,
        );
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
    let added = st.okta_keys.add(&app, &jwk, now_secs(), &mut rand::rng());
    match added {
        Ok(key) => {
            st.stats.secrets_created += 1;
            debug!(client_id = %app, id = %key.id, kid = %key.kid, "sim: okta key added");
            json_response(StatusCode::CREATED, shown(&key))
        }
        Err(why) => okta_error(
            StatusCode::BAD_REQUEST,
            "E0000001",
            "Api validation failed: jwks",
            Some(match why {
                AddError::NoKid => "kid: The key must have a kid.",
                AddError::DuplicateKid => "kid: A key with this kid already exists.",
                AddError::NotAKey => "kty: Unsupported key type.",
            }),
        ),
    }
}

pub(super) async fn deactivate(
    State(sh): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let mut st = sh.lock();
    match st.okta_keys.deactivate(&app, &id) {
        Some(key) => json_response(StatusCode::OK, shown(&key)),
        None => not_found(&id),
    }
}

pub(super) async fn delete(
    State(sh): State<Arc<Shared>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if bearer_client(&sh, &headers, Issuer::OAuth2).is_none() {
        return unauthorized();
    }
    let mut st = sh.lock();
    match st.okta_keys.delete(&app, &id) {
        Ok(()) => {
            st.stats.secrets_deleted += 1;
            debug!(client_id = %app, %id, "sim: okta key deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(true) => okta_error(
            StatusCode::BAD_REQUEST,
            "E0000001",
            "Api validation failed: Cannot delete an active JSON Web Key",
            Some("Deactivate the key before deleting it."),
        ),
        Err(false) => not_found(&id),
    }
}

/// Okta's token endpoint: a client assertion is checked here; any other
/// client authentication goes to the RFC 6749 handler.
pub(super) async fn token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = is_form(&headers).then(|| parse_form(&body));
    let Some(assertion) = form
        .as_ref()
        .filter(|f| field(f, "client_assertion_type") == Some(JWT_BEARER))
        .and_then(|f| field(f, "client_assertion"))
    else {
        return super::routes::oauth2_token(State(sh), headers, body).await;
    };
    let form = form.as_ref().expect("checked above");
    let mut st = sh.lock();
    let checked = st
        .okta_keys
        .authenticate(field(form, "client_id"), assertion, now_secs())
        .and_then(|client| {
            st.registry
                .customer_of(&client)
                .map(|_| client)
                .ok_or("unknown client")
        });
    let client = match checked {
        Ok(client) => client,
        Err(reason) => {
            st.stats.logins_rejected += 1;
            debug!(reason, "sim: okta assertion rejected");
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_client", "error_description": "The client_assertion is invalid."}),
            );
        }
    };
    if field(form, "grant_type") != Some("client_credentials") {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        );
    }
    let scope = field(form, "scope").map(str::to_owned);
    let issued = st.registry.issue_token(
        &client,
        Issuer::OAuth2,
        scope.clone(),
        Instant::now(),
        &mut rand::rng(),
    );
    st.stats.logins_ok += 1;
    debug!(client_id = %client, "sim: okta assertion login ok");
    drop(st);
    let mut fields = json!({"token_type": "Bearer"});
    if let Some(scope) = scope {
        fields["scope"] = Value::String(scope);
    }
    json_response(StatusCode::OK, sh.token_body(issued, fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::assertion;
    use crate::provider::key::{Alg, generate};
    use secrecy::ExposeSecret;

    const NOW: u64 = 1_800_000_000;

    fn minted(key: &crate::provider::key::ClientKey, client: &str, jti: &str, now: u64) -> String {
        minted_for(key, client, jti, now, "http://sim/oauth2/v1/token")
    }

    fn minted_for(
        key: &crate::provider::key::ClientKey,
        client: &str,
        jti: &str,
        now: u64,
        aud: &str,
    ) -> String {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now);
        let claims = assertion::claims(client, aud, at, jti.into());
        assertion::sign(key, &claims)
            .unwrap()
            .expose_secret()
            .to_string()
    }

    #[test]
    fn every_key_type_logs_in_once_per_jti() {
        for alg in [Alg::Es256, Alg::Rs256, Alg::EdDsa] {
            let key = generate(alg).unwrap();
            let mut r = KeyRegistry::default();
            r.add("app", &key.public_jwk(), NOW, &mut rand::rng())
                .unwrap();
            let jwt = minted(&key, "app", "j1", NOW);
            assert_eq!(r.authenticate(Some("app"), &jwt, NOW), Ok("app".into()));
            assert_eq!(
                r.authenticate(Some("app"), &jwt, NOW),
                Err("replayed jti"),
                "{alg:?}"
            );
            let next = minted(&key, "app", "j2", NOW);
            assert_eq!(r.authenticate(None, &next, NOW), Ok("app".into()));
        }
    }

    #[test]
    fn a_wrong_key_an_inactive_key_or_old_claims_are_refused() {
        let key = generate(Alg::Es256).unwrap();
        let other = generate(Alg::Es256).unwrap();
        let mut r = KeyRegistry::default();
        let published = r
            .add("app", &key.public_jwk(), NOW, &mut rand::rng())
            .unwrap();
        // Same kid, other key: the signature does not verify.
        let forged_key = crate::provider::key::ClientKey::from_jwk_json(
            &serde_json::to_string(&{
                let mut private: Value =
                    serde_json::from_str(other.to_secret().expose_secret()).unwrap();
                private["kid"] = key.kid().into();
                private
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.authenticate(None, &minted(&forged_key, "app", "a", NOW), NOW),
            Err("bad signature")
        );
        assert_eq!(
            r.authenticate(None, &minted(&other, "app", "b", NOW), NOW),
            Err("no active key with that kid")
        );
        assert_eq!(
            r.authenticate(Some("intruder"), &minted(&key, "app", "c", NOW), NOW),
            Err("iss, sub and client_id differ")
        );
        assert_eq!(
            r.authenticate(
                None,
                &minted_for(&key, "app", "f", NOW, "http://sim/other"),
                NOW
            ),
            Err("aud is not the token endpoint")
        );
        let stale = minted(&key, "app", "d", NOW - 3600);
        assert_eq!(r.authenticate(None, &stale, NOW), Err("expired"));
        assert_eq!(r.delete("app", &published.id), Err(true), "active");
        r.deactivate("app", &published.id).unwrap();
        assert_eq!(
            r.authenticate(None, &minted(&key, "app", "e", NOW), NOW),
            Err("no active key with that kid")
        );
        assert_eq!(r.delete("app", &published.id), Ok(()));
        assert_eq!(r.delete("app", &published.id), Err(false));
    }

    #[test]
    fn keys_need_a_kid_of_their_own() {
        let key = generate(Alg::Rs256).unwrap();
        let mut r = KeyRegistry::default();
        let mut rng = rand::rng();
        let mut nameless = key.public_jwk();
        nameless.as_object_mut().unwrap().remove("kid");
        assert_eq!(r.add("app", &nameless, NOW, &mut rng), Err(AddError::NoKid));
        let added = r.add("app", &key.public_jwk(), NOW, &mut rng).unwrap();
        assert!(added.id.starts_with("pks") && added.active);
        assert!(added.jwk.get("d").is_none());
        assert_eq!(
            r.add("app", &key.public_jwk(), NOW, &mut rng),
            Err(AddError::DuplicateKid)
        );
        assert_eq!(
            r.add("app", &json!({"kty": "oct", "kid": "x"}), NOW, &mut rng),
            Err(AddError::NotAKey)
        );
    }
}
