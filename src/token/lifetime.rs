//! How long a token from a token reply lives: pure rules over the reply's
//! `expires_in`, the token's own `exp` claim and a configured default,
//! measured from the moment the reply arrived (DESIGN.md "Token refresh").
//!
//! - `expires_in` (RFC 6749 §5.1, seconds) may be a JSON number or a string
//!   holding one; both forms follow the same rule: any finite decimal
//!   number, fractions included (`3600`, `"3600"`, `3.5`, `"4.0"`, `1e3`).
//!   Anything else (`"soon"`, `true`, `"NaN"`) is an invalid reply.
//! - When the access token is a JWT (RFC 7519, compact JWS: three base64url
//!   parts), its payload's `exp` (seconds since the Unix epoch) is read
//!   without verifying anything, as a hint only: `exp` minus this host's
//!   wall clock at arrival. When both are present the earlier wins.
//! - With neither, the credential's `refresh.default_lifetime`.
//! - A lifetime under [`MIN_LIFETIME`] (zero, negative, or an `exp` already
//!   past) is not a token at all: the reply counts as a failed refresh.
//! - Lifetimes over [`MAX_LIFETIME`] are cut to it.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::Value;

/// Shortest lifetime accepted (one second): see
/// [`crate::config::MIN_TOKEN_LIFETIME`].
pub const MIN_LIFETIME: Duration = crate::config::MIN_TOKEN_LIFETIME;

/// Longest lifetime believed: ten years, beyond any real token.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Where a lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    ExpiresIn,
    /// The JWT's `exp` claim (earlier than `expires_in`, or the only one).
    JwtExp,
    /// `refresh.default_lifetime`: the reply said nothing.
    Default,
}

impl LifetimeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LifetimeSource::ExpiresIn => "expires_in",
            LifetimeSource::JwtExp => "the token's exp claim",
            LifetimeSource::Default => "refresh.default_lifetime",
        }
    }
}

/// The lifetime of a token and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub duration: Duration,
    pub source: LifetimeSource,
}

/// Why a reply's lifetime is refused. The texts quote what the provider
/// sent; the caller scrubs them (they are provider text).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LifetimeError {
    #[error("token endpoint returned expires_in {0}, which is not a number of seconds")]
    Invalid(String),
    #[error(
        "token endpoint returned expires_in {0}: a token that lives less than a second is already expired"
    )]
    ExpiresInOver(String),
    #[error(
        "the token's exp claim is {} in the past by this host's clock: the token is already expired",
        humantime::format_duration(*.0)
    )]
    JwtExpPast(Duration),
    #[error(
        "the token's exp claim leaves it less than a second by this host's clock: the token is already expired"
    )]
    JwtExpNow,
}

/// The lifetime of the token in a reply that arrived at `arrived` (wall
/// clock, for the JWT's `exp` only). `expires_in` is the reply's field
/// (`None` or JSON `null` when absent); `access_token` the token itself.
pub fn lifetime(
    expires_in: Option<&Value>,
    access_token: &str,
    arrived: SystemTime,
    default: Duration,
) -> Result<Lifetime, LifetimeError> {
    let from_reply = match expires_in {
        None | Some(Value::Null) => None,
        Some(value) => Some((seconds(value)?, value)),
    };
    if let Some((secs, value)) = from_reply
        && secs < MIN_LIFETIME.as_secs_f64()
    {
        return Err(LifetimeError::ExpiresInOver(value.to_string()));
    }
    let from_jwt = jwt_exp(access_token).map(|exp| exp - unix_seconds(arrived));
    let (secs, source) = match (from_reply, from_jwt) {
        (Some((reply, _)), Some(jwt)) if jwt < reply => (jwt, LifetimeSource::JwtExp),
        (Some((reply, _)), _) => (reply, LifetimeSource::ExpiresIn),
        (None, Some(jwt)) => (jwt, LifetimeSource::JwtExp),
        (None, None) => (default.as_secs_f64(), LifetimeSource::Default),
    };
    // `expires_in` was checked above and the default by the configuration:
    // only an `exp` can still be too early here.
    if source == LifetimeSource::JwtExp && secs < MIN_LIFETIME.as_secs_f64() {
        return Err(if secs <= 0.0 {
            LifetimeError::JwtExpPast(Duration::from_secs_f64((-secs).min(1e12)))
        } else {
            LifetimeError::JwtExpNow
        });
    }
    Ok(Lifetime {
        duration: Duration::from_secs_f64(secs.min(MAX_LIFETIME.as_secs_f64())),
        source,
    })
}

/// `expires_in` as seconds: a finite number, or a string holding one.
fn seconds(value: &Value) -> Result<f64, LifetimeError> {
    let secs = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    secs.filter(|s| s.is_finite())
        .ok_or_else(|| LifetimeError::Invalid(value.to_string()))
}

