//! The Kubernetes store: every credential's record in one Secret, one data
//! key per credential (`<name>.json`, the same JSON document the file store
//! writes), and a `coordination.k8s.io` Lease as the rotation claim
//! ([`claim`]).
//!
//! Versions are per credential: the `version` inside each document, not the
//! Secret's `resourceVersion`. Replicas rotating different credentials write
//! the same Secret; with the Secret's version as the record version, a write
//! to one credential would make every other credential's next CAS fail.
//! The Secret's `resourceVersion` is still sent with every write, so the API
//! server rejects (409) a write based on a stale read; we then read again
//! and decide again, and only a change of *this* credential's document is a
//! [`StoreError::Conflict`] for the caller.
//!
//! Each credential's rotation history ([`crate::history`]) is a data key
//! `<name>.json` of a second Secret, `<secret>-history`: a separate object,
//! so the history's size and writes never touch the state Secret (its
//! 1 MiB holds the journals, which must always be writable). Its version
//! is a digest of the key's bytes; the Secret's `resourceVersion` guards
//! each write as for records.
//!
//! Every request gives up after a quarter of the claim TTL (S3, see
//! `claim::request_timeout`): a stalled API server fails a step well
//! before the rotation claim could lapse under it.
//!
//! Secret data never reaches an error, a log line or a `Debug` output (I7):
//! errors name the object (`<ns>/<secret>[<key>]`) and the API's status.

mod claim;

// The holder-side timing of a claim (S3) is the same for the etcd store.
#[cfg(feature = "etcd")]
pub(crate) use claim::{Renewal, Tenure, keep_renewed, request_timeout};

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{Kubeconfig, KubeconfigError};
use kube::{Api, Client};
use url::Url;

use super::record;
use super::{CredentialRecord, Store, StoreError, Versioned};
use crate::config::KubernetesStoreConfig;
use crate::proxy::{ProxyEnv, Route};

/// Bound on read-decide-write rounds lost to other writers of the Secret.
/// Each lost round means another replica wrote successfully, so running out
/// takes a storm of writes; the caller retries later.
/// The most data the history Secret holds, in bytes, shared equally by the
/// credentials' histories: below the API server's 1 MiB limit for a Secret,
/// with room for its metadata and a credential that joins.
pub const HISTORY_SECRET_BYTES: usize = 768 * 1024;

const MAX_WRITE_ATTEMPTS: u32 = 10;

/// No request to the API server waits longer than this, whatever the claim
/// TTL: a hung connection must not stall a rotation step.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KubernetesStore {
    secrets: Api<Secret>,
    namespace: String,
    secret: String,
    /// Bound on each request, below the claim TTL (S3).
    timeout: Duration,
    claims: claim::Claims,
    history_limit: usize,
}

