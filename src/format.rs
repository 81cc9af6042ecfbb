//! What a token looks like where an application reads it: the pure
//! renderers of the sink formats (`format` of `[[credentials.sinks]]`) and
//! of `rekeyd token NAME --format FORMAT`. No I/O: the bytes are decided
//! here and written by [`crate::serve::sink`] or printed by the command.
//!
//! Formats:
//! - `raw`: the bare token, no trailing newline.
//! - `json`: `{"access_token","token_type","expires_at"}` and a newline.
//! - `header`: `Authorization: Bearer <token>` and a newline.
//! - `env`: `VAR=<token>` and a newline, for systemd `EnvironmentFile=` and
//!   docker `--env-file`.
//! - `exec-credential`: the Kubernetes client-go credential plugin reply
//!   (`client.authentication.k8s.io/v1` `ExecCredential`) and a newline.
//! - `template`: an operator's file with placeholders (`{{ token }}`,
//!   `{{ token_type }}`, `{{ expires_at }}`, `{{ expires_at_unix }}`, each
//!   optionally `| tojson`), see [`TokenTemplate`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

/// The `apiVersion` of the ExecCredential that `exec-credential` writes
/// (client-go's `client.authentication.k8s.io/v1`, Kubernetes 1.22+).
pub const EXEC_CREDENTIAL_API_VERSION: &str = "client.authentication.k8s.io/v1";

/// How a token is written for its readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkFormat {
    /// The bare token, no trailing newline.
    Raw,
    /// `{"access_token","token_type","expires_at"}` and a newline.
    Json,
    /// `Authorization: Bearer <token>` and a newline.
    Header,
    /// `<variable>=<token>` and a newline.
    Env {
        /// A shell-style name, `[A-Za-z_][A-Za-z0-9_]*`.
        variable: String,
    },
    /// A client-go `ExecCredential` (JSON) and a newline.
    ExecCredential,
    /// An operator's template.
    Template(TokenTemplate),
}

impl SinkFormat {
    /// The name the configuration and the command line use.
    pub fn as_str(&self) -> &'static str {
        match self {
            SinkFormat::Raw => "raw",
            SinkFormat::Json => "json",
            SinkFormat::Header => "header",
            SinkFormat::Env { .. } => "env",
            SinkFormat::ExecCredential => "exec-credential",
            SinkFormat::Template(_) => "template",
        }
    }
}

/// The format names, for messages.
pub const FORMAT_NAMES: &str = "raw, json, header, env, exec-credential or template";

/// The variable `env` writes when none is configured: `REKEYD_<NAME>_TOKEN`,
/// the credential's name in upper case with `-` as `_` (names are
/// `[a-z0-9-]`, so the result is always a valid variable name).
pub fn default_env_variable(credential: &str) -> String {
    let name: String = credential
        .chars()
        .map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("REKEYD_{name}_TOKEN")
}

/// Whether `name` can be an environment variable in both systemd's
/// `EnvironmentFile=` and docker's `--env-file`: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_variable(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The token as the renderers see it.
#[derive(Clone, Copy)]
pub struct TokenView<'a> {
    pub access_token: &'a str,
    /// As the provider sent it (`Bearer`, ...).
    pub token_type: &'a str,
    /// Wall-clock expiry; rendered in RFC 3339, whole seconds, UTC.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for TokenView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenView")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why a token cannot be rendered. Never holds the token (I7).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// `env`: docker's `--env-file` takes the rest of the line as it is and
    /// systemd's `EnvironmentFile=` strips quotes and backslashes, so only
    /// a value both read the same is written: RFC 6750 §2.1 `b64token`.
    #[error(
        "the token has characters outside RFC 6750's b64token syntax, which an env file cannot carry unquoted"
    )]
    NotEnvSafe,
}

