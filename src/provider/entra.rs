//! Microsoft Entra ID: an application's password credentials through
//! Microsoft Graph v1.0 (learn.microsoft.com, "application: addPassword",
//! "application: removePassword", "passwordCredential resource type"):
//!
//! - `GET  /v1.0/applications/{id}?$select=passwordCredentials` lists them:
//!   `{"passwordCredentials": [{keyId, displayName, hint, startDateTime,
//!   endDateTime}]}` (never the values);
//! - `POST /v1.0/applications/{id}/addPassword` with
//!   `{"passwordCredential": {"displayName": …}}` creates one; the reply's
//!   `secretText` is shown this once (server-generated), so rekeyd puts its
//!   tag in `displayName` and finds a secret whose reply was lost by it;
//! - `POST /v1.0/applications/{id}/removePassword` with `{"keyId": …}`
//!   deletes one (`204`).
//!
//! A new secret can take several seconds (about 20 observed) before logins
//! accept it; verification keeps trying for a minute. Login refusals carry
//! `AADSTS` codes in `error_description` (`AADSTS7000215` wrong secret,
//! `AADSTS7000222` expired secret), which status and logs show. Graph is
//! called with a token for `https://graph.microsoft.com/.default`: the
//! application's own, from a token profile with that scope named by
//! `secret_api_credential`, when the application owns its object and holds
//! `Application.ReadWrite.OwnedBy`.

use std::time::SystemTime;

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::http::{Reply, Transport, with_json};
use super::{
    Capabilities, CreateRequest, Deleted, NewSecret, ProviderError, RemoteSecret, SecretApi,
    classify_secret_api,
};
use crate::token::Token;

/// Server-generated values tagged in `displayName`, any number at once,
/// deleted in one call: the shape rekeyd started with.
pub const CAPABILITIES: Capabilities = Capabilities::SERVER_TAGGED;

pub struct EntraSecrets {
    transport: Transport,
    /// `…/v1.0/applications/{id}`.
    url: Url,
    /// The application's client id: every listed secret is this client's.
    client_id: String,
}

impl EntraSecrets {
    pub fn new(transport: Transport, url: Url, client_id: String) -> Self {
        EntraSecrets {
            transport,
            url,
            client_id,
        }
    }

    fn action(&self, name: &str) -> Url {
        let mut url = self.url.clone();
        url.path_segments_mut()
            .expect("an https URL has path segments")
            .pop_if_empty()
            .push(name);
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

/// Reads the application's `passwordCredentials`.
pub fn parse_list_reply(
    operation: &'static str,
    reply: &Reply,
    client_id: &str,
) -> Result<Vec<RemoteSecret>, ProviderError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Item {
        key_id: String,
        #[serde(default)]
        display_name: Option<String>,
        #[serde(default)]
        start_date_time: Option<String>,
        #[serde(default)]
        end_date_time: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Application {
        #[serde(default)]
        password_credentials: Vec<Item>,
    }
    if !(200..300).contains(&reply.status) {
        return Err(reply.refusal(operation, classify_secret_api));
    }
    let app: Application = serde_json::from_slice(&reply.body).map_err(|_| {
        reply.unexpected(
            operation,
            "expected an application with passwordCredentials",
        )
    })?;
    Ok(app
        .password_credentials
        .into_iter()
        .filter(|i| !i.key_id.is_empty())
        .map(|i| RemoteSecret {
            id: i.key_id,
            description: i.display_name.unwrap_or_default(),
            client_id: Some(client_id.to_string()),
            created_at: i.start_date_time.as_deref().and_then(graph_time),
            expires_at: i.end_date_time.as_deref().and_then(graph_time),
        })
        .collect())
}

/// A Graph `DateTimeOffset` (ISO 8601, always UTC in Graph replies, e.g.
/// `2026-05-01T00:00:00Z`; fractional seconds appear, up to seven digits).
/// `None` for anything else: an unreadable `endDateTime` is treated as
/// unknown (no expiry-driven rotation), never as "expired".
fn graph_time(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(SystemTime::from)
}

/// Reads an `addPassword` reply: `{keyId, secretText, …}`.
pub fn parse_create_reply(
    operation: &'static str,
    reply: &Reply,
) -> Result<NewSecret, ProviderError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Created {
        key_id: String,
        secret_text: String,
        #[serde(default)]
        end_date_time: Option<String>,
    }
    if !(200..300).contains(&reply.status) {
        return Err(reply.refusal(operation, classify_secret_api));
    }
    let created: Created = serde_json::from_slice(&reply.body)
        .map_err(|_| reply.unexpected(operation, "expected {keyId, secretText} JSON"))?;
    if created.key_id.is_empty() || created.secret_text.is_empty() {
        return Err(reply.unexpected(operation, "empty keyId or secretText"));
    }
    Ok(NewSecret {
        id: Some(created.key_id),
        value: SecretString::from(created.secret_text),
        expires_at: created.end_date_time.as_deref().and_then(graph_time),
        registration_access_token: None,
    })
}

impl SecretApi for EntraSecrets {
    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn lists_expiry(&self) -> bool {
        true
    }

