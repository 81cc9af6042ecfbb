//! A client's published public keys as a JWK Set (RFC 7517 §5:
//! `{"keys": [JWK, ...]}`), edited the same way wherever it is published:
//! an RFC 7592 registration's `jwks`, a JWKS file or Kubernetes Secret
//! that a server fetches as the client's `jwks_uri`.
//!
//! A published key is named by its `kid`, else its RFC 7638 thumbprint
//! ([`key::public_key_id`]); rekeyd's own keys always carry their `kid`.
//! Members rekeyd cannot read are kept as they are: they are not its to
//! touch.

use secrecy::SecretString;
use serde_json::{Value, json};

use super::key;
use super::{ErrorKind, ProviderError, RemoteSecret};

/// The keys of a set; a missing or malformed `keys` member is none.
fn keys(set: &Value) -> &[Value] {
    set.get("keys")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The ids of the set's keys, in order.
pub fn ids(set: &Value) -> Vec<String> {
    keys(set).iter().filter_map(key::public_key_id).collect()
}

/// The set's keys as a listing of `client_id`'s secrets (ids only).
pub fn listing(set: &Value, client_id: &str) -> Vec<RemoteSecret> {
    ids(set)
        .into_iter()
        .map(|id| RemoteSecret {
            id,
            description: String::new(),
            client_id: Some(client_id.to_string()),
            created_at: None,
            expires_at: None,
        })
        .collect()
}

/// The set with `public` added, unless a key with its id is there already
/// (publishing twice is publishing once); `None` when nothing changes.
pub fn with_key(set: &Value, public: &Value) -> Option<Value> {
    let id = key::public_key_id(public);
    if id.is_some() && keys(set).iter().any(|k| key::public_key_id(k) == id) {
        return None;
    }
    let mut all = keys(set).to_vec();
    all.push(public.clone());
    Some(json!({ "keys": all }))
}

/// The set without the key `id`; `None` when it holds no such key.
///
/// # Errors
/// [`ErrorKind::Refused`] (naming `operation`) when several different
/// keys carry the id (RFC 7517 §4.5 lets keys of different types share a
/// `kid`): one of them is not rekeyd's, and it cannot tell which.
pub fn without(
    set: &Value,
    id: &str,
    operation: &'static str,
) -> Result<Option<Value>, ProviderError> {
    let before = keys(set);
    let (matching, after): (Vec<&Value>, Vec<&Value>) = before
        .iter()
        .partition(|k| key::public_key_id(k).as_deref() == Some(id));
    // Copies of one key (with and without `kid`, say) are one key.
    let prints: Vec<Option<String>> = matching.iter().map(|k| key::public_thumbprint(k)).collect();
    let one_key = prints
        .first()
        .is_some_and(|first| first.is_some() && prints.iter().all(|p| p == first));
    if matching.len() > 1 && !one_key {
        return Err(ProviderError {
            kind: ErrorKind::Refused,
            operation,
            status: None,
            code: None,
            detail: format!(
                "{} different keys carry the id {id}; rekeyd cannot tell which is its own, \
                 so none is withdrawn (remove the one no longer used by hand)",
                matching.len()
            ),
            retry_after: None,
        });
    }
    let after: Vec<Value> = after.into_iter().cloned().collect();
    Ok((!matching.is_empty()).then(|| json!({ "keys": after })))
}

/// The public JWK of the private key a rotation chose
/// ([`super::CreateRequest::value`]). `operation` names the call in the
/// error, which never quotes the key.
pub fn public_of(
    operation: &'static str,
    chosen: Option<&SecretString>,
) -> Result<(String, Value), ProviderError> {
    let Some(chosen) = chosen else {
        return Err(ProviderError::transient(
            operation,
            "no key was chosen for this publish (a record written before key rotation?)",
        ));
    };
    let key = key::from_secret(chosen)
        .map_err(|e| ProviderError::transient(operation, format!("the new key {e}")))?;
    Ok((key.kid().to_string(), key.public_jwk()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::key::{Alg, generate};

    #[test]
    fn keys_are_added_once_and_removed_by_id() {
        let a = generate(Alg::Es256).unwrap();
        let b = generate(Alg::EdDsa).unwrap();
        let set = json!({"keys": [a.public_jwk()]});
        let both = with_key(&set, &b.public_jwk()).unwrap();
        assert_eq!(ids(&both), [a.kid(), b.kid()]);
        assert!(with_key(&both, &b.public_jwk()).is_none(), "idempotent");
        let only_b = without(&both, a.kid(), "w").unwrap().unwrap();
        assert_eq!(ids(&only_b), [b.kid()]);
        assert!(
            without(&only_b, a.kid(), "w").unwrap().is_none(),
            "already gone"
        );
        assert_eq!(listing(&only_b, "c")[0].client_id.as_deref(), Some("c"));
    }

    #[test]
    fn a_key_without_kid_is_named_by_its_thumbprint_and_junk_is_kept() {
        let a = generate(Alg::Es256).unwrap();
        let mut public = a.public_jwk();
        public.as_object_mut().unwrap().remove("kid");
        let set = json!({"keys": [public, {"kty": "unknown"}]});
        assert_eq!(ids(&set), [a.thumbprint()]);
        let left = without(&set, &a.thumbprint(), "w").unwrap().unwrap();
        assert_eq!(left["keys"].as_array().unwrap().len(), 1, "junk kept");
        assert!(ids(&json!({"keys": "nope"})).is_empty());
    }

    #[test]
    fn the_public_part_of_a_chosen_key_has_no_private_member() {
        let a = generate(Alg::Rs256).unwrap();
        let (kid, public) = public_of("publish", Some(&a.to_secret())).unwrap();
        assert_eq!(kid, a.kid());
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(public.get(private).is_none(), "{private}");
        }
        let e = public_of("publish", Some(&SecretString::from("not a key"))).unwrap_err();
        assert!(!e.to_string().contains("not a key"), "{e}");
    }
}
