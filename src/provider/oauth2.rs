//! Any RFC 6749 §4.4 client-credentials token endpoint.
//!
//! The client authenticates with HTTP Basic (`client_secret_basic`, the
//! default, id and secret form-encoded first as §2.3.1 demands) or in the
//! form body (`client_secret_post`), or with a JWT assertion (RFC 7523
//! §2.2): one it signs with its key for every attempt (`private_key_jwt`,
//! the store's value is the key) or one a platform writes to a file
//! (`client_assertion_file`, nothing stored). Errors follow §5.2;
//! `invalid_client` may come as 400 or 401 depending on the server.

use base64::Engine as _;
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::http::{self, Transport};
use super::{ErrorKind, ProviderError, TokenProvider, assertion, key};
use crate::config::{AuthMethod, CredentialConfig};
use crate::token::Token;

pub struct OAuth2 {
    transport: Transport,
    token_url: Url,
    client_id: String,
    auth_method: AuthMethod,
    /// scope, audience and operator-given extra form fields.
    params: Vec<(String, String)>,
    /// `private_key_jwt`: the assertions' `aud` (`assertion_audience`, else
    /// the token endpoint URL, RFC 7523 §3 item 3).
    assertion_audience: String,
    /// `client_assertion_file`: where the platform writes the assertion.
    assertion_file: Option<std::path::PathBuf>,
}

impl OAuth2 {
    pub fn new(transport: Transport, cred: &CredentialConfig) -> Self {
        let mut params = Vec::new();
        if let Some(scope) = &cred.scope {
            params.push(("scope".to_string(), scope.clone()));
        }
        if let Some(audience) = &cred.audience {
            params.push(("audience".to_string(), audience.clone()));
        }
        params.extend(
            cred.extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string())),
        );
        OAuth2 {
            transport,
            token_url: cred.endpoints.token_url.clone(),
            client_id: cred.client_id.clone(),
            auth_method: cred.auth_method,
            params,
            assertion_audience: cred
                .assertion
                .as_ref()
                .and_then(|a| a.audience.clone())
                .unwrap_or_else(|| cred.endpoints.token_url.to_string()),
            assertion_file: cred.assertion.as_ref().and_then(|a| a.file.clone()),
        }
    }

    /// The assertion of this attempt: newly signed with the stored key, or
    /// read afresh from the platform's file. Its failures are local ones
    /// (no request was sent).
    fn assertion(&self, secret: &SecretString) -> Result<SecretString, ProviderError> {
        const OP: &str = "oauth2 login";
        match (self.auth_method, &self.assertion_file) {
            (AuthMethod::ClientAssertionFile, Some(path)) => {
                assertion::read_file(path, std::time::SystemTime::now())
                    // The platform replaces the file by itself: try again.
                    .map_err(|e| ProviderError::transient(OP, e.to_string()))
            }
            _ => {
                let key = key::from_secret(secret).map_err(|e| ProviderError {
                    // The stored key will not parse on a retry either.
                    kind: ErrorKind::Refused,
                    operation: OP,
                    status: None,
                    code: None,
                    // E.g. a credential switched from a secret to a key:
                    // the store still holds the secret.
                    detail: format!(
                        "the stored private key cannot be used: it {e}; install the key with \
                         `rekeyd set-secret NAME < KEYFILE`"
                    ),
                    retry_after: None,
                })?;
                assertion::mint(
                    &key,
                    &self.client_id,
                    &self.assertion_audience,
                    std::time::SystemTime::now(),
                )
                .map_err(|e| ProviderError::transient(OP, e.to_string()))
            }
        }
    }
}

fn classify(status: u16, code: Option<&str>, _retry_after: bool) -> ErrorKind {
    match (status, code) {
        (_, Some("invalid_client")) | (401, _) => ErrorKind::Rejected,
        (429, _) => ErrorKind::Quota,
        (408, _) => ErrorKind::Transient,
        (400..=499, _) => ErrorKind::Refused,
        _ => ErrorKind::Transient,
    }
}

impl TokenProvider for OAuth2 {
    fn login<'a>(
        &'a self,
        secret: &'a SecretString,
    ) -> BoxFuture<'a, Result<Token, ProviderError>> {
        Box::pin(async move {
            const OP: &str = "oauth2 login";
            let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
            form.extend(self.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let mut request = self.transport.http.inner().post(self.token_url.clone());
            // For Basic, the request also carries the secret as the encoded
            // `id:secret` pair of the Authorization header, which a
            // provider could echo as well.
            let mut encoded = None;
            match self.auth_method {
                AuthMethod::ClientSecretBasic => {
                    let (id, password) = (
                        http::form_encode(&self.client_id),
                        http::form_encode(secret.expose_secret()),
                    );
                    encoded = Some(SecretString::from(
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{id}:{password}")),
                    ));
                    request = request.basic_auth(id, Some(password));
                }
                AuthMethod::ClientSecretPost => {
                    form.push(("client_id", &self.client_id));
                    form.push(("client_secret", secret.expose_secret()));
                }
                AuthMethod::PrivateKeyJwt | AuthMethod::ClientAssertionFile => {}
            }
            // A new assertion per attempt, retries included: servers refuse
            // a `jti` they have seen (RFC 7523 §3 item 7). It is a
            // credential too, so the reply is scrubbed of it (`encoded`).
            let signed;
            if matches!(
                self.auth_method,
                AuthMethod::PrivateKeyJwt | AuthMethod::ClientAssertionFile
            ) {
                signed = self.assertion(secret)?;
                encoded = Some(signed.clone());
                form.push(("client_id", &self.client_id));
                form.push(("client_assertion_type", assertion::JWT_BEARER));
                form.push(("client_assertion", signed.expose_secret()));
            }
            let request = request.form(&form);
            http::token_request(
                &self.transport,
                OP,
                request,
                secret,
                encoded.as_ref(),
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
    fn invalid_client_as_400_or_401() {
        assert_eq!(
            classify(400, Some("invalid_client"), false),
            ErrorKind::Rejected
        );
        assert_eq!(
            classify(401, Some("invalid_client"), false),
            ErrorKind::Rejected
        );
        assert_eq!(
            classify(400, Some("invalid_scope"), false),
            ErrorKind::Refused
        );
        assert_eq!(classify(500, None, false), ErrorKind::Transient);
    }
}
