//! Token endpoint replies (RFC 6749 §5.1 success, §5.2 error) as every
//! provider parses them: never a panic, never a secret or token in an error.
//!
//! Input: a status byte pair (little-endian `u16`), one byte choosing the
//! content type, then the body with a planted secret somewhere in a second
//! pass.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekeyd::provider::ErrorKind;
use rekeyd::provider::http::{Reply, error_reply, parse_oauth_error, parse_token_reply};
use rekeyd_fuzz::{SECRET, assert_hidden, plant, split};
use secrecy::SecretString;

const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("text/html"),
    Some("text/plain"),
    None,
];

fuzz_target!(|data: &[u8]| {
    let Some((&content_type, rest)) = data.split_first() else {
        return;
    };
    let Some((status, body)) = split(rest) else {
        return;
    };
    if body.contains(SECRET) {
        return;
    }
    let content_type = CONTENT_TYPES[content_type as usize % CONTENT_TYPES.len()];
    let secret = SecretString::from(SECRET);
    for body in [body.to_string(), plant(body, SECRET, status)] {
        let reply = Reply {
            status: status as u16,
            content_type: content_type.map(str::to_string),
            retry_after: None,
            body: body.clone().into_bytes().into(),
        };
        match parse_token_reply("fuzz login", &reply) {
            Ok(token) => {
                let shown = format!("{token:?}");
                assert_hidden(&shown, SECRET, "a token's Debug");
                let served = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("access_token")?.as_str().map(str::to_string));
                if let Some(t) = served.filter(|t| t.len() >= 8) {
                    assert_hidden(&shown, &t, "a token's Debug");
                }
            }
            Err(e) => {
                assert_hidden(&e.to_string(), SECRET, "a token reply error");
                assert_hidden(&format!("{e:?}"), SECRET, "a token reply error's Debug");
            }
        }
        let oauth = parse_oauth_error(&reply.body, &secret);
        let e = error_reply("fuzz login", &reply, ErrorKind::Rejected, oauth);
        assert_hidden(&e.to_string(), SECRET, "an error reply");
        assert_hidden(&format!("{e:?}"), SECRET, "an error reply's Debug");
    }
});