impl KubernetesStore {
    /// Builds the API client ([`client_config`]). Contacts nothing: the
    /// first request says whether the server is reachable and what RBAC
    /// allows.
    pub async fn connect(config: &KubernetesStoreConfig) -> Result<Self, StoreError> {
        let (mut client_config, _) = client_config(config).await?;
        let timeout = claim::request_timeout(config.claim_ttl, MAX_REQUEST_TIMEOUT);
        // Per connection step; `bounded` limits each request as a whole.
        client_config.connect_timeout = Some(timeout);
        client_config.read_timeout = Some(timeout);
        client_config.write_timeout = Some(timeout);
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| client_config.default_namespace.clone());
        let client = Client::try_from(client_config).map_err(|e| StoreError::Unavailable {
            target: "kubernetes".into(),
            reason: format!("cannot build the API client: {e}"),
        })?;
        Ok(KubernetesStore {
            secrets: Api::namespaced(client.clone(), &namespace),
            claims: claim::Claims::new(
                Api::namespaced(client, &namespace),
                format!("{namespace}/{}", config.lease),
                config.lease.clone(),
                config.claim_ttl,
                timeout,
            ),
            secret: config.secret.clone(),
            timeout,
            namespace,
            history_limit: crate::history::DEFAULT_LIMIT,
        })
    }

    /// Keeps at most `limit` history entries per credential.
    pub fn with_history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    /// The Secret holding every credential's rotation history.
    pub fn history_secret(&self) -> String {
        format!("{}-history", self.secret)
    }

    fn history_target(&self) -> String {
        format!(
            "kubernetes Secret {}/{}",
            self.namespace,
            self.history_secret()
        )
    }

    /// `kubernetes Secret <ns>/<name>`: what errors about the Secret name.
    fn target(&self) -> String {
        format!("kubernetes Secret {}/{}", self.namespace, self.secret)
    }

    fn unavailable(&self, e: kube::Error) -> StoreError {
        StoreError::Unavailable {
            target: self.target(),
            reason: describe_api_error(&e),
        }
    }

    async fn get(&self) -> Result<Option<Secret>, StoreError> {
        bounded(self.timeout, self.secrets.get_opt(&self.secret))
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// The version and record stored under `name` in `secret`, if any.
    fn entry(
        &self,
        secret: &Secret,
        name: &str,
    ) -> Result<Option<(u64, CredentialRecord)>, StoreError> {
        let key = data_key(name);
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&key)) else {
            return Ok(None);
        };
        record::decode(&bytes.0)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt {
                path: format!("{}/{}[{key}]", self.namespace, self.secret),
                reason,
            })
    }

    /// Creates the Secret holding just `name`'s document. A 403 here usually
    /// means RBAC grants no `create` (the shipped Role does not): say so.
    async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<Created, StoreError> {
        self.create_object(&self.secret, &self.target(), data_key(name), bytes)
            .await
    }

    /// Creates Secret `object` holding one data `key` (`target` names it
    /// in errors).
    async fn create_object(
        &self,
        object: &str,
        target: &str,
        key: String,
        bytes: Vec<u8>,
    ) -> Result<Created, StoreError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(object.to_string()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(key, ByteString(bytes))])),
            ..Secret::default()
        };
        match bounded(
            self.timeout,
            self.secrets.create(&PostParams::default(), &secret),
        )
        .await
        {
            Ok(_) => Ok(Created::Yes),
            Err(e) if api_code(&e) == Some(409) => Ok(Created::Raced),
            Err(e) if api_code(&e) == Some(403) => Err(StoreError::Unavailable {
                target: target.to_string(),
                reason: format!(
                    "{}; the Secret does not exist and may not be created by this account: create it beforehand (deploy/kubernetes has it)",
                    describe_api_error(&e)
                ),
            }),
            Err(e) => Err(StoreError::Unavailable {
                target: target.to_string(),
                reason: describe_api_error(&e),
            }),
        }
    }

    async fn get_history(&self) -> Result<Option<Secret>, StoreError> {
        bounded(self.timeout, self.secrets.get_opt(&self.history_secret()))
            .await
            .map_err(|e| StoreError::Unavailable {
                target: self.history_target(),
                reason: describe_api_error(&e),
            })
    }
}

/// The bytes of data key `key` of `secret`, if present.
fn data_of<'s>(secret: &'s Secret, key: &str) -> Option<&'s [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
}

enum Created {
    Yes,
    /// Someone else created the Secret first: read it and decide again.
    Raced,
}

/// The configuration of the kubeconfig's current context, and the
/// `proxy-url` its cluster names, if any.
async fn from_kubeconfig(
    kubeconfig: Kubeconfig,
    what: &str,
) -> Result<(kube::Config, Option<String>), StoreError> {
    let proxy = kubeconfig
        .current_context
        .as_ref()
        .and_then(|name| kubeconfig.contexts.iter().find(|c| &c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| kubeconfig.clusters.iter().find(|k| k.name == c.cluster))
        .and_then(|k| k.cluster.as_ref())
        .and_then(|k| k.proxy_url.clone());
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| StoreError::Unavailable {
            target: what.to_string(),
            reason: describe_kubeconfig_error(&e),
        })?;
    Ok((config, proxy))
}

