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
//! - `template`: an operator's template (MiniJinja, Jinja2 syntax) given
//!   `token`, `token_type`, `expires_at` and `expires_at_unix`.

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
    /// The template failed while rendering (its syntax and variables were
    /// checked when the configuration was loaded).
    #[error("template {path}: {reason}")]
    Template { path: String, reason: String },
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
        SinkFormat::Template(template) => template.render(token)?.into_bytes(),
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

/// A template file for `format = "template"`, checked when loaded: its
/// syntax, and that it uses no variable but `token`, `token_type`,
/// `expires_at` and `expires_at_unix` (a misspelt variable is an error, not
/// an empty string in the application's configuration).
///
/// The syntax is MiniJinja's (Jinja2): `{{ token }}`, filters such as
/// `{{ token | tojson }}` for a JSON file, `{% if %}` blocks. Nothing is
/// escaped unless the template says so; the trailing newline is kept.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenTemplate {
    path: PathBuf,
    source: Arc<str>,
}

impl std::fmt::Debug for TokenTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTemplate")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TokenTemplate {
    /// Reads and checks the template at `path`. The error says what is wrong
    /// (MiniJinja's message and line), for a configuration error.
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

    /// Checks `source` (as read from `path`) by rendering it once with
    /// sample values.
    pub fn parse(path: &Path, source: String) -> Result<TokenTemplate, String> {
        let template = TokenTemplate {
            path: path.to_path_buf(),
            source: source.into(),
        };
        let sample = TokenView {
            access_token: "sample-token",
            token_type: "Bearer",
            expires_at: SystemTime::UNIX_EPOCH,
        };
        // The sample is no secret: MiniJinja's own message may be shown.
        template
            .render_with(sample, |e| e.to_string())
            .map(|_| template)
    }

    /// The template file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn render(&self, token: TokenView<'_>) -> Result<String, RenderError> {
        // With a real token, only the kind of failure and its line: a
        // message may quote a value.
        self.render_with(token, |e| match e.line() {
            Some(line) => format!("{} at line {line}", e.kind()),
            None => e.kind().to_string(),
        })
        .map_err(|reason| RenderError::Template {
            path: self.path.display().to_string(),
            reason,
        })
    }

    fn render_with(
        &self,
        token: TokenView<'_>,
        describe: impl Fn(&minijinja::Error) -> String,
    ) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        // A misspelt variable fails instead of rendering as nothing.
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        // A configuration file usually ends in a newline; Jinja2 would drop it.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .keep_trailing_newline(true)
                .build()
                .expect("default delimiters"),
        );
        // Nothing is escaped by file name: the template decides.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        let unix = token
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ctx = minijinja::context! {
            token => token.access_token,
            token_type => token.token_type,
            expires_at => rfc3339(token.expires_at),
            expires_at_unix => unix,
        };
        env.render_str(&self.source, ctx).map_err(|e| describe(&e))
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
            "[auth]\ntoken = {{ token | tojson }}\ntype = \"{{ token_type }}\"\nexpires = {{ expires_at }} ({{ expires_at_unix }})\n",
        )
        .unwrap();
        assert_eq!(
            text(&SinkFormat::Template(t)),
            format!(
                "[auth]\ntoken = \"{TOKEN}\"\ntype = \"Bearer\"\nexpires = 2026-01-02T03:04:05Z (1767323045)\n"
            )
        );
        // No escaping by file name, no newline dropped or added.
        let t = TokenTemplate::parse(Path::new("/x.html"), "<{{ token }}>".into()).unwrap();
        assert_eq!(text(&SinkFormat::Template(t)), format!("<{TOKEN}>"));
    }

    #[test]
    fn template_errors_are_found_at_load() {
        let unknown = template("{{ tokne }}").unwrap_err();
        assert!(unknown.contains("undefined"), "{unknown}");
        let syntax = template("{{ token ").unwrap_err();
        assert!(syntax.contains("syntax error"), "{syntax}");
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
    fn template_render_errors_do_not_quote_the_token() {
        // Passes the check (the sample is no number) only when the filter
        // is lenient; force a runtime failure with the real token instead.
        let t = template("{% if token == 'sample-token' %}ok{% else %}{{ token + 1 }}{% endif %}")
            .unwrap();
        let err = render(view(), &SinkFormat::Template(t)).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("/etc/app/app.conf.tmpl"), "{shown}");
        assert!(shown.contains("line 1"), "{shown}");
        assert!(!shown.contains(TOKEN), "{shown}");
    }
}
