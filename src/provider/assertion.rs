//! Client assertions (RFC 7521 §4.2, RFC 7523 §2.2 and §3): the JWTs a
//! client authenticates with instead of a secret.
//!
//! Two sources: one rekeyd signs for every attempt with the credential's
//! key ([`mint`], `auth_method = "private_key_jwt"`), and one the platform
//! writes to a file and replaces by itself ([`read_file`],
//! `auth_method = "client_assertion_file"`, e.g. a Kubernetes projected
//! service-account token). Either is a credential: it is scrubbed from
//! replies and never logged.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rand::RngCore;
use secrecy::SecretString;
use serde::Serialize;

use super::key::{ClientKey, KeyError};

/// `client_assertion_type` of a JWT assertion (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion rekeyd signs is valid: long enough for a slow
/// request and some clock skew, short enough that a captured one is of
/// little use (RFC 7523 §3 item 4 lets the server limit it; Entra and
/// Okta accept at most minutes).
pub const LIFETIME: Duration = Duration::from_secs(60);

/// The claims of an assertion rekeyd signs (RFC 7523 §3; OpenID Connect
/// Core §9 `private_key_jwt`). Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// The client id (§3 item 1: the issuer is the client).
    pub iss: String,
    /// The client id again (§3 item 2).
    pub sub: String,
    /// The token endpoint URL, or `assertion_audience` (§3 item 3).
    pub aud: String,
    /// 128 random bits, base64url: servers refuse a `jti` they saw (§3
    /// item 7), so every attempt gets its own.
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

/// The claims for one attempt at `now` (pure; `jti` from [`new_jti`]).
pub fn claims(client_id: &str, audience: &str, now: SystemTime, jti: String) -> Claims {
    let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    Claims {
        iss: client_id.to_string(),
        sub: client_id.to_string(),
        aud: audience.to_string(),
        jti,
        iat,
        exp: iat + LIFETIME.as_secs(),
    }
}

/// A fresh `jti`: 128 bits from the thread's CSPRNG, base64url (22
/// characters).
pub fn new_jti() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    B64.encode(bytes)
}

/// Signs `claims` with `key` as a JWS compact serialization (RFC 7515
/// §7.1) with header `alg`, `kid` and `typ = "JWT"`.
///
/// # Errors
/// [`KeyError::Sign`] if the signature fails.
pub fn sign(key: &ClientKey, claims: &Claims) -> Result<SecretString, KeyError> {
    let header = serde_json::json!({"alg": key.alg().as_str(), "kid": key.kid(), "typ": "JWT"});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(serde_json::to_vec(claims).expect("claims serialize"))
    );
    let signature = key.sign(input.as_bytes())?;
    Ok(SecretString::from(format!(
        "{input}.{}",
        B64.encode(signature)
    )))
}

/// A new assertion for one attempt: fresh `jti`, `iat` now, `exp`
/// [`LIFETIME`] ahead.
///
/// # Errors
/// As [`sign`].
pub fn mint(
    key: &ClientKey,
    client_id: &str,
    audience: &str,
    now: SystemTime,
) -> Result<SecretString, KeyError> {
    sign(key, &claims(client_id, audience, now, new_jti()))
}

/// Why an assertion file cannot be used. Names the file, never its
/// content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the client assertion file {path} ({reason})")]
    Unreadable { path: String, reason: String },
    #[error("the client assertion file {path} is empty")]
    Empty { path: String },
    #[error(
        "the client assertion in {path} expired at {expired_at} (the platform has not replaced it)"
    )]
    Expired { path: String, expired_at: String },
}

/// Reads the assertion in `path` afresh (never cached: the kubelet
/// replaces a projected token by swapping a symlinked directory, so only a
/// new open sees the new one) and checks that a JWT's `exp`, when it has
/// one, is after `now`. A value that is not a JWT is sent as it is (RFC
/// 7521 allows other assertion formats; the server judges it).
///
/// # Errors
/// [`FileError`]: unreadable, empty, or expired.
pub fn read_file(path: &Path, now: SystemTime) -> Result<SecretString, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError::Unreadable {
        path: shown.clone(),
        reason: e.kind().to_string(),
    })?;
    let assertion = text.trim();
    if assertion.is_empty() {
        return Err(FileError::Empty { path: shown });
    }
    if let Some(exp) = jwt_exp(assertion) {
        let expires = UNIX_EPOCH + Duration::from_secs(exp);
        if expires <= now {
            return Err(FileError::Expired {
                path: shown,
                expired_at: humantime::format_rfc3339_seconds(expires).to_string(),
            });
        }
    }
    Ok(SecretString::from(assertion.to_string()))
}

/// The `exp` claim of a JWS compact serialization, if it is one and has a
/// numeric `exp` (RFC 7519 §4.1.4).
fn jwt_exp(jwt: &str) -> Option<u64> {
    let mut parts = jwt.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    let bytes = B64.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64().or_else(|| exp.as_f64().map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::key::{Alg, generate_pem};
    use secrecy::ExposeSecret;

    #[test]
    fn claims_name_the_client_and_last_a_minute() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = claims("client-a", "https://as.example/token", now, "j1".into());
        assert_eq!(c.iss, "client-a");
        assert_eq!(c.sub, "client-a");
        assert_eq!(c.aud, "https://as.example/token");
        assert_eq!(c.iat, 1_700_000_000);
        assert_eq!(c.exp, 1_700_000_060);
        assert_eq!(c.jti, "j1");
    }

    #[test]
    fn every_jti_is_new_and_carries_128_bits() {
        let a = new_jti();
        let b = new_jti();
        assert_ne!(a, b);
        assert_eq!(B64.decode(&a).unwrap().len(), 16);
    }

    #[test]
    fn a_minted_assertion_has_the_header_and_claims() {
        let key = ClientKey::from_file_text(&generate_pem(Alg::Es256).unwrap()).unwrap();
        let now = SystemTime::now();
        let one = mint(&key, "c", "https://as/token", now).unwrap();
        let two = mint(&key, "c", "https://as/token", now).unwrap();
        assert_ne!(one.expose_secret(), two.expose_secret());
        let parts: Vec<&str> = one.expose_secret().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], key.kid());
        let body: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(body["iss"], "c");
        assert_eq!(body["aud"], "https://as/token");
        assert_eq!(jwt_exp(one.expose_secret()), body["exp"].as_u64());
    }

    fn jwt_with_exp(exp: u64) -> String {
        format!(
            "{}.{}.sig",
            B64.encode(r#"{"alg":"RS256"}"#),
            B64.encode(format!(
                r#"{{"sub":"system:serviceaccount:ns:sa","exp":{exp}}}"#
            ))
        )
    }

    #[test]
    fn an_assertion_file_is_read_afresh_and_its_expiry_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let err = read_file(&path, now).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_file(&path, now),
            Err(FileError::Empty { .. })
        ));
        let first = jwt_with_exp(2_000_000_600);
        std::fs::write(&path, format!("{first}\n")).unwrap();
        assert_eq!(read_file(&path, now).unwrap().expose_secret(), first);
        let second = jwt_with_exp(2_000_001_200);
        std::fs::write(&path, &second).unwrap();
        assert_eq!(read_file(&path, now).unwrap().expose_secret(), second);
        let expired = jwt_with_exp(1_999_999_999);
        std::fs::write(&path, &expired).unwrap();
        let err = read_file(&path, now).unwrap_err().to_string();
        assert!(
            err.contains("expired at 2033-05-18T03:33:19Z") && !err.contains(&expired),
            "{err}"
        );
    }
}
