//! MapsIndoors (an IdentityServer deployment).
//!
//! Quirk: a wrong client secret is `400 {"error":"invalid_client"}`, not 401,
//! so the status alone cannot tell a bad secret from a bad request.

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::http::{self, HttpClient};
use super::{ErrorKind, ProviderError, TokenProvider};
use crate::config::CredentialConfig;
use crate::token::Token;

pub struct MapsIndoors {
    http: HttpClient,
    token_url: Url,
    client_id: String,
    scope: Option<String>,
}

impl MapsIndoors {
    pub fn new(http: HttpClient, cred: &CredentialConfig) -> Self {
        MapsIndoors {
            http,
            token_url: cred.endpoints.token_url.clone(),
            client_id: cred.client_id.clone(),
            scope: cred.scope.clone(),
        }
    }
}

/// How a failed token request is treated.
fn classify(status: u16, code: Option<&str>) -> ErrorKind {
    match (status, code) {
        (400 | 401, Some("invalid_client")) | (401, None) => ErrorKind::Rejected,
        (429, _) => ErrorKind::Quota,
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
            const OP: &str = "mapsindoors login";
            let mut form = vec![
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", secret.expose_secret()),
            ];
            if let Some(scope) = &self.scope {
                form.push(("scope", scope));
            }
            let request = self.http.inner().post(self.token_url.clone()).form(&form);
            http::token_request(&self.http, OP, request, secret, classify).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_secret_is_400_invalid_client() {
        assert_eq!(classify(400, Some("invalid_client")), ErrorKind::Rejected);
        assert_eq!(classify(400, Some("invalid_scope")), ErrorKind::Refused);
        assert_eq!(classify(503, None), ErrorKind::Transient);
        assert_eq!(classify(429, None), ErrorKind::Quota);
    }
}
