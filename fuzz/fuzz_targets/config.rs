//! Configuration parsing and validation: never a panic; a parse error never
//! quotes the file (a secret or an assertion in `extra_params` may sit on
//! the line with the typo); `extra_params` values never show in `Debug`.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rekeyd::config::{Config, ConfigError};
use rekeyd_fuzz::{SECRET, assert_hidden, plant, split};

fuzz_target!(|data: &[u8]| {
    let Some((at, text)) = split(data) else {
        return;
    };
    if text.contains(SECRET) {
        return;
    }
    // The raw text, then the same text with a quoted secret planted in it.
    for text in [text.to_string(), plant(text, &format!("\"{SECRET}\""), at)] {
        match Config::from_toml(&text) {
            Ok(config) => {
                for cred in &config.credentials {
                    // Every value prints as the same marker: searching the
                    // output for a value would also find one that equals a
                    // key or the marker itself.
                    let keys_only: BTreeMap<&String, Redacted> =
                        cred.extra_params.keys().map(|k| (k, Redacted)).collect();
                    assert_eq!(
                        format!("{:?}", cred.extra_params),
                        format!("{keys_only:?}"),
                        "extra_params' Debug shows a value"
                    );
                }
                for warning in config.warnings() {
                    assert_hidden(&warning.to_string(), SECRET, "a config warning");
                }
            }
            // Validation errors may quote what the operator wrote for a
            // path or a URL; parsing must quote nothing.
            Err(e @ ConfigError::Load { .. }) => {
                assert_hidden(&e.to_string(), SECRET, "a config parse error");
            }
            Err(ConfigError::Invalid { .. }) => {}
        }
    }
});

/// How a redacted value prints.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}
