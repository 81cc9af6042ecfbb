//! Provider text made safe to show (I7).
//!
//! Providers echo what they are sent: a token endpoint may put the client
//! secret in `error`, `error_description` or a header, a secret API may
//! quote a bearer token or list secret values in a refusal. Every piece of
//! text a provider sends that rekeyd keeps (an error code, a message, a
//! transport error) passes through [`Redactor::scrub`] on its way into a
//! [`ProviderError`](super::ProviderError), the one boundary where provider
//! text enters rekeyd's errors; from there it reaches logs, status, the
//! API's 503 detail and nothing else (metrics carry no provider text).
//!
//! A scrubbed text holds none of the values rekeyd knows for the
//! credential, is printable ASCII only, and is at most [`MAX_TEXT_CHARS`]
//! characters long.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use secrecy::{ExposeSecret, SecretString};

/// Longest provider text kept, in characters. An error code or a sentence
/// of explanation fits; a page of HTML or an echoed request does not.
pub const MAX_TEXT_CHARS: usize = 200;

/// What replaces a known value.
pub const REDACTED: &str = "[redacted]";

/// Secrets remembered per credential: current, pending and old (S5) and
/// one spare for a value the operator installed meanwhile. Older ones have
/// been deleted at the provider, which then has nothing left to echo.
const REMEMBERED_SECRETS: usize = 4;

/// The values one credential must never show, shared by its token provider
/// and its secret API (a refusal of either may echo a value the other
/// sent). Cheap to clone.
///
/// Holds the configured `extra_params` values (they may be assertions) and
/// the last few client secrets the credential was given or read from its
/// journal besides the one in use (the engine and the rotation tell it);
/// the secret and bearer token of the request at hand are added per call
/// (see [`Redactor::scrub_with`]), so a credential that does not rotate
/// keeps no copy here, and tokens are never kept.
#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    configured: Vec<SecretString>,
    secrets: Mutex<VecDeque<SecretString>>,
}

