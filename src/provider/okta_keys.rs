//! Okta: a `private_key_jwt` app's public keys through the Management API
//! ("Application Client Auth Credentials", OAuth 2.0 client JSON Web Keys,
//! <https://developer.okta.com/docs/api/openapi/okta-management/management/tag/ApplicationSSOCredentialOAuth2ClientAuth>):
//!
//! - `GET    {org}/api/v1/apps/{appId}/credentials/jwks` lists the keys;
//!   the documented example reply is `{"jwks": {"keys": [{id, kid, kty,
//!   alg, use, e, n, status, created, lastUpdated, _links}]}}` (`status`
//!   `ACTIVE` or `INACTIVE`). A bare JSON array or a `{"keys": […]}` set
//!   is read too (assumed: Okta's other key listings answer arrays);
//! - `POST   …/jwks` adds one: documented body the public JWK (`kid`,
//!   `kty`, `alg`, `use`, `e`, `n`) with `status`, reply `201` with the
//!   key and Okta's own `id`. Okta "supports both RSA and Elliptic Curve
//!   (EC) keys"; EC members (`crv`, `x`, `y`) are sent as RFC 7518 §6.2
//!   names them (assumed: the page shows only an RSA example). Ed25519
//!   (`OKP`) keys are not documented: Okta refuses them, and the refusal
//!   reaches the operator;
//! - `POST   …/jwks/{keyId}/lifecycle/deactivate` deactivates one;
//! - `DELETE …/jwks/{keyId}` deletes one (only an inactive one, as with
//!   secrets: assumed from the `_links` the listing shows, `delete` only on
//!   `INACTIVE` keys).
//!
//! `{keyId}` is Okta's `id` (`pks…`), not the JWK's `kid`. rekeyd names
//! keys by their RFC 7638 thumbprint everywhere (the journal, the listing
//! it gives the rotation; [`super::jwks`]), so every call by key lists
//! first and maps the thumbprint of the listed members to Okta's `id`. The page documents no limit on the number of keys.
//! Errors are `{"errorCode", "errorSummary", "errorCauses"}` as for
//! secrets; the API is called with an administrative client's token
//! (`secret_api_credential`, scope `okta.apps.manage`).

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::Value;
use url::Url;

use super::http::{Reply, Transport};
use super::jwks;
use super::okta_api::{ClientAuthCredentials, accepted, created_at};
use super::{
    Capabilities, CreateRequest, Deleted, ErrorKind, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, ValueOrigin,
};
use crate::token::Token;

/// Keys rekeyd generates, published next to the current one (the page
/// documents no maximum), deactivated before they are deleted, listed by
/// RFC 7638 thumbprint without tags.
pub const CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Key,
    overlap: Overlap::Many { max: None },
    retire: Retire::DeactivateThenDelete,
    tags: false,
    lists: true,
};

/// One key as Okta lists it (public members only; the rest is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OktaKey {
    /// Okta's id (`pks…`), the one its calls by key take.
    pub id: String,
    /// The JWK's `kid`.
    #[serde(default)]
    pub kid: Option<String>,
    /// The RFC 7638 thumbprint of the listed public members, the name
    /// rekeyd uses ([`super::jwks`]); `None` when they are incomplete.
    #[serde(skip)]
    pub thumbprint: Option<String>,
    /// `ACTIVE` or `INACTIVE`.
    #[serde(default)]
    pub status: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub created: Option<String>,
}

impl OktaKey {
    fn active(&self) -> bool {
        self.status.as_deref() == Some("ACTIVE")
    }
}

/// An app's keys at `…/api/v1/apps/{appId}/credentials/jwks`.
pub struct OktaKeys {
    /// `…/api/v1/apps/{appId}/credentials/jwks`.
    api: ClientAuthCredentials,
    /// The app's OAuth client id: every listed key is this client's.
    client_id: String,
}

impl OktaKeys {
    pub fn new(transport: Transport, url: Url, client_id: String) -> Self {
        OktaKeys {
            api: ClientAuthCredentials::new(transport, url),
            client_id,
        }
    }

    async fn keys(&self, bearer: &Token) -> Result<Vec<OktaKey>, ProviderError> {
        const OP: &str = "okta list keys";
        let reply = self.api.list(OP, bearer).await?;
        parse_list_reply(OP, &reply)
    }
}

/// Reads a list reply: the documented `{"jwks": {"keys": […]}}`, a
/// `{"keys": […]}` set or a bare array of keys. Keys without an `id` are
/// skipped (nothing could be called on them).
pub fn parse_list_reply(
    operation: &'static str,
    reply: &Reply,
) -> Result<Vec<OktaKey>, ProviderError> {
    accepted(operation, reply)?;
    let body: Value = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected JSON"))?;
    let items = match &body {
        Value::Array(items) => Some(items),
        Value::Object(o) => o
            .get("jwks")
            .and_then(|j| j.get("keys"))
            .or_else(|| o.get("keys"))
            .and_then(Value::as_array),
        _ => None,
    }
    .ok_or_else(|| reply.unexpected(operation, "expected the app's JSON Web Keys"))?;
    Ok(items
        .iter()
        .filter_map(read_key)
        .filter(|k| !k.id.is_empty())
        .collect())
}