/// The `exp` claim of a compact JWS, if `token` is one and has a numeric
/// `exp`. Nothing is verified: the claim only tells when to refresh.
fn jwt_exp(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        // Five parts is a JWE, whose payload is encrypted.
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&json).ok()?;
    claims.get("exp")?.as_f64().filter(|e| e.is_finite())
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn jwt(claims: Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    fn ok(expires_in: Option<Value>, token: &str) -> Lifetime {
        lifetime(expires_in.as_ref(), token, now(), HOUR).unwrap()
    }

    fn err(expires_in: Option<Value>, token: &str) -> String {
        lifetime(expires_in.as_ref(), token, now(), HOUR)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn numbers_and_strings_follow_one_rule() {
        for (value, secs) in [
            (json!(3600), 3600.0),
            (json!("3600"), 3600.0),
            (json!(3.5), 3.5),
            (json!("4.0"), 4.0),
            (json!(" 60 "), 60.0),
            (json!(1e3), 1000.0),
            (json!("1e3"), 1000.0),
        ] {
            let l = ok(Some(value.clone()), "opaque");
            assert_eq!(l.duration, Duration::from_secs_f64(secs), "{value}");
            assert_eq!(l.source, LifetimeSource::ExpiresIn);
        }
        for value in [
            json!("soon"),
            json!("NaN"),
            json!("inf"),
            json!(true),
            json!([1]),
        ] {
            let e = err(Some(value.clone()), "opaque");
            assert!(e.contains("not a number of seconds"), "{value}: {e}");
        }
    }

    #[test]
    fn zero_negative_and_sub_second_lifetimes_are_refused() {
        assert_eq!(
            err(Some(json!(0)), "opaque"),
            "token endpoint returned expires_in 0: a token that lives less than a second is already expired"
        );
        assert!(err(Some(json!("0")), "opaque").contains("expires_in \"0\""));
        assert!(err(Some(json!(-30)), "opaque").contains("expires_in -30"));
        assert!(err(Some(json!(0.5)), "opaque").contains("expires_in 0.5"));
        assert_eq!(ok(Some(json!(1)), "opaque").duration, MIN_LIFETIME);
    }

    #[test]
    fn missing_expires_in_uses_the_jwt_then_the_default() {
        let l = ok(None, "opaque");
        assert_eq!((l.duration, l.source), (HOUR, LifetimeSource::Default));
        let l = ok(Some(Value::Null), "a.b.c");
        assert_eq!(l.source, LifetimeSource::Default, "not a JWT payload");
        let token = jwt(json!({"exp": 1_800_000_600, "sub": "x"}));
        let l = ok(None, &token);
        assert_eq!(
            (l.duration, l.source),
            (Duration::from_secs(600), LifetimeSource::JwtExp)
        );
        // A fractional exp (a NumericDate may be one), base64 with padding.
        let payload = base64::engine::general_purpose::URL_SAFE
            .encode(json!({"exp": 1_800_000_060.5}).to_string().as_bytes());
        assert!(payload.ends_with('='), "{payload}");
        let token = format!("e30.{payload}.sig");
        assert_eq!(ok(None, &token).duration, Duration::from_secs_f64(60.5));
    }

    #[test]
    fn the_earlier_of_exp_and_expires_in_wins() {
        let token = jwt(json!({"exp": 1_800_000_600}));
        let l = ok(Some(json!(3600)), &token);
        assert_eq!(
            (l.duration, l.source),
            (Duration::from_secs(600), LifetimeSource::JwtExp)
        );
        let l = ok(Some(json!(60)), &token);
        assert_eq!(
            (l.duration, l.source),
            (Duration::from_secs(60), LifetimeSource::ExpiresIn)
        );
    }

    #[test]
    fn an_exp_already_past_is_refused() {
        let token = jwt(json!({"exp": 1_800_000_000 - 90}));
        assert_eq!(
            err(Some(json!(3600)), &token),
            "the token's exp claim is 1m 30s in the past by this host's clock: the token is already expired"
        );
        let token = jwt(json!({"exp": 1_800_000_000}));
        assert!(err(None, &token).contains("in the past"));
        let token = jwt(json!({"exp": 1_800_000_000.5}));
        assert!(err(None, &token).contains("less than a second"));
    }

    #[test]
    fn jwe_and_odd_claims_are_no_hint() {
        let five = format!("{}.x.y.z", jwt(json!({"exp": 1})));
        assert_eq!(ok(None, &five).source, LifetimeSource::Default);
        let token = jwt(json!({"exp": "1800000600"}));
        assert_eq!(ok(None, &token).source, LifetimeSource::Default);
        let token = jwt(json!(["not", "an", "object"]));
        assert_eq!(ok(None, &token).source, LifetimeSource::Default);
    }

    #[test]
    fn huge_lifetimes_are_capped() {
        assert_eq!(ok(Some(json!(1e300)), "opaque").duration, MAX_LIFETIME);
        assert_eq!(
            ok(Some(json!("99999999999999999999")), "opaque").duration,
            MAX_LIFETIME
        );
    }
}
