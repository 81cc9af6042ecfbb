//! Auth0: the client's one secret set through the Management API v2
//! (auth0.com/docs/api/management/v2, "Update a client"):
//! `PATCH https://{domain}/api/v2/clients/{client_id}` with
//! `{"client_secret": "…"}` replaces the secret atomically and answers the
//! client (`200`). `POST …/rotate-secret` would do the same with a
//! server-generated value, whose lost reply would lock the client out, so
//! rekeyd sets a value of its own, stored in the journal first
//! ([`super::replace`]). Auth0 says a new secret may take up to about 30
//! seconds to be accepted everywhere; logins try the old and the new value
//! until the new one is proven.
//!
//! Errors: `{"statusCode": 400, "error": "Bad Request", "message": "…",
//! "errorCode": "…"}`. The token calling the API is an administrative
//! client's (`secret_api_credential`, scope `update:client_keys`, audience
//! `https://{domain}/api/v2/`).

use reqwest::Method;
use url::Url;

use super::http::Transport;
pub use super::replace::CAPABILITIES;
use super::replace::ReplaceSecret;

/// The secret API of the client at `url` (`…/api/v2/clients/{client_id}`).
pub fn secret_api(transport: Transport, url: Url) -> ReplaceSecret {
    ReplaceSecret {
        transport,
        url,
        method: Method::PATCH,
        field: "client_secret",
        operation: "auth0 set client secret",
    }
}
