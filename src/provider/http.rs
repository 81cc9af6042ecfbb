//! The HTTP plumbing every provider shares: a client with timeouts, no
//! redirects and the proxy rule of [`crate::proxy`], a body reader that refuses to buffer more than a small cap, and
//! the parsing of token replies and RFC 6749 §5.2 error bodies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ErrorKind, ProviderError};
use crate::config::EndpointsConfig;
use crate::proxy::ProxyEnv;
use crate::token::Token;

/// A token reply or error body is a few hundred bytes; a megabyte is generous
/// and keeps a misbehaving endpoint from filling memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Tokens without `expires_in` are assumed to live this long (RFC 6749 leaves
/// it optional); refreshing early is safer than serving an expired token.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
}

/// A reply whose body has been read (within the cap).
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Clients shared between the credentials of one daemon that have the same
/// timeouts: each client owns a connection pool and a TLS configuration with
/// the system's trust store, which thousands of credentials must not each
/// load again. Owned by the daemon (not global) because a client's pooled
/// connections belong to the runtime that opened them.
#[derive(Default)]
pub struct HttpClients {
    cache: Mutex<HashMap<(Duration, Duration), HttpClient>>,
}

impl HttpClients {
    pub fn get(&self, endpoints: &EndpointsConfig) -> Result<HttpClient, ProviderError> {
        let key = (endpoints.connect_timeout, endpoints.request_timeout);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = cache.get(&key) {
            return Ok(client.clone());
        }
        let client = HttpClient::new(endpoints)?;
        cache.insert(key, client.clone());
        Ok(client)
    }
}

impl HttpClient {
    pub fn new(endpoints: &EndpointsConfig) -> Result<Self, ProviderError> {
        // Not reqwest's own reading of the environment, which sends plain
        // http (a secret in the clear) through HTTP_PROXY.
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(proxy) = Arc::new(ProxyEnv::from_env()).reqwest_proxy() {
            builder = builder.proxy(proxy);
        }
        let client = builder
            .connect_timeout(endpoints.connect_timeout)
            .timeout(endpoints.request_timeout)
            // A redirect would resend the form (and its secret) somewhere the
            // operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("rekeyd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ProviderError::transient(
                    "http client setup",
                    format!("{e} (is a CA certificate bundle installed?)"),
                )
            })?;
        Ok(HttpClient { client })
    }

    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends the request and reads the body up to [`MAX_BODY_BYTES`].
    pub async fn send(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Reply, ProviderError> {
        let started = tokio::time::Instant::now();
        let sent = request.send().await;
        let metrics = crate::metrics::global();
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                metrics.observe_request(operation, None, started.elapsed());
                return Err(ProviderError::transient(
                    operation,
                    describe_reqwest_error(&e),
                ));
            }
        };
        let status = response.status().as_u16();
        metrics.observe_request(operation, Some(status), started.elapsed());
        let headers = response.headers();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let too_large = || ProviderError {
            kind: ErrorKind::Transient,
            operation,
            status: Some(status),
            code: None,
            detail: format!(
                "response body larger than {MAX_BODY_BYTES} bytes (content-type {})",
                content_type.as_deref().unwrap_or("none")
            ),
            retry_after: None,
        };
        if response
            .content_length()
            .is_some_and(|len| len > MAX_BODY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ProviderError {
                        status: Some(status),
                        ..ProviderError::transient(
                            operation,
                            format!("reading response: {}", describe_reqwest_error(&e)),
                        )
                    });
                }
            }
        }
        Ok(Reply {
            status,
            content_type,
            retry_after,
            body: body.freeze(),
        })
    }
}

/// reqwest's Display of an error includes the URL, which is fine (no secrets
/// in our URLs), but the source chain holds the useful part (timeout, refused).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "request failed"
    };
    let mut msg = what.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate_parse(value)?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn httpdate_parse(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"): reorder into RFC 3339.
        let parts: Vec<&str> = value.split_whitespace().collect();
        if parts.len() != 6 {
            return None;
        }
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == parts[2])?
            + 1;
        let text = format!("{}-{:02}-{:0>2}T{}Z", parts[3], month, parts[1], parts[4]);
        humantime::parse_rfc3339(&text).ok()
    })
}

/// The parts of an RFC 6749 §5.2 error body we use.
#[derive(Debug, Default)]
pub struct OAuthError {
    pub code: Option<String>,
    pub description: Option<String>,
}

/// Reads `{"error": "...", "error_description": "..."}` if the body is that;
/// anything else yields no code. The code is kept only if it looks like one
/// (a short ASCII word), so a body echoing input cannot smuggle it into logs.
pub fn parse_oauth_error(body: &[u8], secret: &SecretString) -> OAuthError {
    #[derive(Deserialize)]
    struct Raw {
        error: Option<String>,
        error_description: Option<String>,
    }
    let Ok(raw) = serde_json::from_slice::<Raw>(body) else {
        return OAuthError::default();
    };
    let code = raw.error.filter(|c| {
        c.len() <= 64
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' || ch == '.')
    });
    let description = raw.error_description.map(|d| scrub(&d, secret));
    OAuthError { code, description }
}

