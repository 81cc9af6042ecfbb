//! The HTTP plumbing every provider shares: a client with timeouts, no
//! redirects and the proxy rule of [`crate::proxy`], a body reader that
//! refuses to buffer more than a small cap, and the parsing of token replies
//! and error bodies. Every text of a reply that rekeyd keeps leaves a
//! [`Reply`] scrubbed ([`super::redact`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tracing::debug;

use super::redact::Redactor;
use super::{ErrorKind, ProviderError};
use crate::config::EndpointsConfig;
use crate::proxy::ProxyEnv;
use crate::token::Token;
use crate::token::lifetime::{self, LifetimeSource};

/// A token reply or error body is a few hundred bytes; a megabyte is generous
/// and keeps a misbehaving endpoint from filling memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
}

/// A reply whose body has been read (within the cap). Its text reaches an
/// error only through [`Reply::refusal`], [`Reply::unexpected`] and
/// [`Reply::scrub`], which scrub it.
pub struct Reply {
    pub status: u16,
    /// As sent: for decisions, never to be shown unscrubbed.
    pub content_type: Option<String>,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
    /// When the reply arrived, on the wall clock (a JWT's `exp` is).
    pub arrived: SystemTime,
    scrub: Scrub,
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
    async fn send(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
        scrub: Scrub,
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
                    scrub.text(&describe_reqwest_error(&e)),
                ));
            }
        };
        let arrived = SystemTime::now();
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
            detail: scrub.text(&format!(
                "response body larger than {MAX_BODY_BYTES} bytes (content-type {})",
                content_type.as_deref().unwrap_or("none")
            )),
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
                            scrub
                                .text(&format!("reading response: {}", describe_reqwest_error(&e))),
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
            arrived,
            scrub,
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

/// What every provider of one credential reads replies with: the shared
/// HTTP client, the credential's [`Redactor`] and the lifetime assumed for
/// a token whose reply says nothing about it.
#[derive(Clone)]
pub struct Transport {
    pub http: HttpClient,
    pub redactor: Redactor,
    /// `refresh.default_lifetime` (see [`crate::token::lifetime`]).
    pub default_lifetime: Duration,
}

impl Transport {
    /// Sends a request carrying `request_secrets` (the client secret, a
    /// bearer token, encoded credentials): a reply's text is scrubbed of
    /// them as well as of everything the redactor knows.
    pub async fn send(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
        request_secrets: &[&SecretString],
    ) -> Result<Reply, ProviderError> {
        let scrub = Scrub {
            redactor: self.redactor.clone(),
            request: request_secrets.iter().map(|s| (*s).clone()).collect(),
        };
        self.http.send(operation, request, scrub).await
    }
}

/// The values a reply's text is scrubbed of.
struct Scrub {
    redactor: Redactor,
    request: Vec<SecretString>,
}

impl Scrub {
    fn text(&self, text: &str) -> String {
        self.text_with(text, &[])
    }

    /// [`Scrub::text`], also of `also` (a value of the reply itself).
    fn text_with(&self, text: &str, also: &[&str]) -> String {
        let mut known: Vec<&str> = self.request.iter().map(|s| s.expose_secret()).collect();
        known.extend_from_slice(also);
        self.redactor.scrub_with(text, &known)
    }
}

impl Reply {
    /// A reply that arrived now, as the transport builds it after reading
    /// the body: its text will be scrubbed of what `redactor` knows and of
    /// `request_secrets` (what the request carried). For parsers' tests and
    /// the fuzz targets, which have no server.
    pub fn received(
        status: u16,
        content_type: Option<String>,
        body: Bytes,
        redactor: &Redactor,
        request_secrets: &[&SecretString],
    ) -> Reply {
        Reply {
            status,
            content_type,
            retry_after: None,
            body,
            arrived: SystemTime::now(),
            scrub: Scrub {
                redactor: redactor.clone(),
                request: request_secrets.iter().map(|s| (*s).clone()).collect(),
            },
        }
    }

    /// Provider text (a header, a field) made safe to keep: see
    /// [`super::redact::scrub`].
    fn scrub(&self, text: &str) -> String {
        self.scrub.text(text)
    }

