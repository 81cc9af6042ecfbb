//! A client's published public keys as a JWK Set (RFC 7517 §5:
//! `{"keys": [JWK, ...]}`), edited the same way wherever it is published:
//! an RFC 7592 registration's `jwks`, a JWKS file or Kubernetes Secret
//! that a server fetches as the client's `jwks_uri`.
//!
//! A published key is named by its RFC 7638 thumbprint
//! ([`key::public_thumbprint`]), whatever its `kid` says: a server that
//! drops or rewrites a `kid` when it stores a key, or a `kid` two keys
//! share (RFC 7517 §4.5 allows it), never makes rekeyd withdraw the wrong
//! key or miss its own. Members rekeyd cannot read are kept as they are:
//! they are not its to touch.

use secrecy::SecretString;
use serde_json::{Value, json};

use super::key;
use super::{ProviderError, RemoteSecret};

/// The keys of a set; a missing or malformed `keys` member is none.
fn keys(set: &Value) -> &[Value] {
    set.get("keys")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The JWK members that hold private key material (RFC 7518 §6.2.2 EC
/// `d`, §6.3.2 RSA `d` `p` `q` `dp` `dq` `qi` `oth`, §6.4.1 symmetric
/// `k`; RFC 8037 §2 OKP `d`).
pub const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Whether any key of the set carries a private member
/// ([`PRIVATE_MEMBERS`]): such a set must never be published (I7).
pub fn holds_private_member(set: &Value) -> bool {
    keys(set).iter().any(|k| {
        k.as_object()
            .is_some_and(|k| PRIVATE_MEMBERS.iter().any(|m| k.contains_key(*m)))
    })
}

/// Whether `bytes` are a JWK Set (`{"keys": [...]}`) of public keys only:
/// what may be served at a `jwks_uri`.
pub fn is_public_set(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes).is_ok_and(|set| {
        set.get("keys").is_some_and(Value::is_array) && !holds_private_member(&set)
    })
}

/// The ids of the set's keys, in order.
pub fn ids(set: &Value) -> Vec<String> {
    keys(set)
        .iter()
        .filter_map(key::public_thumbprint)
        .collect()
}

/// Published keys (by id) as a listing of `client_id`'s secrets.
pub fn listing(ids: Vec<String>, client_id: &str) -> Vec<RemoteSecret> {
    ids.into_iter()
        .map(|id| RemoteSecret {
            id,
            description: String::new(),
            client_id: Some(client_id.to_string()),
            created_at: None,
            expires_at: None,
        })
        .collect()
}

/// The set with `public` added, unless the key is there already
/// (publishing twice is publishing once); `None` when nothing changes.
pub fn with_key(set: &Value, public: &Value) -> Option<Value> {
    let id = key::public_thumbprint(public);
    if id.is_some() && keys(set).iter().any(|k| key::public_thumbprint(k) == id) {
        return None;
    }
    let mut all = keys(set).to_vec();
    all.push(public.clone());
    Some(json!({ "keys": all }))
}

/// The set without the key `id` (a thumbprint; every copy of the key,
/// whatever their `kid`s); `None` when it holds no such key.
pub fn without(set: &Value, id: &str) -> Option<Value> {
    let before = keys(set);
    let after: Vec<Value> = before
        .iter()
        .filter(|k| key::public_thumbprint(k).as_deref() != Some(id))
        .cloned()
        .collect();
    (after.len() < before.len()).then(|| json!({ "keys": after }))
}

/// The id (thumbprint) and public JWK of the private key a rotation chose
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
    Ok((key.thumbprint(), key.public_jwk()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::key::{Alg, generate, generate_with_kid};
    use secrecy::ExposeSecret;

    #[test]
    fn keys_are_added_once_and_removed_by_thumbprint() {
        let a = generate(Alg::Es256).unwrap();
        let b = generate(Alg::EdDsa).unwrap();
        let set = json!({"keys": [a.public_jwk()]});
        let both = with_key(&set, &b.public_jwk()).unwrap();
        assert_eq!(ids(&both), [a.thumbprint(), b.thumbprint()]);
        assert!(with_key(&both, &b.public_jwk()).is_none(), "idempotent");
        let only_b = without(&both, &a.thumbprint()).unwrap();
        assert_eq!(ids(&only_b), [b.thumbprint()]);
        assert!(without(&only_b, &a.thumbprint()).is_none(), "already gone");
        assert_eq!(
            listing(ids(&only_b), "c")[0].client_id.as_deref(),
            Some("c")
        );
    }

    #[test]
    fn a_kid_dropped_rewritten_or_shared_does_not_change_which_key_is_which() {
        // An operator's key with a kid of its choosing, as a server may
        // store it: without the kid, with another, or next to a different
        // key carrying the same kid (RFC 7517 §4.5).
        let ours = generate_with_kid(Alg::Es256, "op-key-1");
        assert_eq!(ours.kid(), "op-key-1");
        let other = generate(Alg::Es256).unwrap();
        let mut dropped = ours.public_jwk();
        dropped.as_object_mut().unwrap().remove("kid");
        let mut rewritten = ours.public_jwk();
        rewritten["kid"] = "server-42".into();
        let mut shared = other.public_jwk();
        shared["kid"] = "op-key-1".into();
        let set =
            json!({"keys": [dropped, rewritten, shared, {"kty": "unknown", "kid": "op-key-1"}]});
        assert_eq!(
            ids(&set),
            [ours.thumbprint(), ours.thumbprint(), other.thumbprint()]
        );
        assert!(
            with_key(&set, &ours.public_jwk()).is_none(),
            "ours is there"
        );
        let left = without(&set, &ours.thumbprint()).unwrap();
        assert_eq!(ids(&left), [other.thumbprint()], "both copies of ours went");
        assert_eq!(left["keys"].as_array().unwrap().len(), 2, "junk kept");
        assert!(ids(&json!({"keys": "nope"})).is_empty());
    }

    #[test]
    fn a_set_with_a_private_member_is_not_public() {
        let a = generate(Alg::Es256).unwrap();
        let public = json!({"keys": [a.public_jwk()]});
        assert!(is_public_set(public.to_string().as_bytes()));
        assert!(!holds_private_member(&public));
        let private: Value = serde_json::from_str(a.to_secret().expose_secret()).unwrap();
        let leaky = json!({"keys": [a.public_jwk(), private]});
        assert!(holds_private_member(&leaky));
        assert!(!is_public_set(leaky.to_string().as_bytes()));
        let oct = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        assert!(!is_public_set(oct.to_string().as_bytes()));
        assert!(!is_public_set(b"-----BEGIN PRIVATE KEY-----"));
        assert!(!is_public_set(br#"{"kty":"EC"}"#));
    }

    #[test]
    fn the_public_part_of_a_chosen_key_has_no_private_member() {
        let a = generate(Alg::Rs256).unwrap();
        let (id, public) = public_of("publish", Some(&a.to_secret())).unwrap();
        assert_eq!(id, a.thumbprint());
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(public.get(private).is_none(), "{private}");
        }
        let e = public_of("publish", Some(&SecretString::from("not a key"))).unwrap_err();
        assert!(!e.to_string().contains("not a key"), "{e}");
    }
}
