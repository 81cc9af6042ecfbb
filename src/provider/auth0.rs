//! Auth0: the client's one secret set through the Management API v2
//! (auth0.com/docs/api/management/v2, "Update a client"):
//! `PATCH https://{domain}/api/v2/clients/{client_id}` with
//! `{"client_secret": "…"}` replaces the secret atomically and answers the
//! client (`200`). `POST …/rotate-secret` would do the same with a
//! server-generated value, whose lost reply would lock the client out, so
//! rekeyd sets a value of its own, stored in the journal first: a retry
//! sends the same value. Auth0 says a new secret may take up to about 30
//! seconds to be accepted everywhere; logins try the old and the new value
//! until the new one is proven.
//!
//! Errors: `{"statusCode": 400, "error": "Bad Request", "message": "…",
//! "errorCode": "…"}`. The token calling the API is an administrative
//! client's (`secret_api_credential`, scope `update:client_keys`, audience
//! `https://{domain}/api/v2/`).

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::http::{Transport, with_json};
use super::{
    ALPHANUMERIC, Capabilities, CreateRequest, Deleted, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, ValueOrigin, classify_secret_api,
};
use crate::token::Token;

/// Caller-chosen values; the one secret is replaced atomically, so
/// nothing is listed or deleted.
pub const CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Caller {
        alphabet: ALPHANUMERIC,
    },
    overlap: Overlap::Replace,
    retire: Retire::Replaced,
    tags: false,
    lists: false,
};

pub struct Auth0Secret {
    transport: Transport,
    /// `https://{domain}/api/v2/clients/{client_id}`.
    url: Url,
}

impl Auth0Secret {
    pub fn new(transport: Transport, url: Url) -> Self {
        Auth0Secret { transport, url }
    }
}

impl SecretApi for Auth0Secret {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        _bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "auth0 set client secret";
            let Some(value) = request.value else {
                return Err(ProviderError::transient(
                    OP,
                    "no value to send (a rotation journal from another provider?)",
                ));
            };
            let body = serde_json::json!({ "client_secret": value.expose_secret() });
            let http = with_json(self.transport.http.inner().patch(self.url.clone()), &body)
                .bearer_auth(bearer.access_token.expose_secret());
            let carried: [&SecretString; 2] = [&bearer.access_token, value];
            let reply = self.transport.send(OP, http, &carried).await?;
            if !(200..300).contains(&reply.status) {
                return Err(reply.refusal(OP, classify_secret_api));
            }
            Ok(NewSecret {
                id: None,
                value: value.clone(),
            })
        })
    }

    fn delete<'a>(
        &'a self,
        _bearer: &'a Token,
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        // Never asked: a replaced secret leaves nothing to delete.
        Box::pin(async { Ok(Deleted::NotFound) })
    }
}