    /// A reply rekeyd cannot use, retried like any passing failure;
    /// `detail` may quote the reply (it is scrubbed).
    fn failure(&self, operation: &'static str, detail: &str) -> ProviderError {
        self.failure_with(operation, detail, &[])
    }

    /// [`Reply::failure`] for a reply that carries a value of its own
    /// (`also`: the access token of a token reply refused for its
    /// lifetime), which `detail` must not show either (I7).
    fn failure_with(&self, operation: &'static str, detail: &str, also: &[&str]) -> ProviderError {
        ProviderError {
            kind: ErrorKind::Transient,
            operation,
            status: Some(self.status),
            code: None,
            detail: self.scrub.text_with(detail, also),
            retry_after: self.retry_after,
        }
    }

    /// An error for a reply rekeyd cannot use: status and content type,
    /// never the body itself (it might hold a token).
    pub fn unexpected(&self, operation: &'static str, problem: &str) -> ProviderError {
        self.failure(
            operation,
            &format!(
                "{problem} (content-type {}, {} bytes)",
                self.content_type.as_deref().unwrap_or("none"),
                self.body.len()
            ),
        )
    }

    /// The error for a refusal (a non-2xx reply): the provider's error code
    /// and message, scrubbed, with the kind `classify` gives for the
    /// status, the code and whether a `Retry-After` came with it.
    pub fn refusal(
        &self,
        operation: &'static str,
        classify: impl FnOnce(u16, Option<&str>, bool) -> ErrorKind,
    ) -> ProviderError {
        let (code, message) = self.refusal_text();
        let code = code.map(|c| self.scrub(&c)).filter(|c| !c.is_empty());
        let message = message.map(|m| self.scrub(&m)).filter(|m| !m.is_empty());
        let kind = classify(self.status, code.as_deref(), self.retry_after.is_some());
        let detail = match (&code, message) {
            (_, Some(message)) => message,
            (Some(_), None) => String::new(),
            (None, None) => self.scrub(&format!(
                "content-type {}",
                self.content_type.as_deref().unwrap_or("none")
            )),
        };
        ProviderError {
            kind,
            operation,
            status: Some(self.status),
            code,
            detail,
            retry_after: self.retry_after,
        }
    }

    /// The raw code and message of a refusal body, from whichever fields
    /// the provider uses: RFC 6749 §5.2 (`error`, `error_description`),
    /// RFC 9457 problem details (`title`, `detail`), the common `code` and
    /// `message` (also nested as `{"error": {"code", "message"}}`); a
    /// plain-text body is the message. HTML and other bodies give neither.
    /// Private: the only way out is [`Reply::refusal`], which scrubs them.
    fn refusal_text(&self) -> (Option<String>, Option<String>) {
        if self.is_plain_text() {
            let text = String::from_utf8_lossy(&self.body);
            let text = text.trim();
            return (None, (!text.is_empty()).then(|| text.to_string()));
        }
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&self.body) else {
            return (None, None);
        };
        let nested = body.get("error").and_then(Value::as_object);
        let field = |names: &[&str]| {
            names.iter().find_map(|name| {
                let value = body.get(*name).or_else(|| nested?.get(*name))?;
                match value {
                    Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }
            })
        };
        let mut code = field(&["error", "code", "error_code", "errorCode"]);
        let mut message = field(&[
            "error_description",
            "message",
            "detail",
            "error_message",
            "title",
        ]);
        // `{"error": "customerId is required"}`: a sentence, not a code.
        if let Some(sentence) = code.take_if(|c| c.contains(char::is_whitespace)) {
            message = Some(match message {
                Some(m) => format!("{sentence}: {m}"),
                None => sentence,
            });
        }
        (code, message)
    }

    fn is_plain_text(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|ct| ct.trim().to_ascii_lowercase().starts_with("text/plain"))
    }

    fn is_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
    }
}

