//! MapsIndoors secret API replies (list, create, refusals): never a panic,
//! and the bearer token the request carried never reaches an error.
//!
//! Input: one byte choosing the content type, a little-endian `u16` that is
//! the status and says where a second pass plants the token, then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekeyd::provider::NewSecret;
use rekeyd::provider::http::Reply;
use rekeyd::provider::mapsindoors::{parse_create_reply, parse_list_reply};
use rekeyd::provider::redact::Redactor;
use rekeyd_fuzz::{CONTENT_TYPES, SECRET, TOKEN, assert_hidden, plant, split};
use secrecy::SecretString;

fuzz_target!(|data: &[u8]| {
    let Some((&content_type, rest)) = data.split_first() else {
        return;
    };
    let Some((status, body)) = split(rest) else {
        return;
    };
    if body.contains(TOKEN) || body.contains(SECRET) {
        return;
    }
    let content_type = CONTENT_TYPES[content_type as usize % CONTENT_TYPES.len()];
    let bearer = SecretString::from(TOKEN);
    // The credential's client secret, known to its redactor.
    let redactor = Redactor::new([SECRET.to_string()]);
    for body in [
        body.to_string(),
        plant(body, TOKEN, status),
        plant(body, SECRET, status),
    ] {
        let reply = || {
            Reply::received(
                status as u16,
                content_type.map(str::to_string),
                body.clone().into_bytes().into(),
                &redactor,
                &[&bearer],
            )
        };
        let errors = [
            parse_list_reply("fuzz list", &reply()).err(),
            parse_create_reply("fuzz create", &reply()).err(),
        ];
        for e in errors.into_iter().flatten() {
            for shown in [e.to_string(), format!("{e:?}")] {
                assert_hidden(&shown, TOKEN, "a secret API error");
                assert_hidden(&shown, SECRET, "a secret API error");
            }
        }
        if let Ok(created) = parse_create_reply("fuzz create", &reply()) {
            // Debug must not depend on the value (searching for the value
            // would also find one that equals the id).
            let other = NewSecret {
                id: created.id.clone(),
                value: SecretString::from("fuzz-other-value"),
                expires_at: None,
                registration_access_token: None,
            };
            assert_eq!(
                format!("{created:?}"),
                format!("{other:?}"),
                "a created secret's Debug shows its value"
            );
        }
    }
});
