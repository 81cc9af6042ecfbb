//! Mappls (MapmyIndia) outpost token endpoint.
//!
//! Quirks: success may be 200 or 201 (any 2xx is success); `token_type` is a
//! lowercase `bearer` and the reply carries extra fields; `401` is a bad
//! client; `403` means a daily or hourly quota is used up, so hammering it
//! only prolongs the outage; `503` during maintenance.

use futures_util::future::BoxFuture;
use secrecy::SecretString;
use url::Url;

use super::http::{self, Transport};
use super::{ErrorKind, ProviderError, TokenProvider};
use crate::config::CredentialConfig;
use crate::token::Token;

pub struct Mappls {
    transport: Transport,
    token_url: Url,
    client_id: String,
    scope: Option<String>,
}

impl Mappls {
    pub fn new(transport: Transport, cred: &CredentialConfig) -> Self {
        Mappls {
            transport,
            token_url: cred.endpoints.token_url.clone(),
            client_id: cred.client_id.clone(),
            scope: cred.scope.clone(),
        }
    }
}

fn classify(status: u16, code: Option<&str>, _retry_after: bool) -> ErrorKind {
    match (status, code) {
        (401, _) | (400, Some("invalid_client")) => ErrorKind::Rejected,
        (403 | 429, _) => ErrorKind::Quota,
        (408, _) => ErrorKind::Transient,
        (400..=499, _) => ErrorKind::Refused,
        _ => ErrorKind::Transient,
    }
}

impl TokenProvider for Mappls {
    fn login<'a>(
        &'a self,
        secret: &'a SecretString,
    ) -> BoxFuture<'a, Result<Token, ProviderError>> {
        Box::pin(async move {
            http::form_login(
                &self.transport,
                "mappls login",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_403() {
        assert_eq!(classify(403, None, false), ErrorKind::Quota);
        assert_eq!(
            classify(401, Some("invalid_client"), false),
            ErrorKind::Rejected
        );
        assert_eq!(classify(503, None, false), ErrorKind::Transient);
    }
}
