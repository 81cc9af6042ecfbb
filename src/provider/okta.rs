//! Okta: an OAuth app's client secrets through the Management API
//! ("Application Client Auth Credentials", developer.okta.com):
//!
//! - `GET    {org}/api/v1/apps/{appId}/credentials/secrets` lists them:
//!   `[{id, status, created, lastUpdated, secret_hash, ...}]` (values
//!   only as undisclosed hashes);
//! - `POST   …/secrets` creates one, `{"client_secret": "…"}` for a value
//!   of the caller's choice, answering `{id, status, client_secret, …}`;
//! - `POST   …/secrets/{secretId}/lifecycle/deactivate` deactivates;
//! - `DELETE …/secrets/{secretId}` deletes an inactive secret (204).
//!
//! An app holds at most two secrets. Errors are
//! `{"errorCode": "E0000…", "errorSummary": "…", "errorCauses": […]}`.
//! The API is called with the token of an administrative client
//! (`secret_api_credential`, scope `okta.apps.manage`).

use futures_util::future::BoxFuture;
use secrecy::ExposeSecret;
use serde::Deserialize;
use url::Url;

use super::http::{Reply, Transport};
use super::okta_api::{ClientAuthCredentials, accepted, created_at};
use super::{
    ALPHANUMERIC, Capabilities, CreateRequest, Deleted, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, ValueOrigin,
};
use crate::token::Token;

/// Okta documents at most two client secrets per app.
pub const MAX_SECRETS: u32 = 2;

/// Caller-chosen values (the create body's `client_secret`), two secrets
/// at most, deactivated before they can be deleted, listed without tags.
pub const CAPABILITIES: Capabilities = Capabilities {
    value: ValueOrigin::Caller {
        alphabet: ALPHANUMERIC,
    },
    overlap: Overlap::Many {
        max: Some(MAX_SECRETS),
    },
    retire: Retire::DeactivateThenDelete,
    tags: false,
    lists: true,
};

pub struct OktaSecrets {
    /// `…/api/v1/apps/{appId}/credentials/secrets`.
    api: ClientAuthCredentials,
    /// The app's OAuth client id: every listed secret is this client's.
    client_id: String,
}

impl OktaSecrets {
    pub fn new(transport: Transport, url: Url, client_id: String) -> Self {
        OktaSecrets {
            api: ClientAuthCredentials::new(transport, url),
            client_id,
        }
    }
}

/// Reads a list reply: a JSON array of secrets with `id` and `created`.
pub fn parse_list_reply(
    operation: &'static str,
    reply: &Reply,
    client_id: &str,
) -> Result<Vec<RemoteSecret>, ProviderError> {
    #[derive(Deserialize)]
    struct Item {
        id: String,
        #[serde(default)]
        created: Option<String>,
    }
    accepted(operation, reply)?;
    let items: Vec<Item> = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected a JSON list of secrets"))?;
    Ok(items
        .into_iter()
        .filter(|i| !i.id.is_empty())
        .map(|i| RemoteSecret {
            id: i.id,
            // Okta secrets carry no description: nothing is ever found
            // by a tag, so nothing is swept by one either (I4).
            description: String::new(),
            client_id: Some(client_id.to_string()),
            created_at: created_at(i.created.as_deref()),
            expires_at: None,
        })
        .collect())
}

/// Reads a create reply: `{id, …}` on 2xx.
pub fn parse_create_reply(operation: &'static str, reply: &Reply) -> Result<String, ProviderError> {
    #[derive(Deserialize)]
    struct Created {
        id: String,
    }
    accepted(operation, reply)?;
    let created: Created = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected a JSON secret with an id"))?;
    if created.id.is_empty() {
        return Err(reply.unexpected(operation, "empty secret id"));
    }
    Ok(created.id)
}

impl SecretApi for OktaSecrets {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta list secrets";
            let reply = self.api.list(OP, bearer).await?;
            parse_list_reply(OP, &reply, &self.client_id)
        })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta create secret";
            let Some(value) = request.value else {
                return Err(ProviderError::transient(
                    OP,
                    "no value to send (a rotation journal from another provider?)",
                ));
            };
            let body = serde_json::json!({ "client_secret": value.expose_secret() });
            let reply = self.api.create(OP, bearer, &body, Some(value)).await?;
            let id = parse_create_reply(OP, &reply)?;
            Ok(NewSecret {
                id: Some(id),
                value: value.clone(),
                expires_at: None,
                registration_access_token: None,
            })
        })
    }

    fn deactivate<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta deactivate secret";
            self.api.deactivate(OP, bearer, id).await
        })
    }

    fn delete<'a>(
        &'a self,
        bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "okta delete secret";
            self.api.delete(OP, bearer, id).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::okta_api::tests::reply;

    #[test]
    fn a_listing_is_the_apps_secrets_with_their_creation_time() {
        let body = r#"[{"id":"ocs1","status":"ACTIVE","client_secret":"****","secret_hash":"h","created":"2026-01-02T03:04:05.000Z"},
                      {"id":"ocs2","status":"INACTIVE","created":"garbage"}]"#;
        let secrets = parse_list_reply("list", &reply(200, body), "app-client").unwrap();
        assert_eq!(secrets.len(), 2);
        assert_eq!(secrets[0].id, "ocs1");
        assert_eq!(secrets[0].client_id.as_deref(), Some("app-client"));
        assert!(secrets[0].created_at.is_some());
        assert!(secrets[1].created_at.is_none());
    }

    #[test]
    fn a_refusal_keeps_oktas_error_code_and_summary() {
        let body = r#"{"errorCode":"E0000001","errorSummary":"Api validation failed: client_secret","errorCauses":[{"errorSummary":"You can create at most two secrets"}]}"#;
        let e = parse_create_reply("create", &reply(400, body)).unwrap_err();
        assert_eq!(e.status, Some(400));
        assert_eq!(e.code.as_deref(), Some("E0000001"));
        assert!(e.detail.contains("Api validation failed"), "{e}");
        assert_eq!(e.kind, crate::provider::ErrorKind::Refused);
    }
}