/// The API client's configuration: the given kubeconfig, else in-cluster,
/// else `KUBECONFIG` / `~/.kube/config` (the order the configuration
/// documents), with its proxy decided by the rule of [`crate::proxy`]: none
/// for a plain-http API server (kube would take `HTTPS_PROXY` for it), else
/// the kubeconfig cluster's `proxy-url`, else `HTTPS_PROXY`/`ALL_PROXY`
/// unless `NO_PROXY` names the server. Also returns that route, which
/// `rekeyd check` shows. Contacts nothing.
pub async fn client_config(
    config: &KubernetesStoreConfig,
) -> Result<(kube::Config, Route), StoreError> {
    cluster_config(config.kubeconfig.as_deref()).await
}

/// [`client_config`] for any client of the API server (the store, a
/// Kubernetes Secret sink): `kubeconfig`, else in-cluster, else
/// `KUBECONFIG` / `~/.kube/config`, with the same proxy rule. Contacts
/// nothing.
pub async fn cluster_config(
    kubeconfig: Option<&std::path::Path>,
) -> Result<(kube::Config, Route), StoreError> {
    let (mut client_config, configured_proxy) = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| StoreError::Unavailable {
                target: format!("kubeconfig {}", path.display()),
                reason: describe_kubeconfig_error(&e),
            })?;
            from_kubeconfig(kubeconfig, &format!("kubeconfig {}", path.display())).await?
        }
        // In a pod, the service account; elsewhere `KUBECONFIG` or
        // ~/.kube/config (the order the configuration documents).
        None => match kube::Config::incluster() {
            Ok(in_cluster) => (in_cluster, None),
            Err(not_in_cluster) => {
                let kubeconfig =
                        Kubeconfig::read().map_err(|e| StoreError::Unavailable {
                            target: "kubernetes".into(),
                            reason: format!(
                                "no cluster configuration: not in a cluster ({not_in_cluster}), and no usable kubeconfig ({})",
                                describe_kubeconfig_error(&e)
                            ),
                        })?;
                from_kubeconfig(kubeconfig, "kubeconfig").await?
            }
        },
    };
    let unavailable = |reason: String| StoreError::Unavailable {
        target: "kubernetes".into(),
        reason,
    };
    let server = Url::parse(&client_config.cluster_url.to_string())
        .map_err(|e| unavailable(format!("API server URL: {e}")))?;
    let route = ProxyEnv::from_env()
        .route_configured(&server, configured_proxy.as_deref(), "kubeconfig proxy-url")
        .map_err(unavailable)?;
    client_config.proxy_url = match &route {
        Route::Proxy(proxy) => proxy.uri(),
        Route::Direct(_) => None,
    };
    Ok((client_config, route))
}

/// kube's wording, except for YAML errors: the parser may quote the
/// offending value, and a kubeconfig holds tokens and keys (I7).
fn describe_kubeconfig_error(e: &KubeconfigError) -> String {
    match e {
        KubeconfigError::Parse(_) => "not a valid kubeconfig (YAML)".into(),
        other => other.to_string(),
    }
}

/// The Secret data key of credential `name`.
fn data_key(name: &str) -> String {
    format!("{name}.json")
}

/// Runs one API request, giving up after `limit` (S3): the answer of a
/// request that took longer could no longer be trusted to have landed
/// while the claim was held.
pub(crate) async fn bounded<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer within {limit:?}").into(),
            ))
        })
}