/// The bytes of `token` in `format`.
pub fn render(token: TokenView<'_>, format: &SinkFormat) -> Result<Vec<u8>, RenderError> {
    let value = token.access_token;
    let expires_at = rfc3339(token.expires_at);
    Ok(match format {
        SinkFormat::Raw => value.as_bytes().to_vec(),
        SinkFormat::Header => format!("Authorization: Bearer {value}\n").into_bytes(),
        SinkFormat::Json => {
            let doc = serde_json::json!({
                "access_token": value,
                "token_type": token.token_type,
                "expires_at": expires_at,
            });
            json_line(&doc)
        }
        SinkFormat::Env { variable } => {
            if !is_b64token(value) {
                return Err(RenderError::NotEnvSafe);
            }
            format!("{variable}={value}\n").into_bytes()
        }
        SinkFormat::ExecCredential => json_line(&ExecCredential {
            api_version: EXEC_CREDENTIAL_API_VERSION,
            kind: "ExecCredential",
            status: ExecCredentialStatus {
                token: value,
                expiration_timestamp: &expires_at,
            },
        }),
        SinkFormat::Template(template) => template.render(token).into_bytes(),
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn json_line(doc: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(doc).expect("json serializes");
    bytes.push(b'\n');
    bytes
}

/// RFC 6750 §2.1: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(value: &str) -> bool {
    let body = value.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// client-go's `ExecCredential` (k8s.io/client-go/pkg/apis/clientauthentication/v1):
/// `status.token` and `status.expirationTimestamp` (a `metav1.Time`, RFC
/// 3339). Without `spec`, which the plugin reads from
/// `KUBERNETES_EXEC_INFO` and need not echo.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecCredential<'a> {
    api_version: &'static str,
    kind: &'static str,
    status: ExecCredentialStatus<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecCredentialStatus<'a> {
    token: &'a str,
    expiration_timestamp: &'a str,
}

/// Largest template file rekeyd reads: a configuration file, not a data set.
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// A template file for `format = "template"`: the file as written, with
/// placeholders replaced. Parsed when loaded, so a mistake is a
/// configuration error, never a half-written file at run time.
///
/// Placeholders (rekeyd's own syntax, shaped like Jinja2's so that the
/// common cases read the same):
/// - `{{ token }}`: the access token;
/// - `{{ token_type }}`: as the provider sent it (`Bearer`, ...);
/// - `{{ expires_at }}`: RFC 3339, whole seconds, UTC;
/// - `{{ expires_at_unix }}`: seconds since the Unix epoch;
/// - `{{ NAME | tojson }}`: the value as a JSON string (or number), quotes
///   and escapes included, for JSON files;
/// - `{{ "text" }}`: `text` as it is (to write a literal `{{`).
///
/// Spaces inside the braces are optional. Everything else is copied byte
/// for byte: nothing is escaped unless the template asks, and a trailing
/// newline stays. A template crate would do more, but the one that fitted
/// (MiniJinja) added 0.6 MiB to the binary and 0.4 MiB to the idle daemon's
/// resident memory, for a file that needs four values.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenTemplate {
    path: PathBuf,
    parts: Arc<[Part]>,
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Value { value: Value, json: bool },
}

/// The values a placeholder may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Token,
    TokenType,
    ExpiresAt,
    ExpiresAtUnix,
}

/// The names placeholders may use, for messages.
const VALUE_NAMES: &str = "token, token_type, expires_at, expires_at_unix";

impl std::fmt::Debug for TokenTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTemplate")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenTemplate {
    /// Reads and parses the template at `path`. The error says what is
    /// wrong and on which line, for a configuration error.
    pub fn load(path: &Path) -> Result<TokenTemplate, String> {
        use std::io::Read;
        // A regular file of bounded size: `/dev/zero` or a log file named
        // by mistake must not hang or exhaust the configuration load.
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read it: {e}"))?;
        if !meta.is_file() {
            return Err("is not a regular file".into());
        }
        let mut source = String::new();
        file.take(MAX_TEMPLATE_BYTES + 1)
            .read_to_string(&mut source)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if source.len() as u64 > MAX_TEMPLATE_BYTES {
            return Err(format!("is larger than {MAX_TEMPLATE_BYTES} bytes"));
        }
        TokenTemplate::parse(path, source)
    }

    /// Parses `source` (as read from `path`). Errors name the line and
    /// quote nothing but a placeholder's name when it reads like one: the
    /// file may hold other secrets of the application.
    pub fn parse(path: &Path, source: String) -> Result<TokenTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = source.as_str();
        let line_of = |at: &str| source[..source.len() - at.len()].matches('\n').count() + 1;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let inner_and_after = &rest[open + 2..];
            let line = line_of(&rest[open..]);
            let Some(close) = inner_and_after.find("}}") else {
                return Err(format!("line {line}: `{{{{` without a closing `}}}}`"));
            };
            parts.push(placeholder(inner_and_after[..close].trim(), line)?);
            rest = &inner_and_after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(TokenTemplate {
            path: path.to_path_buf(),
            parts: parts.into(),
        })
    }

    /// The template file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn render(&self, token: TokenView<'_>) -> String {
        let unix = token
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = String::new();
        for part in self.parts.iter() {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Value { value, json } => {
                    let text = match value {
                        Value::Token => token.access_token.to_string(),
                        Value::TokenType => token.token_type.to_string(),
                        Value::ExpiresAt => rfc3339(token.expires_at),
                        Value::ExpiresAtUnix => {
                            // A number, also in JSON.
                            out.push_str(&unix.to_string());
                            continue;
                        }
                    };
                    if *json {
                        out.push_str(&serde_json::Value::String(text).to_string());
                    } else {
                        out.push_str(&text);
                    }
                }
            }
        }
        out
    }
}

