//! Log output: human-readable text by default, JSON lines for log
//! collectors; level and filtering from `RUST_LOG` (default `info`).
//!
//! A JSON line is one flat object: `timestamp`, `level`, `message`, the
//! event's fields, `target`, and the fields of the spans the event happened
//! in. A span's `name` field is written under the span's own name, so every
//! line from a credential's tasks (span `credential{name=...}`) carries
//! `"credential": "<name>"`, like the daemon's own lines about a credential.
//! (tracing-subscriber's stock JSON writes such a span as
//! `{"name":"<name>","name":"credential"}`: a duplicate key that JSON readers
//! resolve to `"credential"`, losing which credential the line is about.)

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber. Logs go to stderr so that commands like
/// `rekeyd token` keep stdout for their result.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        // Colours only on a terminal (journald and `kubectl logs` would
        // store the escape codes) and not when NO_COLOR asks for none.
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .try_init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
    };
    // Already installed (tests, or the demo re-entering): keep the first.
    let _ = result;
}

/// Whether text output may be coloured: on a terminal, unless `NO_COLOR`
/// is set to a non-empty value (<https://no-color.org>: "when present and
/// not an empty string ... prevents the addition of ANSI color"). clap's
/// help output follows the same rule through anstream.
pub fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The JSON line format described in the module documentation.
struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        // Outermost span first: inner spans, then the event, win a clash.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) else {
                    continue;
                };
                for (key, value) in fields {
                    let key = if key == "name" {
                        span.name().to_string()
                    } else {
                        key
                    };
                    line.insert(key, value);
                }
            }
        }
        event.record(&mut FieldsVisitor(&mut line));
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_string()),
        );
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Collects an event's fields as JSON values.
struct FieldsVisitor<'a>(&'a mut Map<String, Value>);

impl FieldsVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for FieldsVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_color_set_and_non_empty_turns_colour_off() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "empty NO_COLOR is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(true, Some("false".into())), "any non-empty value");
        assert!(!colour(false, None), "never colour a pipe or the journal");
    }

    #[test]
    fn json_lines_name_the_credential_of_the_span() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("credential", name = %"maps");
            span.in_scope(|| {
                tracing::warn!(step = "refresh", failures = 2u32, "token refresh failed");
            });
            tracing::info!(credential = %"places", "outside any span");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["credential"], "maps", "{text}");
        assert_eq!(lines[0]["message"], "token refresh failed", "{text}");
        assert_eq!(lines[0]["level"], "WARN", "{text}");
        assert_eq!(lines[0]["step"], "refresh", "{text}");
        assert_eq!(lines[0]["failures"], 2, "{text}");
        assert!(lines[0]["timestamp"].is_string(), "{text}");
        assert_eq!(lines[1]["credential"], "places", "{text}");
        // One key per name: nothing for a JSON reader to resolve.
        assert_eq!(
            text.lines()
                .next()
                .unwrap()
                .matches("\"credential\"")
                .count(),
            1
        );
    }
}