/// One key of a reply, named by its thumbprint.
fn read_key(jwk: &Value) -> Option<OktaKey> {
    let mut key: OktaKey = serde_json::from_value(jwk.clone()).ok()?;
    key.thumbprint = super::key::public_thumbprint(jwk);
    Some(key)
}

/// The keys as a listing of `client_id`'s secrets, named by thumbprint
/// (a key whose members Okta does not list cannot be named, and is not
/// rekeyd's to touch).
pub fn listing(keys: &[OktaKey], client_id: &str) -> Vec<RemoteSecret> {
    keys.iter()
        .filter_map(|k| {
            Some(RemoteSecret {
                id: k.thumbprint.clone()?,
                description: String::new(),
                client_id: Some(client_id.to_string()),
                created_at: created_at(k.created.as_deref()),
                expires_at: None,
            })
        })
        .collect()
}

/// The create body: the public JWK, active at once (the rotation proves
/// it with a login before anything depends on it).
pub fn create_body(public: &Value) -> Value {
    let mut body = public.clone();
    body["status"] = "ACTIVE".into();
    body
}

/// Reads a create reply: the key with Okta's `id` on 2xx.
pub fn parse_create_reply(
    operation: &'static str,
    reply: &Reply,
) -> Result<OktaKey, ProviderError> {
    accepted(operation, reply)?;
    let created = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .as_ref()
        .and_then(read_key)
        .ok_or_else(|| reply.unexpected(operation, "expected a JSON key with an id"))?;
    if created.id.is_empty() {
        return Err(reply.unexpected(operation, "empty key id"));
    }
    Ok(created)
}

/// Whether deactivating `target` would leave the app without an active
/// key: it is active and no other is (another copy of the same key,
/// [`copies`], does not count: it goes with it). Pure, for the I1 check.
pub fn last_active(keys: &[OktaKey], target: &OktaKey) -> bool {
    let copy = |k: &OktaKey| k.thumbprint.is_some() && k.thumbprint == target.thumbprint;
    target.active()
        && !keys
            .iter()
            .any(|k| k.id != target.id && !copy(k) && k.active())
}

/// The key named `id` (its thumbprint).
fn find<'k>(keys: &'k [OktaKey], id: &str) -> Option<&'k OktaKey> {
    keys.iter().find(|k| k.thumbprint.as_deref() == Some(id))
}

/// Every listed copy of the key named `id`: Okta may hold one key under
/// several kids (added twice), and a withdrawn key must go under all of
/// them, or it stays accepted while the journal forgets it (I3).
fn copies<'k>(keys: &'k [OktaKey], id: &str) -> Vec<&'k OktaKey> {
    keys.iter()
        .filter(|k| k.thumbprint.as_deref() == Some(id))
        .collect()
}