/// Parses a successful token reply (RFC 6749 §5.1). `token_type` is
/// compared case-insensitively (Mappls says `bearer`); the lifetime follows
/// [`crate::token::lifetime`], and a reply whose token is already expired
/// is an error, not a token.
pub fn parse_token_reply(
    operation: &'static str,
    reply: &Reply,
    default_lifetime: Duration,
) -> Result<Token, ProviderError> {
    #[derive(Deserialize)]
    struct Raw {
        access_token: Option<String>,
        token_type: Option<String>,
        expires_in: Option<Value>,
        scope: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(&reply.body).map_err(|_| {
        if reply.is_json() {
            reply.unexpected(operation, "malformed JSON token reply")
        } else {
            reply.unexpected(operation, "expected a JSON token reply")
        }
    })?;
    let access_token = raw
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| reply.unexpected(operation, "token reply without access_token"))?;
    let token_type = raw.token_type.unwrap_or_else(|| "Bearer".to_string());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(reply.unexpected(operation, "token_type is not bearer"));
    }
    let lifetime = lifetime::lifetime(
        raw.expires_in.as_ref(),
        &access_token,
        reply.arrived,
        default_lifetime,
    )
    // Retried with backoff like any failed refresh: the next reply may be
    // better, and the token being served stays (I8). The error quotes
    // `expires_in`, where a server may have put anything, the token too.
    .map_err(|e| reply.failure_with(operation, &e.to_string(), &[&access_token]))?;
    if lifetime.source != LifetimeSource::ExpiresIn {
        debug!(
            lifetime = %humantime::format_duration(Duration::from_secs(lifetime.duration.as_secs())),
            from = lifetime.source.as_str(),
            "token lifetime not taken from expires_in"
        );
    }
    Ok(Token::new(
        SecretString::from(access_token),
        "Bearer".to_string(),
        // Provider text like any other: a server may echo the request here.
        raw.scope.map(|scope| reply.scrub(&scope)),
        lifetime.duration,
    ))
}

/// The client-credentials grant with the secret in the form body, as
/// MapsIndoors and Mappls want it. `.form()` sets the Content-Type
/// `application/x-www-form-urlencoded`, which Mappls insists on.
pub async fn form_login(
    transport: &Transport,
    operation: &'static str,
    token_url: &url::Url,
    client_id: &str,
    scope: Option<&str>,
    secret: &SecretString,
    classify: fn(u16, Option<&str>, bool) -> ErrorKind,
) -> Result<Token, ProviderError> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret.expose_secret()),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let request = transport.http.inner().post(token_url.clone()).form(&form);
    token_request(transport, operation, request, secret, None, classify).await
}

