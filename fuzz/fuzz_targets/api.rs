//! The local HTTP API router with arbitrary requests: never a panic, and
//! neither the token nor the API key leaves it without the key.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use axum::body::{Body, to_bytes};
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use rekeyd::credential::channels;
use rekeyd::daemon::Registry;
use rekeyd::serve::api::{ApiState, KEY_HEADER, router};
use rekeyd::store::file::FileStore;
use rekeyd::token::Token;
use rekeyd_fuzz::{API_KEY, TOKEN, assert_hidden};
use secrecy::SecretString;
use tower::ServiceExt;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    method: &'a str,
    /// Picks a known route to mutate from, so the fuzzer reaches handlers.
    route: u8,
    suffix: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    with_key: bool,
    body: &'a [u8],
}

const ROUTES: &[&str] = &[
    "/v1/token/demo",
    "/v1/token/demo/refresh",
    "/v1/status",
    "/v1/rotate/demo",
    "/v1/history/demo",
    "/livez",
    "/readyz",
    "/readyz/demo",
    "/metrics",
    "/",
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    state: ApiState,
    // Keeps the token channel open.
    _channels: rekeyd::credential::CredentialChannels,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (channels, handle) = channels("demo", "oauth2");
        let token = Token::new(
            SecretString::from(TOKEN),
            "Bearer".to_string(),
            None,
            Duration::from_secs(86_400),
        );
        let _ = runtime.block_on(async { channels.token.send(Some(Arc::new(token))) });
        let registry = Registry::new();
        registry.replace(BTreeMap::from([("demo".to_string(), handle)]));
        let state = ApiState {
            registry: Arc::new(registry),
            key: Arc::new(SecretString::from(API_KEY)),
            // No engine runs here: a forced refresh waits this long for a
            // login that never comes, then answers `refresh_pending`.
            forced_wait: Duration::from_millis(1),
            // An empty state directory: the history route reads "no history".
            store: Arc::new(FileStore::new(
                &std::env::temp_dir().join(format!("rekeyd-fuzz-api-{}", std::process::id())),
            )),
        };
        Fixture {
            runtime,
            state,
            _channels: channels,
        }
    })
}

fuzz_target!(|input: Input| {
    let fixture = fixture();
    let route = ROUTES[input.route as usize % ROUTES.len()];
    let mut request = Request::builder()
        .method(input.method)
        .uri(format!("{route}{}", input.suffix));
    let mut keyed = false;
    for (name, value) in &input.headers {
        if value.contains(API_KEY) {
            return;
        }
        request = request.header(*name, *value);
    }
    if input.with_key {
        request = request.header(KEY_HEADER, API_KEY);
        keyed = true;
    }
    let Ok(request) = request.body(Body::from(input.body.to_vec())) else {
        return;
    };
    let response = fixture.runtime.block_on(async {
        let response = router(fixture.state.clone(), false)
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let (parts, body) = response.into_parts();
        let body = to_bytes(body, 1 << 20).await.expect("a body under 1 MiB");
        (parts, body)
    });
    let (parts, body) = response;
    let text = format!("{:?} {}", parts.headers, String::from_utf8_lossy(&body));
    assert_hidden(&text, API_KEY, "an API response");
    if !keyed {
        assert_hidden(&text, TOKEN, "an API response without the key");
    }
    assert!(parts.status.as_u16() != 500, "an internal error: {text}");
});