impl Redactor {
    /// A redactor that knows `configured` from the start (values of the
    /// configuration that may be secret, e.g. `extra_params`).
    pub fn new(configured: impl IntoIterator<Item = String>) -> Self {
        Redactor {
            inner: Arc::new(Inner {
                configured: configured
                    .into_iter()
                    .filter(|v| !v.is_empty())
                    .map(SecretString::from)
                    .collect(),
                secrets: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Remembers a client secret of this credential: one the secret API
    /// created, one read from the journal.
    pub fn remember(&self, secret: &SecretString) {
        let value = secret.expose_secret();
        if value.is_empty() {
            return;
        }
        let mut secrets = self
            .inner
            .secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = secrets.iter().position(|s| s.expose_secret() == value) {
            // Most recently used last, so the oldest is dropped first.
            let known = secrets.remove(at).expect("position is in range");
            secrets.push_back(known);
            return;
        }
        if secrets.len() == REMEMBERED_SECRETS {
            secrets.pop_front();
        }
        secrets.push_back(secret.clone());
    }

    /// [`scrub`] with every value this redactor knows.
    pub fn scrub(&self, text: &str) -> String {
        self.scrub_with(text, &[])
    }

    /// [`scrub`] with every value this redactor knows and `also` (the
    /// secret, bearer token or encoded credentials of the request at hand).
    pub fn scrub_with(&self, text: &str, also: &[&str]) -> String {
        let secrets = self
            .inner
            .secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known: Vec<&str> = self
            .inner
            .configured
            .iter()
            .chain(secrets.iter())
            .map(|s| s.expose_secret())
            .chain(also.iter().copied())
            .collect();
        scrub(text, &known)
    }
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(..)")
    }
}

/// Makes provider text safe to show: every occurrence of a `known` value
/// (as is, form- or percent-encoded, as a provider echoing a request body
/// would show it, and escaped as inside a JSON string, as a body that is
/// not read as JSON or a quoted JSON value shows it) becomes [`REDACTED`]; every character that is not
/// printable ASCII becomes `?`; the result is cut to [`MAX_TEXT_CHARS`]
/// characters, marked with a trailing `...`.
///
/// The values are removed from the whole text before it is cut, so no
/// prefix of a value survives at the cut. Removing them again after the
/// characters are replaced means a value split by a control character
/// cannot reappear as a whole either. Should a value still be found in the
/// result (one that a marker and its neighbours happen to spell), the whole
/// text is withheld ([`WITHHELD`], or nothing if a value is part of that).
/// Empty values are ignored.
pub fn scrub(text: &str, known: &[&str]) -> String {
    let mut forms: Vec<String> = Vec::with_capacity(known.len() * 3);
    for value in known.iter().filter(|v| !v.is_empty()) {
        forms.push((*value).to_string());
        let form: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        let percent = form.replace('+', "%20");
        forms.extend([form, percent]);
        // RFC 8259 §7: `"` and `\` are always escaped, control characters
        // mostly; `/` may be (`\/`, as PHP and others write it).
        let quoted = serde_json::to_string(value).expect("a string serializes");
        let json = &quoted[1..quoted.len() - 1];
        if json != *value {
            forms.push(json.to_string());
        }
        if value.contains('/') {
            forms.push(json.replace('/', "\\/"));
        }
    }
    // Longest first, so a value that contains another is removed whole.
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    let remove = |mut text: String| {
        for form in &forms {
            if text.contains(form.as_str()) {
                text = text.replace(form.as_str(), REDACTED);
            }
        }
        text
    };
    let text = remove(text.to_string());
    let printable: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    let mut text = remove(printable);
    if text.len() > MAX_TEXT_CHARS {
        // ASCII only by now: byte and character counts agree.
        text.truncate(MAX_TEXT_CHARS - 3);
        text.push_str("...");
    }
    let holds_value = |t: &str| forms.iter().any(|f| t.contains(f.as_str()));
    if holds_value(&text) {
        return if holds_value(WITHHELD) {
            String::new()
        } else {
            WITHHELD.to_string()
        };
    }
    text
}

/// Longest message kept from a server rekeyd stores in (a Kubernetes API
/// server's, an etcd member's), in characters: longer than a provider's
/// [`MAX_TEXT_CHARS`], since an RBAC denial or an admission webhook's
/// reason names the account, resource and namespace an operator must fix.
pub const MAX_SERVER_MESSAGE_CHARS: usize = 1000;

/// `text` as one line of printable ASCII (every other character becomes
/// `?`) of at most `max_chars` characters, cut with a trailing `...`: a
/// server's message can then neither forge log lines nor flood them.
/// Removes no values: for messages of servers that do not receive client
/// secrets as such (a store's), after their own scrubbing.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max_chars.saturating_add(1))
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if out.len() > max_chars {
        out.truncate(max_chars.saturating_sub(3));
        out.push_str("...");
    }
    out
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), the rest
/// as is: for provider text that must stay whole to be of use, such as a
/// secret's id (it names the secret to delete), on its way into a log line
/// or a terminal, where a line break would forge a line and an escape
/// sequence would move the cursor.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Shown instead of a provider text that could not be scrubbed.
pub const WITHHELD: &str = "[provider text withheld]";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values_and_their_encodings_are_removed() {
        let secret = "s3cr3t+/value";
        let text = format!("bad {secret}; body client_secret=s3cr3t%2B%2Fvalue; again {secret}");
        let out = scrub(&text, &[secret]);
        assert_eq!(
            out,
            "bad [redacted]; body client_secret=[redacted]; again [redacted]"
        );
        let with_space = scrub("a b and a+b and a%20b", &["a b"]);
        assert_eq!(with_space, "[redacted] and [redacted] and [redacted]");
    }

    #[test]
    fn json_escaped_values_are_removed() {
        // A refusal body read as text (text/plain), or a JSON value quoted
        // in an error, shows a value escaped as inside a JSON string.
        let secret = r#"s3c/r"e\t"#;
        let text = r#"{"error":"s3c\/r\"e\\t", "e":"s3c/r\"e\\t"}"#;
        assert_eq!(
            scrub(text, &[secret]),
            r#"{"error":"[redacted]", "e":"[redacted]"}"#
        );
        assert_eq!(scrub(r#"a\/b"#, &["a/b"]), "[redacted]");
    }

    #[test]
    fn output_is_printable_ascii_and_bounded() {
        let out = scrub(&format!("ünïcode\u{7}\ttab\n{}", "x".repeat(1000)), &[]);
        assert!(out.len() <= MAX_TEXT_CHARS, "{}", out.len());
        assert!(out.starts_with("?n?code??tab?x"), "{out}");
        assert!(out.ends_with("..."));
        assert!(out.chars().all(|c| c == ' ' || c.is_ascii_graphic()));
    }

    #[test]
    fn server_messages_are_one_bounded_printable_line() {
        assert_eq!(printable("a\nb\u{1b}[31mc\u{e9}", 100), "a?b?[31mc?");
        let long = printable(&"x".repeat(5000), 1000);
        assert_eq!(long.len(), 1000);
        assert!(long.ends_with("..."));
        assert_eq!(printable(&"x".repeat(1000), 1000), "x".repeat(1000));
    }

    #[test]
    fn a_value_split_by_a_control_character_does_not_reappear() {
        // "ab\u{1}cd" becomes "ab?cd" once the control character is
        // replaced: if that is a known value, it must go too.
        assert_eq!(scrub("x ab\u{1}cd y", &["ab?cd"]), "x [redacted] y");
    }

    #[test]
    fn a_value_the_marker_would_spell_withholds_the_text() {
        // "d]d]d]" -> "[redacted]d]", which spells "d]d]" again: the
        // second pass removes it.
        assert_eq!(scrub("d]d]d]", &["d]d]"]), "[redacte[redacted]");
        // The cut's "..." completes "a...".
        assert_eq!(scrub(&"a".repeat(300), &["a..."]), WITHHELD);
        assert_eq!(scrub("no value here", &["a..."]), "no value here");
    }

    #[test]
    fn the_redactor_remembers_a_bounded_number_of_secrets() {
        let r = Redactor::new(["assertion-value".to_string(), String::new()]);
        for i in 0..6 {
            r.remember(&SecretString::from(format!("secret-{i}")));
        }
        let out = r.scrub_with(
            "assertion-value secret-0 secret-2 secret-5 bearer-x",
            &["bearer-x"],
        );
        // secret-0 and secret-1 have been forgotten (deleted at the
        // provider long ago in a real rotation).
        assert_eq!(out, "[redacted] secret-0 [redacted] [redacted] [redacted]");
        // Using a secret again keeps it.
        r.remember(&SecretString::from("secret-2".to_string()));
        for i in 6..9 {
            r.remember(&SecretString::from(format!("secret-{i}")));
        }
        assert_eq!(r.scrub("secret-2 secret-3"), "[redacted] secret-3");
        assert_eq!(format!("{r:?}"), "Redactor(..)");
    }

    proptest! {
        #[test]
        fn no_known_value_survives(
            before in ".{0,300}",
            after in ".{0,300}",
            secret in "[ -~]{4,64}",
            repeat in 1usize..4,
        ) {
            let text = format!("{before}{}{after}", secret.repeat(repeat));
            let out = scrub(&text, &[&secret]);
            prop_assert!(!out.contains(&secret), "{out:?}");
            prop_assert!(out.len() <= MAX_TEXT_CHARS);
            prop_assert!(out.chars().all(|c| c == ' ' || c.is_ascii_graphic()));
        }
    }
}