/// Trims a provider-supplied text for an error message and removes the secret
/// in case the provider echoed it.
fn scrub(text: &str, secret: &SecretString) -> String {
    let mut text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    let s = secret.expose_secret();
    if !s.is_empty() && text.contains(s) {
        text = text.replace(s, "[REDACTED]");
    }
    text
}

/// Describes an unexpected body for an error message: status and content type,
/// never the body itself (it might hold a token).
pub fn unexpected_body(operation: &'static str, reply: &Reply, problem: &str) -> ProviderError {
    ProviderError {
        kind: ErrorKind::Transient,
        operation,
        status: Some(reply.status),
        code: None,
        detail: format!(
            "{problem} (content-type {}, {} bytes)",
            reply.content_type.as_deref().unwrap_or("none"),
            reply.body.len()
        ),
        retry_after: reply.retry_after,
    }
}

/// Builds the error for a non-success reply from status, code and kind.
pub fn error_reply(
    operation: &'static str,
    reply: &Reply,
    kind: ErrorKind,
    oauth: OAuthError,
) -> ProviderError {
    let detail = match (&oauth.code, oauth.description) {
        (_, Some(desc)) => desc,
        (Some(_), None) => String::new(),
        (None, None) => format!(
            "content-type {}",
            reply.content_type.as_deref().unwrap_or("none")
        ),
    };
    ProviderError {
        kind,
        operation,
        status: Some(reply.status),
        code: oauth.code,
        detail,
        retry_after: reply.retry_after,
    }
}

/// Parses a successful token reply. `expect_bearer` rejects other token types
/// (compared case-insensitively: Mappls says `bearer`).
pub fn parse_token_reply(operation: &'static str, reply: &Reply) -> Result<Token, ProviderError> {
    #[derive(Deserialize)]
    struct Raw {
        access_token: Option<String>,
        token_type: Option<String>,
        expires_in: Option<serde_json::Value>,
        scope: Option<String>,
    }
    let is_json = reply
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    let raw: Raw = match serde_json::from_slice(&reply.body) {
        Ok(raw) => raw,
        Err(_) if !is_json => {
            return Err(unexpected_body(
                operation,
                reply,
                "expected a JSON token reply",
            ));
        }
        Err(_) => {
            return Err(unexpected_body(
                operation,
                reply,
                "malformed JSON token reply",
            ));
        }
    };
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unexpected_body(operation, reply, "token reply without access_token"))?;
    let token_type = raw.token_type.unwrap_or_else(|| "Bearer".to_string());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(unexpected_body(
            operation,
            reply,
            "token_type is not bearer",
        ));
    }
    // Some servers send expires_in as a string.
    let lifetime = match raw.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .filter(|s| *s >= 0.0 && s.is_finite())
            .map(|s| Duration::from_secs_f64(s.min(10.0 * 365.0 * 86400.0)))
            .ok_or_else(|| unexpected_body(operation, reply, "invalid expires_in"))?,
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| unexpected_body(operation, reply, "invalid expires_in"))?,
        Some(_) => return Err(unexpected_body(operation, reply, "invalid expires_in")),
    };
    Ok(Token::new(
        SecretString::from(access_token),
        "Bearer".to_string(),
        raw.scope,
        lifetime,
    ))
}

/// The client-credentials grant with the secret in the form body, as
/// MapsIndoors and Mappls want it. `.form()` sets the Content-Type
/// `application/x-www-form-urlencoded`, which Mappls insists on.
pub async fn form_login(
    http: &HttpClient,
    operation: &'static str,
    token_url: &url::Url,
    client_id: &str,
    scope: Option<&str>,
    secret: &SecretString,
    classify: fn(u16, Option<&str>) -> ErrorKind,
) -> Result<Token, ProviderError> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret.expose_secret()),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let request = http.inner().post(token_url.clone()).form(&form);
    token_request(http, operation, request, secret, classify).await
}

/// Sends a token request and turns the reply into a token, or into an error
/// whose kind the provider's `classify` decides from status and error code.
pub async fn token_request(
    http: &HttpClient,
    operation: &'static str,
    request: reqwest::RequestBuilder,
    secret: &SecretString,
    classify: fn(u16, Option<&str>) -> ErrorKind,
) -> Result<Token, ProviderError> {
    let reply = http.send(operation, request).await?;
    if (200..300).contains(&reply.status) {
        return parse_token_reply(operation, &reply);
    }
    let oauth = parse_oauth_error(&reply.body, secret);
    let kind = classify(reply.status, oauth.code.as_deref());
    Err(error_reply(operation, &reply, kind, oauth))
}

/// Application/x-www-form-urlencoding of one value, as RFC 6749 §2.3.1
/// requires for the Basic credentials.
pub fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn oauth_error_scrubs_echoed_secret_and_odd_codes() {
        let secret = SecretString::from("s3cr3t-value");
        let e = parse_oauth_error(
            br#"{"error":"invalid_client","error_description":"bad secret s3cr3t-value"}"#,
            &secret,
        );
        assert_eq!(e.code.as_deref(), Some("invalid_client"));
        assert_eq!(e.description.as_deref(), Some("bad secret [REDACTED]"));
        let e = parse_oauth_error(br#"{"error":"has spaces s3cr3t-value"}"#, &secret);
        assert_eq!(e.code, None);
    }
}