/// The HTTP status of an API error, if the server answered.
pub(crate) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// `403 Forbidden: secrets "x" is forbidden: ...`: the status and the
/// server's own explanation. Not kube's `Display`, which would quote
/// undecodable response bodies; API messages do not carry Secret data.
/// `message` with every long run of token-like characters (base64,
/// base64url, JWT dots: 24 or more, letters and digits both) replaced by
/// `[withheld]`. An API server's refusal may quote the object it was sent
/// (a 422 `Invalid`, an admission webhook's denial), and what rekeyd sends
/// are Secrets whose `data` is the journal (client secrets) or a token,
/// base64-encoded (I7). Names, reasons and RBAC verbs are short runs
/// between `:`, `"` and spaces, and stay.
pub(crate) fn withhold_opaque_runs(message: &str) -> String {
    let is_run_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_' | '.');
    let mut out = String::with_capacity(message.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let opaque = run.len() >= 24
            && run.chars().any(|c| c.is_ascii_alphabetic())
            && run.chars().any(|c| c.is_ascii_digit());
        out.push_str(if opaque { "[withheld]" } else { run });
        run.clear();
    };
    for c in message.chars() {
        if is_run_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

pub(crate) fn describe_api_error(e: &kube::Error) -> String {
    use crate::provider::redact::{MAX_SERVER_MESSAGE_CHARS, printable};
    match e {
        kube::Error::Api(status) => {
            // The server's words, one bounded printable line (they reach
            // logs, status and errors like a provider's).
            let reason = if status.reason.is_empty() {
                "Error".to_string()
            } else {
                printable(&status.reason, 64)
            };
            if status.message.is_empty() {
                format!("{} {reason}", status.code)
            } else {
                let message = printable(
                    &withhold_opaque_runs(&status.message),
                    MAX_SERVER_MESSAGE_CHARS,
                );
                format!("{} {reason}: {message}", status.code)
            }
        }
        kube::Error::SerdeError(_) => "the API server's answer could not be decoded".into(),
        kube::Error::HyperError(e) => format!("connection failed: {e}"),
        kube::Error::Service(e) => format!("request failed: {e}"),
        other => format!("request failed: {other}"),
    }
}

impl Store for KubernetesStore {
    fn keeps_history(&self) -> bool {
        true
    }

    fn history_limit(&self) -> usize {
        self.history_limit
    }

    fn load_history<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<Vec<u8>>>, StoreError>> {
        Box::pin(async move {
            let Some(secret) = self.get_history().await? else {
                return Ok(None);
            };
            Ok(data_of(&secret, &data_key(name)).map(|bytes| Versioned {
                version: crate::history::content_version(bytes),
                value: bytes.to_vec(),
            }))
        })
    }

    fn swap_history<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let key = data_key(name);
            let version = crate::history::content_version(bytes);
            let conflict = || StoreError::Conflict {
                name: format!("{name} (history)"),
                expected,
            };
            for _ in 0..MAX_WRITE_ATTEMPTS {
                let Some(mut secret) = self.get_history().await? else {
                    if expected.is_some() {
                        return Err(conflict());
                    }
                    let object = self.history_secret();
                    let target = self.history_target();
                    match self
                        .create_object(&object, &target, key.clone(), bytes.to_vec())
                        .await?
                    {
                        Created::Yes => return Ok(version),
                        Created::Raced => continue,
                    }
                };
                let found = data_of(&secret, &key).map(crate::history::content_version);
                if found != expected {
                    return Err(conflict());
                }
                let data = secret.data.get_or_insert_with(BTreeMap::new);
                data.insert(key.clone(), ByteString(bytes.to_vec()));
                // Every credential's history shares this Secret, each
                // within an equal share of it: refused here, the history
                // module keeps fewer of this credential's entries (a bound
                // in bytes besides `history_limit`) instead of the API
                // server refusing the Secret for every credential.
                let share = HISTORY_SECRET_BYTES / data.len();
                if bytes.len() > share {
                    return Err(StoreError::TooLarge {
                        target: format!("{} key {key}", self.history_target()),
                        size: bytes.len(),
                        limit: share,
                    });
                }
                match bounded(
                    self.timeout,
                    self.secrets
                        .replace(&self.history_secret(), &PostParams::default(), &secret),
                )
                .await
                {
                    Ok(_) => return Ok(version),
                    Err(e) if matches!(api_code(&e), Some(404 | 409)) => continue,
                    Err(e) => {
                        return Err(StoreError::Unavailable {
                            target: self.history_target(),
                            reason: describe_api_error(&e),
                        });
                    }
                }
            }
            Err(StoreError::Unavailable {
                target: self.history_target(),
                reason: format!(
                    "still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"
                ),
            })
        })
    }

    fn claim<'a>(
        &'a self,
        name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn super::Claim>>, StoreError>> {
        Box::pin(async move {
            let claimed = self.claims.claim(name, wait).await?;
            Ok(claimed.map(|c| Box::new(c) as Box<dyn super::Claim>))
        })
    }

    /// A dry-run replace (`?dryRun=All`) of the Secret as it is: the API
    /// server runs authentication, RBAC (`update`), admission and validation
    /// exactly as for a real write, and persists nothing. A mere GET would
    /// prove only `get`. Without the Secret, a dry-run create proves that the
    /// first write (which creates it) will be accepted.
    fn check_writable<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dry_run = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let result = match self.get().await? {
                Some(secret) => {
                    bounded(
                        self.timeout,
                        self.secrets.replace(&self.secret, &dry_run, &secret),
                    )
                    .await
                }
                None => {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.secret.clone()),
                            ..ObjectMeta::default()
                        },
                        type_: Some("Opaque".into()),
                        ..Secret::default()
                    };
                    bounded(self.timeout, self.secrets.create(&dry_run, &secret)).await
                }
            };
            result.map(|_| ()).map_err(|e| self.unavailable(e))
        })
    }

    fn load<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        Box::pin(async move {
            let Some(secret) = self.get().await? else {
                return Ok(None);
            };
            Ok(self
                .entry(&secret, name)?
                .map(|(version, value)| Versioned { version, value }))
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let version = expected.map_or(1, |v| v + 1);
            let bytes = record::encode(record, version);
            let conflict = || StoreError::Conflict {
                name: name.to_string(),
                expected,
            };
            for _ in 0..MAX_WRITE_ATTEMPTS {
                let Some(mut secret) = self.get().await? else {
                    if expected.is_some() {
                        return Err(conflict());
                    }
                    match self.create(name, bytes.clone()).await? {
                        Created::Yes => return Ok(version),
                        Created::Raced => continue,
                    }
                };
                let found = self.entry(&secret, name)?.map(|(v, _)| v);
                if found != expected {
                    return Err(conflict());
                }
                // `secret` keeps the resourceVersion it was read at: the
                // server refuses the replace if anyone wrote since.
                secret
                    .data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(data_key(name), ByteString(bytes.clone()));
                match bounded(
                    self.timeout,
                    self.secrets
                        .replace(&self.secret, &PostParams::default(), &secret),
                )
                .await
                {
                    Ok(_) => return Ok(version),
                    // Another writer of the Secret (maybe for another
                    // credential) got in first: read again and re-decide.
                    Err(e) if api_code(&e) == Some(409) => continue,
                    // Deleted since we read it: the next round creates it.
                    Err(e) if api_code(&e) == Some(404) => continue,
                    Err(e) => return Err(self.unavailable(e)),
                }
            }
            Err(StoreError::Unavailable {
                target: self.target(),
                reason: format!(
                    "still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_objects_are_withheld_from_api_messages_names_are_not() {
        let message = r#"secrets "rekeyd-state" is invalid: {"data":{"maps.json":"eyJjdXJyZW50Ijp7InZhbHVlIjoiczNjcjN0In19"}} and eyJhbGciOi.eyJzdWIiOiJ4In0.c2lnbmF0dXJlMTIz; User "system:serviceaccount:apps:rekeyd" cannot update"#;
        assert_eq!(
            withhold_opaque_runs(message),
            r#"secrets "rekeyd-state" is invalid: {"data":{"maps.json":"[withheld]"}} and [withheld]; User "system:serviceaccount:apps:rekeyd" cannot update"#
        );
    }

    #[test]
    fn api_messages_are_one_bounded_printable_line() {
        let status = |reason: &str, message: String| {
            kube::Error::Api(Box::new(kube::core::Status {
                code: 422,
                reason: reason.to_string(),
                message,
                ..Default::default()
            }))
        };
        let text = describe_api_error(&status(
            "Invalid\n",
            format!(
                "denied\nlevel=INFO forged line \u{1b}[2J{}",
                "x ".repeat(3000)
            ),
        ));
        assert!(
            text.starts_with("422 Invalid?: denied?level=INFO forged line ?[2Jx x"),
            "{text}"
        );
        assert!(text.len() < 1100, "{}", text.len());
        assert!(text.chars().all(|c| c == ' ' || c.is_ascii_graphic()));
    }
}