impl SecretApi for OktaKeys {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move { Ok(listing(&self.keys(bearer).await?, &self.client_id)) })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta add key";
            let (id, public) = jwks::public_of(OP, request.value)?;
            let new = || NewSecret {
                id: Some(id.clone()),
                value: request.value.cloned().expect("public_of checked it"),
                expires_at: None,
                registration_access_token: None,
            };
            // Publishing twice is publishing once: a key whose reply was
            // lost is listed already. (Listed but inactive,
            // someone deactivated it: the login that proves it fails, and
            // the rotation retires it as any refused key.)
            if find(&self.keys(bearer).await?, &id).is_some() {
                return Ok(new());
            }
            let reply = self
                .api
                .create(OP, bearer, &create_body(&public), None)
                .await?;
            let created = parse_create_reply(OP, &reply)?;
            if created.thumbprint.as_deref().is_some_and(|t| t != id) {
                return Err(reply.unexpected(OP, "the added key is another key"));
            }
            Ok(new())
        })
    }

    fn deactivate<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta deactivate key";
            let keys = self.keys(bearer).await?;
            let copies = copies(&keys, id);
            if copies.is_empty() {
                return Ok(Deleted::NotFound);
            }
            let active: Vec<&OktaKey> = copies.into_iter().filter(|k| k.active()).collect();
            if active.is_empty() {
                return Ok(Deleted::Deleted);
            }
            if active.iter().any(|key| last_active(&keys, key)) {
                // I1: the machine retires a key only once another is
                // proven; an app whose only active key this is is not
                // what the journal says.
                return Err(ProviderError {
                    kind: ErrorKind::Refused,
                    operation: OP,
                    status: None,
                    code: None,
                    detail: format!(
                        "key {id} is the app's only active key: deactivating it would lock the \
                         client out; nothing was changed"
                    ),
                    retry_after: None,
                });
            }
            let mut done = Deleted::NotFound;
            for key in active {
                if self.api.deactivate(OP, bearer, &key.id).await? == Deleted::Deleted {
                    done = Deleted::Deleted;
                }
            }
            Ok(done)
        })
    }

    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta delete key";
            let keys = self.keys(bearer).await?;
            let mut done = Deleted::NotFound;
            for key in copies(&keys, id) {
                if self.api.delete(OP, bearer, &key.id).await? == Deleted::Deleted {
                    done = Deleted::Deleted;
                }
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::okta_api::tests::reply;

    /// The documented listing's shape (two RSA keys, one of them
    /// inactive) around two real keys; the first with a kid of an
    /// operator's choosing, the second as Okta may store a key (no kid), a
    /// third without public members and a fourth without an id.
    fn documented() -> (String, [crate::provider::key::ClientKey; 2]) {
        use crate::provider::key::{Alg, generate, generate_with_kid};
        let old = generate_with_kid(Alg::Rs256, "operators-kid");
        let new = generate(Alg::Rs256).unwrap();
        let mut first = old.public_jwk();
        first["id"] = "pks1".into();
        first["status"] = "INACTIVE".into();
        first["created"] = "2023-02-21T20:08:24.000Z".into();
        let mut second = new.public_jwk();
        second.as_object_mut().unwrap().remove("kid");
        second["id"] = "pks2".into();
        second["status"] = "ACTIVE".into();
        second["created"] = "garbage".into();
        let body = serde_json::json!({"jwks": {"keys": [
            first,
            second,
            {"id": "pks3", "kid": "members-hidden", "kty": "RSA", "status": "ACTIVE"},
            {"kid": "no-id"},
        ]}});
        (body.to_string(), [old, new])
    }

    #[test]
    fn the_documented_listing_is_read_by_thumbprint() {
        let (body, [old, new]) = documented();
        let keys = parse_list_reply("list", &reply(200, &body)).unwrap();
        assert_eq!(keys.len(), 3, "a key without an id is skipped");
        let listed = listing(&keys, "app-client");
        assert_eq!(listed.len(), 2, "a key without members is not named");
        assert_eq!(listed[0].id, old.thumbprint());
        assert_eq!(listed[1].id, new.thumbprint());
        assert_eq!(find(&keys, &new.thumbprint()).unwrap().id, "pks2");
        assert_eq!(listed[0].client_id.as_deref(), Some("app-client"));
        assert!(listed[0].created_at.is_some());
        assert!(listed[1].created_at.is_none());
        let array = r#"[{"id":"pks9","kid":"k","status":"ACTIVE"}]"#;
        assert_eq!(
            parse_list_reply("list", &reply(200, array)).unwrap()[0].id,
            "pks9"
        );
        let e = parse_list_reply("list", &reply(200, r#"{"x":1}"#)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    }

    #[test]
    fn the_last_active_key_is_never_deactivated() {
        let (body, _) = documented();
        let keys = parse_list_reply("list", &reply(200, &body)).unwrap();
        assert!(!last_active(&keys, &keys[1]), "pks3 is active too");
        let keys = &keys[..2];
        assert!(last_active(keys, &keys[1]), "pks2 is the only active key");
        assert!(!last_active(keys, &keys[0]), "pks1 is inactive");
        let mut both = keys.to_vec();
        both[0].status = Some("ACTIVE".into());
        assert!(!last_active(&both, &both[1]));
        // A second copy of the same key (another kid) goes with it: it
        // does not count as the key that stays active.
        let mut copy = both[1].clone();
        copy.id = "pks9".into();
        let only_copies = [both[1].clone(), copy];
        assert!(last_active(&only_copies, &only_copies[0]));
        assert_eq!(copies(&only_copies, &new_thumbprint(&only_copies)).len(), 2);
    }

    fn new_thumbprint(keys: &[OktaKey]) -> String {
        keys[0].thumbprint.clone().unwrap()
    }

    #[test]
    fn the_create_body_is_the_public_key_made_active() {
        let key = crate::provider::key::generate(crate::provider::key::Alg::Es256).unwrap();
        let body = create_body(&key.public_jwk());
        assert_eq!(body["status"], "ACTIVE");
        assert_eq!(body["kid"], key.kid());
        assert_eq!(body["crv"], "P-256");
        assert!(body.get("d").is_none());
    }

    #[test]
    fn a_refusal_keeps_oktas_error_code_and_summary() {
        let body = r#"{"errorCode":"E0000001","errorSummary":"Api validation failed: kty","errorCauses":[]}"#;
        let e = parse_create_reply("add", &reply(400, body)).unwrap_err();
        assert_eq!(e.status, Some(400));
        assert_eq!(e.code.as_deref(), Some("E0000001"));
        assert!(e.detail.contains("Api validation failed"), "{e}");
        assert_eq!(e.kind, ErrorKind::Refused);
        let ok = parse_create_reply("add", &reply(201, r#"{"id":"pks3","kid":"k"}"#)).unwrap();
        assert_eq!(ok.id, "pks3");
    }
}
