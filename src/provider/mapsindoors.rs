//! MapsIndoors (an IdentityServer deployment).
//!
//! Quirk: a wrong client secret is `400 {"error":"invalid_client"}`, not 401,
//! so the status alone cannot tell a bad secret from a bad request.
//!
//! The secret API's refusals are read for an error code and message in
//! whichever common shape they come (see `Reply::refusal`) and classified
//! by [`classify_secret_api`]: a 4xx that will answer the same on retry
//! (the client already has its maximum number of secrets, a wrong
//! customer, a missing permission) needs an operator.

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

pub use super::classify_secret_api;
use super::http::{self, Reply, Transport};
use super::{
    Capabilities, CreateRequest, Deleted, ErrorKind, NewSecret, ProviderError, RemoteSecret,
    SecretApi, TokenProvider,
};
use crate::config::CredentialConfig;
use crate::token::Token;

pub struct MapsIndoors {
    transport: Transport,
    token_url: Url,
    client_id: String,
    scope: Option<String>,
}

impl MapsIndoors {
    pub fn new(transport: Transport, cred: &CredentialConfig) -> Self {
        MapsIndoors {
            transport,
            token_url: cred.endpoints.token_url.clone(),
            client_id: cred.client_id.clone(),
            scope: cred.scope.clone(),
        }
    }
}

/// How a failed token request is treated.
fn classify(status: u16, code: Option<&str>, _retry_after: bool) -> ErrorKind {
    match (status, code) {
        (400 | 401, Some("invalid_client")) | (401, None) => ErrorKind::Rejected,
        (429, _) => ErrorKind::Quota,
        (408, _) => ErrorKind::Transient,
        (400..=499, _) => ErrorKind::Refused,
        _ => ErrorKind::Transient,
    }
}

impl TokenProvider for MapsIndoors {
    fn login<'a>(
        &'a self,
        secret: &'a SecretString,
    ) -> BoxFuture<'a, Result<Token, ProviderError>> {
        Box::pin(async move {
            http::form_login(
                &self.transport,
                "mapsindoors login",
                &self.token_url,
                &self.client_id,
                self.scope.as_deref(),
                secret,
                classify,
            )
            .await
        })
    }

    fn remember(&self, secret: &SecretString) {
        self.transport.redactor.remember(secret);
    }
}

/// The client-credentials API (`/api/clientcredentials`): list, create and
/// delete secrets of the customer, with a bearer token from `/connect/token`.
/// The list may include other clients' secrets; rotation filters by tag.
pub struct MapsIndoorsSecrets {
    transport: Transport,
    url: Url,
    customer_id: String,
}

impl MapsIndoorsSecrets {
    pub fn new(transport: Transport, url: Url, customer_id: String) -> Self {
        MapsIndoorsSecrets {
            transport,
            url,
            customer_id,
        }
    }

    fn http(&self) -> &reqwest::Client {
        self.transport.http.inner()
    }

    fn url_with(&self, params: &[(&str, &str)]) -> Url {
        let mut url = self.url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("customerId", &self.customer_id);
            for (k, v) in params {
                query.append_pair(k, v);
            }
        }
        url
    }

    async fn call(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
        bearer: &Token,
    ) -> Result<Reply, ProviderError> {
        let request = request.bearer_auth(bearer.access_token.expose_secret());
        self.transport
            .send(operation, request, &[&bearer.access_token])
            .await
    }
}

fn secret_api_error(operation: &'static str, reply: &Reply) -> ProviderError {
    reply.refusal(operation, classify_secret_api)
}

/// Reads a reply to `GET .../secrets`: a JSON list of `{id, description,
/// client_id, createdAt}` on 2xx, else the provider's refusal.
pub fn parse_list_reply(
    operation: &'static str,
    reply: &Reply,
) -> Result<Vec<RemoteSecret>, ProviderError> {
    #[derive(Deserialize)]
    struct Item {
        id: String,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default, rename = "createdAt")]
        created_at: Option<String>,
    }
    if !(200..300).contains(&reply.status) {
        return Err(secret_api_error(operation, reply));
    }
    let items: Vec<Item> = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected a JSON list of secrets"))?;
    Ok(items
        .into_iter()
        .map(|i| RemoteSecret {
            id: i.id,
            description: i.description.unwrap_or_default(),
            client_id: i.client_id,
            // An unreadable time is as good as none: it only delays
            // sweeping an orphan (S7), never licenses a delete.
            created_at: i
                .created_at
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(std::time::SystemTime::from),
            expires_at: None,
        })
        .collect())
}

/// Reads a reply to `POST .../secrets`: `{id, secret}` on 2xx (both
/// non-empty), else the provider's refusal.
pub fn parse_create_reply(
    operation: &'static str,
    reply: &Reply,
) -> Result<NewSecret, ProviderError> {
    #[derive(Deserialize)]
    struct Created {
        id: String,
        secret: String,
    }
    if !(200..300).contains(&reply.status) {
        return Err(secret_api_error(operation, reply));
    }
    let created: Created = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected {id, secret} JSON"))?;
    if created.secret.is_empty() || created.id.is_empty() {
        return Err(reply.unexpected(operation, "empty id or secret"));
    }
    Ok(NewSecret {
        id: Some(created.id),
        value: SecretString::from(created.secret),
        expires_at: None,
        registration_access_token: None,
    })
}

impl SecretApi for MapsIndoorsSecrets {
    /// Server-generated values, tagged by `description`, any number of
    /// secrets per client, deleted in one call.
    fn capabilities(&self) -> Capabilities {
        Capabilities::SERVER_TAGGED
    }

    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "mapsindoors list secrets";
            let request = self.http().get(self.url_with(&[]));
            let reply = self.call(OP, request, bearer).await?;
            parse_list_reply(OP, &reply)
        })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "mapsindoors create secret";
            let request = self
                .http()
                .post(self.url_with(&[("description", request.description)]));
            let reply = self.call(OP, request, bearer).await?;
            let created = parse_create_reply(OP, &reply)?;
            self.transport.redactor.remember(&created.value);
            Ok(created)
        })
    }

    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "mapsindoors delete secret";
            let request = self.http().delete(self.url_with(&[("id", id)]));
            let reply = self.call(OP, request, bearer).await?;
            match reply.status {
                200..=299 => Ok(Deleted::Deleted),
                404 => Ok(Deleted::NotFound),
                _ => Err(secret_api_error(OP, &reply)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_secret_is_400_invalid_client() {
        assert_eq!(
            classify(400, Some("invalid_client"), false),
            ErrorKind::Rejected
        );
        assert_eq!(
            classify(400, Some("invalid_scope"), false),
            ErrorKind::Refused
        );
        assert_eq!(classify(503, None, false), ErrorKind::Transient);
        assert_eq!(classify(429, None, false), ErrorKind::Quota);
    }

    #[test]
    fn secret_api_refusals_that_stay_need_an_operator() {
        for status in [400, 403, 404, 409, 410, 422] {
            assert_eq!(
                classify_secret_api(status, Some("too_many_secrets"), false),
                ErrorKind::Refused,
                "{status}"
            );
        }
        assert_eq!(classify_secret_api(401, None, false), ErrorKind::Rejected);
        assert_eq!(classify_secret_api(429, None, false), ErrorKind::Quota);
        assert_eq!(classify_secret_api(409, None, true), ErrorKind::Quota);
        for status in [408, 425, 500, 502, 503] {
            assert_eq!(
                classify_secret_api(status, None, false),
                ErrorKind::Transient
            );
        }
    }
}
