//! A secret API that replaces a client's one secret atomically with a
//! value of the caller's choice (Auth0's client update, Keycloak's client
//! update): one request that sets the value, nothing to list or delete.
//! The value was written to the journal before the request, so a lost
//! reply loses nothing: the retry sends the same value, and setting a
//! value twice is setting it once.

use futures_util::future::BoxFuture;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::http::{Transport, with_json};
use super::{
    ALPHANUMERIC, Capabilities, CreateRequest, Deleted, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, ValueOrigin, classify_secret_api,
};
use crate::token::Token;

/// Caller-chosen values; the one secret is replaced atomically, so nothing
/// is listed or deleted.
pub const CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Caller {
        alphabet: ALPHANUMERIC,
    },
    overlap: Overlap::Replace,
    retire: Retire::Replaced,
    tags: false,
    lists: false,
};

/// `method url` with the JSON body `{field: value}`, any 2xx is success.
pub struct ReplaceSecret {
    pub transport: Transport,
    pub url: Url,
    pub method: Method,
    /// The body's field that carries the secret.
    pub field: &'static str,
    /// The operation's name in errors and logs.
    pub operation: &'static str,
}

impl SecretApi for ReplaceSecret {
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
            let op = self.operation;
            let Some(value) = request.value else {
                return Err(ProviderError::transient(
                    op,
                    "no value to send (a rotation journal from another provider?)",
                ));
            };
            let mut body = serde_json::Map::new();
            body.insert(self.field.into(), value.expose_secret().into());
            let http = self
                .transport
                .http
                .inner()
                .request(self.method.clone(), self.url.clone());
            let http =
                with_json(http, &body.into()).bearer_auth(bearer.access_token.expose_secret());
            let carried: [&SecretString; 2] = [&bearer.access_token, value];
            let reply = self.transport.send(op, http, &carried).await?;
            if !(200..300).contains(&reply.status) {
                return Err(reply.refusal(op, classify_secret_api));
            }
            Ok(NewSecret {
                id: None,
                value: value.clone(),
                expires_at: None,
                registration_access_token: None,
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
