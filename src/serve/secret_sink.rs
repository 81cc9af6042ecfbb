//! Kubernetes Secret sinks (`kind = "kubernetes-secret"`): each new token
//! goes to one data key of a Secret, for applications in other pods that
//! mount it or read it through the API. The key's expiry is recorded in the
//! annotation `rekeyd/<key>.expires-at` (RFC 3339, UTC).
//!
//! The Secret is read, changed in that key and that annotation only, and
//! replaced with the `resourceVersion` it was read at: the API server
//! refuses (409 Conflict) a replace based on a stale read, so another
//! writer's keys are never lost; the write is then read and decided again
//! ([`MAX_WRITE_ATTEMPTS`] rounds). A missing Secret is created, where RBAC
//! allows `create` (Kubernetes cannot limit `create` to a name, so
//! deploy/kubernetes/secret-sink creates the Secret beforehand and grants
//! only get, update and patch on it).
//!
//! Errors carry the Secret's name and the API's status, reason and message,
//! never the token or any data of the Secret (I7).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::config::SecretSink;
use crate::store::kubernetes::{api_code, bounded, cluster_config, describe_api_error};

/// Bound on read-decide-write rounds lost to other writers of the Secret
/// in one write; the sink's own retry takes over after that.
pub const MAX_WRITE_ATTEMPTS: u32 = 10;

/// Bound on each request to the API server: a hung server fails the write,
/// which is retried with the sink's backoff.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The annotation holding the expiry of the token in data key `key`.
pub fn expiry_annotation(key: &str) -> String {
    format!("rekeyd/{key}.expires-at")
}

/// Why a Secret sink could not be written. Holds no token.
#[derive(Debug, thiserror::Error)]
pub enum SecretSinkError {
    /// No usable cluster configuration (kubeconfig, in-cluster).
    #[error("{0}")]
    Client(String),
    /// The API server refused or did not answer: `<code> <Reason>: <message>`.
    #[error("kubernetes Secret {target}: {reason}")]
    Api { target: String, reason: String },
}

/// The Secret that holds only `key`, with `content` expiring at `expires_at`.
pub fn new_secret(
    name: &str,
    namespace: &str,
    key: &str,
    content: &[u8],
    expires_at: SystemTime,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "rekeyd".to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                expiry_annotation(key),
                rfc3339(expires_at),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(content.to_vec()),
        )])),
        ..Secret::default()
    }
}

/// `secret` with data key `key` set to `content` and its expiry annotation
/// to `expires_at`, everything else (other keys, labels, annotations, its
/// `resourceVersion`) as read; `None` when it already holds exactly that.
pub fn with_token(
    mut secret: Secret,
    key: &str,
    content: &[u8],
    expires_at: SystemTime,
) -> Option<Secret> {
    let annotation = expiry_annotation(key);
    let expires = rfc3339(expires_at);
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let annotations = secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    if data.get(key).is_some_and(|v| v.0 == content)
        && annotations.get(&annotation) == Some(&expires)
    {
        return None;
    }
    data.insert(key.to_string(), ByteString(content.to_vec()));
    annotations.insert(annotation, expires);
    Some(secret)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    /// The key and its annotation already held this token.
    Unchanged,
}

/// A client for one Secret sink.
pub struct SecretWriter {
    secrets: Api<Secret>,
    namespace: String,
    name: String,
    key: String,
}