    fn list<'a>(
        &'a self,
        bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "entra list secrets";
            let mut url = self.url.clone();
            url.query_pairs_mut()
                .append_pair("$select", "passwordCredentials");
            let request = self.transport.http.inner().get(url);
            let reply = self.call(OP, request, bearer).await?;
            parse_list_reply(OP, &reply, &self.client_id)
        })
    }

    fn create<'a>(
        &'a self,
        bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "entra add password";
            let body = serde_json::json!({
                "passwordCredential": { "displayName": request.description }
            });
            let http = with_json(
                self.transport.http.inner().post(self.action("addPassword")),
                &body,
            );
            let reply = self.call(OP, http, bearer).await?;
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
            const OP: &str = "entra remove password";
            let body = serde_json::json!({ "keyId": id });
            let http = with_json(
                self.transport
                    .http
                    .inner()
                    .post(self.action("removePassword")),
                &body,
            );
            let reply = self.call(OP, http, bearer).await?;
            match reply.status {
                200..=299 => Ok(Deleted::Deleted),
                404 => Ok(Deleted::NotFound),
                _ => Err(reply.refusal(OP, classify_secret_api)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::provider::Redactor;

    fn reply(status: u16, body: &str) -> Reply {
        Reply::received(
            status,
            Some("application/json".into()),
            Bytes::from(body.to_string()),
            &Redactor::default(),
            &[],
        )
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn the_listing_and_the_create_reply_say_when_a_secret_expires() {
        let body = r#"{"passwordCredentials": [
            {"keyId": "k1", "displayName": "rekeyd:app:r.1", "hint": "abc",
             "startDateTime": "2026-01-02T03:04:05Z", "endDateTime": "2028-01-02T03:04:05.1234567Z"},
            {"keyId": "k2", "displayName": null, "endDateTime": null},
            {"keyId": "k3", "endDateTime": "not a time"}]}"#;
        let listed = parse_list_reply("list", &reply(200, body), "app").unwrap();
        assert_eq!(listed[0].created_at, Some(at("2026-01-02T03:04:05Z")));
        assert_eq!(
            listed[0].expires_at,
            Some(at("2028-01-02T03:04:05.1234567Z"))
        );
        // None or unreadable: unknown, never "expired".
        assert_eq!(listed[1].expires_at, None);
        assert_eq!(listed[2].expires_at, None);

        let body = r#"{"keyId": "k4", "secretText": "s3cr3t-value", "hint": "s3c",
                       "startDateTime": "2026-01-02T03:04:05Z", "endDateTime": "2028-01-02T03:04:05Z"}"#;
        let created = parse_create_reply("create", &reply(200, body)).unwrap();
        assert_eq!(created.expires_at, Some(at("2028-01-02T03:04:05Z")));
        // A reply without one: the secret's expiry is unknown.
        let body = r#"{"keyId": "k5", "secretText": "s3cr3t-value"}"#;
        let created = parse_create_reply("create", &reply(200, body)).unwrap();
        assert_eq!(created.expires_at, None);
    }
}