/// Sends a token request that logs in with `secret` and turns the reply
/// into a token, or into an error whose kind the provider's `classify`
/// decides from status, error code and `Retry-After`. `encoded` is another
/// form of the secret the request carries (HTTP Basic credentials).
pub async fn token_request(
    transport: &Transport,
    operation: &'static str,
    request: reqwest::RequestBuilder,
    secret: &SecretString,
    encoded: Option<&SecretString>,
    classify: fn(u16, Option<&str>, bool) -> ErrorKind,
) -> Result<Token, ProviderError> {
    let carried: Vec<&SecretString> = std::iter::once(secret).chain(encoded).collect();
    let reply = transport.send(operation, request, &carried).await?;
    if (200..300).contains(&reply.status) {
        return parse_token_reply(operation, &reply, transport.default_lifetime);
    }
    Err(reply.refusal(operation, classify))
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

    fn reply(status: u16, content_type: &str, body: &str, secret: &str) -> Reply {
        Reply::received(
            status,
            Some(content_type.to_string()),
            Bytes::from(body.to_string()),
            &Redactor::new(["assertion-value".to_string()]),
            &[&SecretString::from(secret.to_string())],
        )
    }

    #[test]
    fn a_granted_scope_is_scrubbed_of_an_echoed_secret() {
        let r = reply(
            200,
            "application/json",
            r#"{"access_token":"abcdefgh12345678","expires_in":60,"scope":"read s3cr3t-value"}"#,
            "s3cr3t-value",
        );
        let token = parse_token_reply("test", &r, Duration::from_secs(3600)).unwrap();
        assert_eq!(token.scope.as_deref(), Some("read [redacted]"));
    }

    fn refused(status: u16, ct: &str, body: &str) -> ProviderError {
        reply(status, ct, body, "s3cr3t-value").refusal("test", |_, _, _| ErrorKind::Refused)
    }

    #[test]
    fn refusals_scrub_code_and_message() {
        let e = refused(
            400,
            "application/json",
            r#"{"error":"s3cr3t-value","error_description":"bad secret s3cr3t-value assertion-value","error_uri":"s3cr3t-value"}"#,
        );
        assert_eq!(e.code.as_deref(), Some("[redacted]"));
        assert_eq!(e.detail, "bad secret [redacted] [redacted]");
        assert_eq!(
            e.to_string(),
            "test failed: HTTP 400 error=[redacted]: bad secret [redacted] [redacted]"
        );
        let e = refused(400, "application/json", r#"{"error":"invalid_client"}"#);
        assert_eq!(
            (e.code.as_deref(), e.detail.as_str()),
            (Some("invalid_client"), "")
        );
    }

    #[test]
    fn refusals_read_the_common_error_shapes() {
        let e = refused(
            409,
            "application/problem+json",
            r#"{"title":"Conflict","detail":"too many","status":409}"#,
        );
        assert_eq!((e.code, e.detail.as_str()), (None, "too many"));
        let e = refused(
            400,
            "application/json",
            r#"{"error":{"code":"MaxSecrets","message":"limit 2"}}"#,
        );
        assert_eq!(
            (e.code.as_deref(), e.detail.as_str()),
            (Some("MaxSecrets"), "limit 2")
        );
        let e = refused(400, "application/json", r#"{"code":42,"message":"no"}"#);
        assert_eq!((e.code.as_deref(), e.detail.as_str()), (Some("42"), "no"));
        let e = refused(
            400,
            "application/json",
            r#"{"error":"customerId is required"}"#,
        );
        assert_eq!(
            (e.code, e.detail.as_str()),
            (None, "customerId is required")
        );
        let e = refused(
            403,
            "text/plain; charset=utf-8",
            "  Forbidden: s3cr3t-value\n",
        );
        assert_eq!((e.code, e.detail.as_str()), (None, "Forbidden: [redacted]"));
        // A page is described, never quoted.
        let e = refused(503, "text/html", "<html>s3cr3t-value</html>");
        assert_eq!(
            (e.code, e.detail.as_str()),
            (None, "content-type text/html")
        );
        // A header is provider text too.
        let e = refused(500, "s3cr3t-value", "");
        assert_eq!(e.detail, "content-type [redacted]");
    }

    #[test]
    fn a_lifetime_that_is_already_over_is_an_error_naming_what_was_sent() {
        let r = reply(
            200,
            "application/json",
            r#"{"access_token":"token-value-9f2c","expires_in":0}"#,
            "s3cr3t-value",
        );
        let e = parse_token_reply("test", &r, Duration::from_secs(60)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert_eq!(e.status, Some(200));
        assert!(
            e.detail
                .starts_with("token endpoint returned expires_in 0:"),
            "{e}"
        );
        // Echoed in expires_in itself: still scrubbed.
        let r = reply(
            200,
            "application/json",
            r#"{"access_token":"t","expires_in":"s3cr3t-value"}"#,
            "s3cr3t-value",
        );
        let e = parse_token_reply("test", &r, Duration::from_secs(60)).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-value"), "{e}");
        // Or the token of the same reply, as is or inside a JSON value.
        for expires_in in [
            r#""token-value-9f2c""#,
            r#"{"a":"token-value-9f2c"}"#,
            r#"["token-value-9f2c"]"#,
        ] {
            let r = reply(
                200,
                "application/json",
                &format!(r#"{{"access_token":"token-value-9f2c","expires_in":{expires_in}}}"#),
                "s3cr3t-value",
            );
            let e = parse_token_reply("test", &r, Duration::from_secs(60)).unwrap_err();
            assert!(e.detail.contains("expires_in"), "{e}");
            assert!(!e.to_string().contains("token-value-9f2c"), "{e}");
        }
        let r = reply(
            200,
            "application/json",
            r#"{"access_token":"t"}"#,
            "s3cr3t-value",
        );
        let t = parse_token_reply("test", &r, Duration::from_secs(60)).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));
    }
}