impl SecretWriter {
    /// Builds the API client from the sink's kubeconfig (or in-cluster
    /// configuration); the namespace defaults to the pod's own (the
    /// kubeconfig context's outside a cluster). Contacts nothing.
    pub async fn connect(sink: &SecretSink) -> Result<SecretWriter, SecretSinkError> {
        let (mut config, _) = cluster_config(sink.kubeconfig.as_deref())
            .await
            .map_err(|e| SecretSinkError::Client(e.to_string()))?;
        config.connect_timeout = Some(REQUEST_TIMEOUT);
        config.read_timeout = Some(REQUEST_TIMEOUT);
        config.write_timeout = Some(REQUEST_TIMEOUT);
        let namespace = sink
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| {
            SecretSinkError::Client(format!("cannot build the Kubernetes API client: {e}"))
        })?;
        Ok(SecretWriter {
            secrets: Api::namespaced(client, &namespace),
            namespace,
            name: sink.secret.clone(),
            key: sink.key.clone(),
        })
    }

    /// `<namespace>/<name>[<key>]`, as errors name it.
    pub fn target(&self) -> String {
        format!("{}/{}[{}]", self.namespace, self.name, self.key)
    }

    fn error(&self, reason: String) -> SecretSinkError {
        SecretSinkError::Api {
            target: self.target(),
            reason,
        }
    }

    /// Sets the key to `content` and its annotation to `expires_at`,
    /// creating the Secret if it does not exist. An error's text never
    /// holds `content`, as is or base64-encoded (as the API server would
    /// quote a Secret's `data`), whatever the server's message says (I7).
    pub async fn write(
        &self,
        content: &[u8],
        expires_at: SystemTime,
    ) -> Result<Written, SecretSinkError> {
        self.write_unscrubbed(content, expires_at)
            .await
            .map_err(|e| match e {
                SecretSinkError::Api { target, reason } => {
                    use base64::Engine as _;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(content);
                    let raw = String::from_utf8_lossy(content);
                    let mut reason = reason;
                    // Whole values only: the message is the server's, kept
                    // whole (not cut like provider text) for its hints.
                    for value in [raw.trim_end(), encoded.as_str()] {
                        if !value.is_empty() {
                            reason = reason.replace(value, crate::provider::redact::REDACTED);
                        }
                    }
                    SecretSinkError::Api { target, reason }
                }
                other => other,
            })
    }

    async fn write_unscrubbed(
        &self,
        content: &[u8],
        expires_at: SystemTime,
    ) -> Result<Written, SecretSinkError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let current = bounded(REQUEST_TIMEOUT, self.secrets.get_opt(&self.name))
                .await
                .map_err(|e| self.error(describe_api_error(&e)))?;
            let Some(current) = current else {
                let secret =
                    new_secret(&self.name, &self.namespace, &self.key, content, expires_at);
                match bounded(
                    REQUEST_TIMEOUT,
                    self.secrets.create(&PostParams::default(), &secret),
                )
                .await
                {
                    Ok(_) => return Ok(Written::Created),
                    // Created by someone else meanwhile: read it and merge.
                    Err(e) if api_code(&e) == Some(409) => continue,
                    Err(e) if api_code(&e) == Some(403) => {
                        return Err(self.error(format!(
                            "{}; the Secret does not exist and this account may not create it: create it beforehand (deploy/kubernetes/secret-sink does)",
                            describe_api_error(&e)
                        )));
                    }
                    Err(e) => return Err(self.error(describe_api_error(&e))),
                }
            };
            let Some(secret) = with_token(current, &self.key, content, expires_at) else {
                return Ok(Written::Unchanged);
            };
            // `secret` keeps the resourceVersion it was read at: the server
            // refuses the replace if anyone wrote since.
            match bounded(
                REQUEST_TIMEOUT,
                self.secrets
                    .replace(&self.name, &PostParams::default(), &secret),
            )
            .await
            {
                Ok(_) => return Ok(Written::Updated),
                // Another writer got in first: read again, keep its change.
                Err(e) if api_code(&e) == Some(409) => continue,
                // Deleted since it was read: the next round creates it.
                Err(e) if api_code(&e) == Some(404) => continue,
                Err(e) => return Err(self.error(describe_api_error(&e))),
            }
        }
        Err(self.error(format!(
            "still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_new_secret_holds_the_key_and_its_expiry_only() {
        let s = new_secret("app-token", "payments", "token", b"t1", at(1_767_323_045));
        assert_eq!(s.metadata.name.as_deref(), Some("app-token"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("payments"));
        assert!(s.metadata.resource_version.is_none());
        let data = s.data.unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data["token"].0, b"t1");
        assert_eq!(
            s.metadata.annotations.unwrap()["rekeyd/token.expires-at"],
            "2026-01-02T03:04:05Z"
        );
    }

    #[test]
    fn an_update_changes_the_key_and_its_annotation_only() {
        let mut existing = Secret {
            metadata: ObjectMeta {
                name: Some("app".into()),
                resource_version: Some("42".into()),
                annotations: Some(BTreeMap::from([("team".into(), "x".into())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                ("other".into(), ByteString(b"keep".to_vec())),
                ("token".into(), ByteString(b"old".to_vec())),
            ])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let updated = with_token(existing.clone(), "token", b"new", at(100)).unwrap();
        assert_eq!(updated.metadata.resource_version.as_deref(), Some("42"));
        let data = updated.data.as_ref().unwrap();
        assert_eq!(data["other"].0, b"keep");
        assert_eq!(data["token"].0, b"new");
        let annotations = updated.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["team"], "x");
        assert_eq!(
            annotations["rekeyd/token.expires-at"],
            "1970-01-01T00:01:40Z"
        );
        // Written already: nothing to do.
        assert!(with_token(updated.clone(), "token", b"new", at(100)).is_none());
        // Same token, expiry missing: written.
        existing
            .data
            .as_mut()
            .unwrap()
            .insert("token".into(), ByteString(b"new".to_vec()));
        assert!(with_token(existing, "token", b"new", at(100)).is_some());
    }
}