/// One placeholder's inside (trimmed), on `line`.
fn placeholder(inner: &str, line: usize) -> Result<Part, String> {
    if let Some(literal) = inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Ok(Part::Text(literal.to_string()));
    }
    let (name, filter) = match inner.split_once('|') {
        Some((name, filter)) => (name.trim(), Some(filter.trim())),
        None => (inner, None),
    };
    let value = match name {
        "token" => Value::Token,
        "token_type" => Value::TokenType,
        "expires_at" => Value::ExpiresAt,
        "expires_at_unix" => Value::ExpiresAtUnix,
        _ => {
            return Err(format!(
                "line {line}: undefined value{}; placeholders may use {VALUE_NAMES}",
                shown_name(name)
            ));
        }
    };
    let json = match filter {
        None => false,
        Some("tojson") => true,
        Some(other) => {
            return Err(format!(
                "line {line}: unknown filter{}; the one filter is tojson",
                shown_name(other)
            ));
        }
    };
    Ok(Part::Value { value, json })
}

/// ` `name`` when `name` reads like a placeholder's name, else nothing: a
/// template may hold another secret of the application, written where a
/// name was expected.
fn shown_name(name: &str) -> String {
    let reads_like_a_name = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    if reads_like_a_name {
        format!(" `{name}`")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_";

    fn view() -> TokenView<'static> {
        TokenView {
            access_token: TOKEN,
            token_type: "Bearer",
            // 2026-01-02T03:04:05Z
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045),
        }
    }

    fn text(format: &SinkFormat) -> String {
        String::from_utf8(render(view(), format).unwrap()).unwrap()
    }

    #[test]
    fn raw_json_and_header_bytes() {
        assert_eq!(text(&SinkFormat::Raw), TOKEN);
        assert_eq!(
            text(&SinkFormat::Json),
            format!(
                "{{\"access_token\":\"{TOKEN}\",\"expires_at\":\"2026-01-02T03:04:05Z\",\"token_type\":\"Bearer\"}}\n"
            )
        );
        assert_eq!(
            text(&SinkFormat::Header),
            format!("Authorization: Bearer {TOKEN}\n")
        );
    }

    #[test]
    fn env_bytes_and_variable_names() {
        let env = SinkFormat::Env {
            variable: default_env_variable("maps-eu2"),
        };
        assert_eq!(text(&env), format!("REKEYD_MAPS_EU2_TOKEN={TOKEN}\n"));
        let padded = TokenView {
            access_token: "abc+/~.-_==",
            ..view()
        };
        assert_eq!(
            render(padded, &env).unwrap(),
            b"REKEYD_MAPS_EU2_TOKEN=abc+/~.-_==\n"
        );
        for unsafe_token in [
            "a=b", "a b", "a\"b", "a'b", "a\\b", "a$b", "a\nb", "", "=", "a#b",
        ] {
            let token = TokenView {
                access_token: unsafe_token,
                ..view()
            };
            let err = render(token, &env).unwrap_err();
            assert_eq!(err, RenderError::NotEnvSafe, "{unsafe_token:?}");
        }
        for good in ["A", "_", "APP_TOKEN", "token_2"] {
            assert!(is_env_variable(good), "{good}");
        }
        for bad in ["", "2X", "A-B", "A B", "Ä"] {
            assert!(!is_env_variable(bad), "{bad}");
        }
    }

    #[test]
    fn exec_credential_bytes_match_client_go_v1() {
        let out = text(&SinkFormat::ExecCredential);
        assert_eq!(
            out,
            format!(
                "{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{TOKEN}\",\"expirationTimestamp\":\"2026-01-02T03:04:05Z\"}}}}\n"
            )
        );
        // client-go's field names and types (ExecCredentialStatus), and no
        // field it does not know.
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let status = doc["status"].as_object().unwrap();
        assert_eq!(status.len(), 2);
        assert!(humantime::parse_rfc3339(status["expirationTimestamp"].as_str().unwrap()).is_ok());
    }

    fn template(source: &str) -> Result<TokenTemplate, String> {
        TokenTemplate::parse(Path::new("/etc/app/app.conf.tmpl"), source.to_string())
    }

    #[test]
    fn template_bytes() {
        let t = template(
            "[auth]\ntoken = {{ token | tojson }}\ntype = \"{{token_type}}\"\nexpires = {{ expires_at }} ({{ expires_at_unix }})\nraw = {{ \"{{\" }} }}\n",
        )
        .unwrap();
        assert_eq!(
            text(&SinkFormat::Template(t)),
            format!(
                "[auth]\ntoken = \"{TOKEN}\"\ntype = \"Bearer\"\nexpires = 2026-01-02T03:04:05Z (1767323045)\nraw = {{{{ }}}}\n"
            )
        );
        // No escaping by file name, no newline dropped or added; a number
        // stays a number in JSON.
        let t = TokenTemplate::parse(Path::new("/x.html"), "<{{ token }}>".into()).unwrap();
        assert_eq!(text(&SinkFormat::Template(t)), format!("<{TOKEN}>"));
        let t = template("{\"exp\": {{ expires_at_unix | tojson }}}").unwrap();
        assert_eq!(text(&SinkFormat::Template(t)), "{\"exp\": 1767323045}");
        // tojson escapes what JSON must.
        let t = template("{{ token_type | tojson }}").unwrap();
        let odd = TokenView {
            token_type: "a\"b\\c",
            ..view()
        };
        assert_eq!(
            String::from_utf8(render(odd, &SinkFormat::Template(t)).unwrap()).unwrap(),
            r#""a\"b\\c""#
        );
    }

    #[test]
    fn template_errors_are_found_at_load() {
        let unknown = template("a\n{{ tokne }}").unwrap_err();
        assert_eq!(
            unknown,
            "line 2: undefined value `tokne`; placeholders may use token, token_type, expires_at, expires_at_unix"
        );
        let filter = template("{{ token | upper }}").unwrap_err();
        assert!(filter.contains("unknown filter `upper`"), "{filter}");
        let unclosed = template("x\ny\n{{ token ").unwrap_err();
        assert!(unclosed.starts_with("line 3: `{{` without"), "{unclosed}");
        let block = template("{% if token %}x{% endif %}{{ if }}").unwrap_err();
        assert!(block.contains("undefined value `if`"), "{block}");
        let missing = TokenTemplate::load(Path::new("/nonexistent/rekeyd.tmpl")).unwrap_err();
        assert!(missing.contains("cannot read it"), "{missing}");
        let device = TokenTemplate::load(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(device, "is not a regular file");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.tmpl");
        std::fs::write(&big, vec![b'x'; MAX_TEMPLATE_BYTES as usize + 1]).unwrap();
        let too_big = TokenTemplate::load(&big).unwrap_err();
        assert!(too_big.contains("larger than"), "{too_big}");
    }

    #[test]
    fn template_errors_quote_no_secret_written_as_a_name() {
        // An application secret pasted where a name goes is not repeated.
        let err = template("{{ Sup3r-S3cret.value }}").unwrap_err();
        assert_eq!(
            err,
            "line 1: undefined value; placeholders may use token, token_type, expires_at, expires_at_unix"
        );
        let err = template("{{ token | S3cret }}").unwrap_err();
        assert!(!err.contains("S3cret"), "{err}");
    }
}
