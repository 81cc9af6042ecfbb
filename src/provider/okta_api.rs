//! Okta's Management API for one collection of an app's client
//! credentials ("Application SSO Credential OAuth 2.0 Client Auth",
//! <https://developer.okta.com/docs/api/openapi/okta-management/management/tag/ApplicationSSOCredentialOAuth2ClientAuth>):
//! the client secrets at `{org}/api/v1/apps/{appId}/credentials/secrets`
//! ([`super::okta`]) and the JSON Web Keys at `…/credentials/jwks`
//! ([`super::okta_keys`]). Both collections answer the same calls:
//!
//! - `GET    {collection}` lists;
//! - `POST   {collection}` adds one (a JSON body);
//! - `POST   {collection}/{id}/lifecycle/deactivate` deactivates one;
//! - `DELETE {collection}/{id}` deletes one.
//!
//! `{id}` is Okta's id of the item (`ocs…`, `pks…`). Every call carries
//! the administrative client's token as a bearer (scope
//! `okta.apps.manage`) and asks for JSON; errors are `{"errorCode",
//! "errorSummary", "errorCauses"}`. What the items are, and what their
//! replies hold, is the adapter's.

use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

use super::http::{Reply, Transport, with_json};
use super::{Deleted, ProviderError, classify_secret_api};
use crate::token::Token;

/// One collection of an app's client credentials.
pub struct ClientAuthCredentials {
    transport: Transport,
    /// `…/api/v1/apps/{appId}/credentials/{secrets|jwks}`.
    url: Url,
}

impl ClientAuthCredentials {
    pub fn new(transport: Transport, url: Url) -> Self {
        ClientAuthCredentials { transport, url }
    }

    /// `GET {collection}`: the reply as it came, whatever its status.
    pub async fn list(
        &self,
        operation: &'static str,
        bearer: &Token,
    ) -> Result<Reply, ProviderError> {
        let request = self.transport.http.inner().get(self.url.clone());
        self.call(operation, request, bearer, None).await
    }

    /// `POST {collection}` with the JSON `body`: the reply as it came.
    /// `carried` is a secret the body holds, scrubbed from the reply's
    /// text as the bearer is.
    pub async fn create(
        &self,
        operation: &'static str,
        bearer: &Token,
        body: &Value,
        carried: Option<&SecretString>,
    ) -> Result<Reply, ProviderError> {
        let request = with_json(self.transport.http.inner().post(self.url.clone()), body);
        self.call(operation, request, bearer, carried).await
    }

    /// `POST {collection}/{id}/lifecycle/deactivate`, `id` Okta's:
    /// [`Deleted::NotFound`] on 404, Okta's refusal on any other non-2xx.
    pub async fn deactivate(
        &self,
        operation: &'static str,
        bearer: &Token,
        id: &str,
    ) -> Result<Deleted, ProviderError> {
        let url = self.item_url(id, &["lifecycle", "deactivate"]);
        let request = self.transport.http.inner().post(url);
        let reply = self.call(operation, request, bearer, None).await?;
        done_or_gone(operation, &reply)
    }

    /// `DELETE {collection}/{id}`, `id` Okta's: as
    /// [`ClientAuthCredentials::deactivate`].
    pub async fn delete(
        &self,
        operation: &'static str,
        bearer: &Token,
        id: &str,
    ) -> Result<Deleted, ProviderError> {
        let request = self.transport.http.inner().delete(self.item_url(id, &[]));
        let reply = self.call(operation, request, bearer, None).await?;
        done_or_gone(operation, &reply)
    }

    /// `{collection}/{id}/{suffix…}`, `id` escaped as one segment.
    fn item_url(&self, id: &str, suffix: &[&str]) -> Url {
        let mut url = self.url.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has path segments")
            .pop_if_empty()
            .push(id)
            .extend(suffix);
        url
    }

    async fn call(
        &self,
        operation: &'static str,
        request: reqwest::RequestBuilder,
        bearer: &Token,
        carried: Option<&SecretString>,
    ) -> Result<Reply, ProviderError> {
        let request = request
            .bearer_auth(bearer.access_token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        let mut secrets = vec![&bearer.access_token];
        secrets.extend(carried);
        self.transport.send(operation, request, &secrets).await
    }
}

/// `Ok` on a 2xx reply, else Okta's refusal (its `errorCode` and
/// `errorSummary`).
pub fn accepted(operation: &'static str, reply: &Reply) -> Result<(), ProviderError> {
    if (200..300).contains(&reply.status) {
        Ok(())
    } else {
        Err(reply.refusal(operation, classify_secret_api))
    }
}

/// An item's `created` (RFC 3339) as a time; `None` when absent or
/// unreadable.
pub fn created_at(created: Option<&str>) -> Option<SystemTime> {
    created
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(SystemTime::from)
}

fn done_or_gone(operation: &'static str, reply: &Reply) -> Result<Deleted, ProviderError> {
    match reply.status {
        200..=299 => Ok(Deleted::Deleted),
        404 => Ok(Deleted::NotFound),
        _ => Err(reply.refusal(operation, classify_secret_api)),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::provider::Redactor;
    use bytes::Bytes;

    /// A JSON reply as Okta's Management API answers, for the adapters'
    /// tests too.
    pub(in crate::provider) fn reply(status: u16, body: &str) -> Reply {
        Reply::received(
            status,
            Some("application/json".into()),
            Bytes::from(body.to_string()),
            &Redactor::default(),
            &[],
        )
    }

    #[test]
    fn a_missing_item_is_gone_and_a_refusal_keeps_oktas_error() {
        assert!(matches!(
            done_or_gone("delete", &reply(204, "")),
            Ok(Deleted::Deleted)
        ));
        assert!(matches!(
            done_or_gone("delete", &reply(404, "{}")),
            Ok(Deleted::NotFound)
        ));
        let body = r#"{"errorCode":"E0000001","errorSummary":"Api validation failed"}"#;
        let e = done_or_gone("delete", &reply(400, body)).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("E0000001"));
        assert!(accepted("list", &reply(201, "[]")).is_ok());
        assert_eq!(
            accepted("list", &reply(403, body)).unwrap_err().status,
            Some(403)
        );
    }

    #[test]
    fn a_creation_time_is_read_when_it_is_rfc_3339() {
        assert!(created_at(Some("2026-01-02T03:04:05.000Z")).is_some());
        assert!(created_at(Some("garbage")).is_none());
        assert!(created_at(None).is_none());
    }
}
