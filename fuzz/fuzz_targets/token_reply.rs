//! Token endpoint replies (RFC 6749 §5.1 success, §5.2 error) as every
//! provider parses them: never a panic, never a secret or token in an error.
//!
//! Input: one byte choosing the content type, a little-endian `u16` that is
//! the status and says where a second pass plants the secret, then the body.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rekeyd::provider::ErrorKind;
use rekeyd::provider::http::{Reply, parse_token_reply};
use rekeyd::provider::redact::Redactor;
use rekeyd::token::Token;
use rekeyd_fuzz::{CONTENT_TYPES, SECRET, assert_hidden, plant, split};
use secrecy::SecretString;

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
    // The login request carried the secret: a reply may echo it anywhere.
    let secret = SecretString::from(SECRET);
    let redactor = Redactor::default();
    for body in [body.to_string(), plant(body, SECRET, status)] {
        let reply = Reply::received(
            status as u16,
            content_type.map(str::to_string),
            body.clone().into_bytes().into(),
            &redactor,
            &[&secret],
        );
        match parse_token_reply("fuzz login", &reply, Duration::from_secs(3600)) {
            Ok(token) => {
                let shown = format!("{token:?}");
                assert_hidden(&shown, SECRET, "a token's Debug");
                // Debug must not depend on the access token (searching for
                // the token would also find one that equals its scope).
                let other = Token {
                    access_token: SecretString::from("fuzz-other-token"),
                    ..token.clone()
                };
                assert_eq!(shown, format!("{other:?}"), "a token's Debug shows it");
            }
            Err(e) => {
                assert_hidden(&e.to_string(), SECRET, "a token reply error");
                assert_hidden(&format!("{e:?}"), SECRET, "a token reply error's Debug");
            }
        }
        let e = reply.refusal("fuzz login", |_, _, _| ErrorKind::Rejected);
        assert_hidden(&e.to_string(), SECRET, "a refusal");
        assert_hidden(&format!("{e:?}"), SECRET, "a refusal's Debug");
    }
});
