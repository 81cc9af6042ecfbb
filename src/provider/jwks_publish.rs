//! A `private_key_jwt` client's public keys published as a JWK Set (RFC
//! 7517 §5) where the authorization server fetches them: the client's
//! `jwks_uri` (RFC 7591 §2, OpenID Connect Core §10.1.1 "the Client can
//! add new keys to the JWK Set at its jwks_uri ... and remove the old
//! keys after a grace period").
//!
//! `[credentials.jwks]` names the places: a file rekeyd writes (served
//! at `serve_path` on the diagnostics listener, or by any web server),
//! and/or the data key `jwks.json` of a Kubernetes Secret (mounted into a
//! web server's pod). [`JwksKeys`] is the [`SecretApi`] of a key rotation
//! there: its listing is the published keys (by thumbprint), `create`
//! adds the new public key next to the others and `delete` withdraws one.
//! Each write reads the set just before and leaves it alone when it
//! already says what is wanted, so every step is idempotent (a retry after
//! a lost write or a crash writes nothing new), and a write that would
//! leave no key is refused (I1). Only public members ever leave the
//! private JWK ([`super::key::ClientKey::public_jwk`]).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::registration::KEY_CAPABILITIES;
use super::{
    Capabilities, CreateRequest, Deleted, ErrorKind, NewSecret, ProviderError, RemoteSecret,
    SecretApi, jwks,
};
use crate::config::{JwksConfig, SecretSink};
use crate::store::kubernetes::{api_code, bounded, cluster_config, describe_api_error};
use crate::token::Token;

/// Mode of a JWKS file: public keys, readable by the web server.
pub const JWKS_FILE_MODE: u32 = 0o644;

/// How long one Kubernetes API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Read-modify-write rounds of a Secret under concurrent writers (each
/// lost round is a `409 Conflict` on the stale `resourceVersion`).
const MAX_WRITE_ATTEMPTS: u32 = 5;

const PUBLISH: &str = "jwks publish";
const WITHDRAW: &str = "jwks withdraw";
const READ: &str = "jwks read";

/// The edit of one write: the set as read (`None`: the file or Secret key
/// does not exist) to the set to write, `None` to leave it as it is.
type Edit<'a> = &'a (dyn Fn(Option<&Value>) -> Result<Option<Value>, ProviderError> + Sync);

/// One place the set is published.
enum Target {
    File(PathBuf),
    /// Boxed: the API client is large, a file path small.
    Secret(Box<SecretTarget>),
}

/// The data key [`crate::config::JWKS_SECRET_KEY`] of a Secret; the API
/// client is built on first use (building needs the runtime, the
/// provider set-up does not have it).
struct SecretTarget {
    sink: SecretSink,
    api: OnceCell<(Api<Secret>, String)>,
}

/// The key publisher of one credential: every place of its
/// `[credentials.jwks]`, written in order (file first).
pub struct JwksKeys {
    client_id: String,
    targets: Vec<Target>,
}

impl JwksKeys {
    /// The publisher of `config` (completed by the configuration's
    /// validation: a `serve_path` has its file). Contacts nothing.
    pub fn new(client_id: String, config: &JwksConfig) -> JwksKeys {
        let mut targets = Vec::new();
        if let Some(file) = &config.file {
            targets.push(Target::File(file.clone()));
        }
        if let Some(sink) = &config.kubernetes_secret {
            targets.push(Target::Secret(Box::new(SecretTarget {
                sink: sink.clone(),
                api: OnceCell::new(),
            })));
        }
        JwksKeys { client_id, targets }
    }

    /// Publishes the public parts of `keys` (private JWKs, in the order
    /// of the set: the keys the journal holds as published, the current
    /// one among them) wherever no set exists yet, so that a fresh install
    /// serves its bootstrap key. A set that exists is left alone: after
    /// the first start it is the rotation's to change. Returns whether
    /// anything was written (never, for no keys).
    ///
    /// A place added while a rotation is unfinished must get the
    /// rotation's keys too, not only the current one: given only the
    /// current key while a new key awaits its proof, the new place would
    /// lack the key the rotation then promotes, and withdrawing the old
    /// key would leave that place's set empty, which is refused on every
    /// run.
    pub async fn publish_initial(&self, keys: &[&SecretString]) -> Result<bool, ProviderError> {
        let mut public = Vec::with_capacity(keys.len());
        for key in keys {
            public.push(jwks::public_of(PUBLISH, Some(key))?.1);
        }
        if public.is_empty() {
            return Ok(false);
        }
        let edit = |set: Option<&Value>| -> Result<Option<Value>, ProviderError> {
            Ok(match set {
                None => Some(json!({ "keys": public.clone() })),
                Some(_) => None,
            })
        };
        let mut written = false;
        for target in &self.targets {
            written |= target.edit(PUBLISH, &edit).await?;
        }
        Ok(written)
    }

    /// The ids (thumbprints) of the keys published in every place. A key
    /// only some places hold is not listed: after a publish interrupted
    /// between two places it is published again (idempotently: the places
    /// that hold it are left alone) rather than taken as done, while a
    /// withdrawal interrupted between them is repeated anyway, because the
    /// machine deletes again a retired key it has seen listed (S7
    /// `confirmed`).
    pub async fn published_ids(&self) -> Result<Vec<String>, ProviderError> {
        let mut everywhere: Option<Vec<String>> = None;
        for target in &self.targets {
            let here = match target.read(READ).await? {
                Some(set) => jwks::ids(&set),
                None => Vec::new(),
            };
            everywhere = Some(match everywhere {
                None => here,
                Some(so_far) => so_far.into_iter().filter(|id| here.contains(id)).collect(),
            });
        }
        Ok(everywhere.unwrap_or_default())
    }
}

impl Target {
    /// Where it is, for errors (never its content).
    fn describe(&self) -> String {
        match self {
            Target::File(path) => format!("JWKS file {}", path.display()),
            Target::Secret(s) => {
                // The namespace the client resolved, once it is built.
                let namespace = (s.api.get().map(|(_, ns)| ns.as_str()))
                    .or(s.sink.namespace.as_deref())
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                format!("JWKS Secret {namespace}{}[{}]", s.sink.secret, s.sink.key)
            }
        }
    }

    fn failure(&self, operation: &'static str, kind: ErrorKind, reason: String) -> ProviderError {
        ProviderError {
            kind,
            operation,
            status: None,
            code: None,
            detail: format!("{}: {reason}", self.describe()),
            retry_after: None,
        }
    }

    /// The set as published; `None` when there is none yet.
    async fn read(&self, operation: &'static str) -> Result<Option<Value>, ProviderError> {
        match self {
            Target::File(path) => self.read_file(operation, path),
            Target::Secret(s) => {
                let (api, _) = s.api(self, operation).await?;
                let secret = bounded(REQUEST_TIMEOUT, api.get_opt(&s.sink.secret))
                    .await
                    .map_err(|e| self.api_failure(operation, &e))?;
                match secret.as_ref().and_then(|x| secret_set(x, &s.sink.key)) {
                    None => Ok(None),
                    Some(bytes) => self.parse(operation, bytes).map(Some),
                }
            }
        }
    }

    fn read_file(
        &self,
        operation: &'static str,
        path: &Path,
    ) -> Result<Option<Value>, ProviderError> {
        match std::fs::read(path) {
            Ok(bytes) => self.parse(operation, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(self.failure(operation, ErrorKind::Transient, format!("cannot read: {e}")))
            }
        }
    }

    /// A set rekeyd cannot read is not overwritten: someone else's file
    /// (or a wrong path) needs an operator. Nor is a set that holds a
    /// private key (a set written by hand from the private JWK): I7,
    /// every write would carry it on into a file of mode 0644, and it
    /// must not count as published.
    fn parse(&self, operation: &'static str, bytes: &[u8]) -> Result<Value, ProviderError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(set) if set.get("keys").is_some_and(Value::is_array) => {
                if jwks::holds_private_member(&set) {
                    return Err(self.failure(
                        operation,
                        ErrorKind::Refused,
                        format!(
                            "holds a private key member ({}): a published set holds public keys \
                             only; remove the private members (`rekeyd status --json` shows the \
                             public_jwk) and keep the private key away from it",
                            jwks::PRIVATE_MEMBERS.join(", ")
                        ),
                    ));
                }
                Ok(set)
            }
            _ => Err(self.failure(
                operation,
                ErrorKind::Refused,
                "holds no JWK Set ({\"keys\": [...]}); rekeyd does not overwrite it".into(),
            )),
        }
    }

    fn api_failure(&self, operation: &'static str, e: &kube::Error) -> ProviderError {
        let kind = match api_code(e) {
            Some(401) => ErrorKind::Rejected,
            Some(403) | Some(422) => ErrorKind::Refused,
            _ => ErrorKind::Transient,
        };
        self.failure(operation, kind, describe_api_error(e))
    }

    /// Reads the set, applies `edit` and writes the result: `Ok(true)`
    /// when something was written. A Secret is replaced at the
    /// `resourceVersion` it was read at, so a concurrent writer's change
    /// is never lost: a `409 Conflict` reads again and edits anew.
    async fn edit(&self, operation: &'static str, edit: Edit<'_>) -> Result<bool, ProviderError> {
        match self {
            Target::File(path) => {
                let current = self.read_file(operation, path)?;
                let Some(set) = edit(current.as_ref())? else {
                    return Ok(false);
                };
                write_file(path, &set).map_err(|e| {
                    self.failure(
                        operation,
                        ErrorKind::Transient,
                        format!("cannot write: {e}"),
                    )
                })?;
                Ok(true)
            }
            Target::Secret(s) => {
                let (api, namespace) = s.api(self, operation).await?;
                for _ in 0..MAX_WRITE_ATTEMPTS {
                    let current = bounded(REQUEST_TIMEOUT, api.get_opt(&s.sink.secret))
                        .await
                        .map_err(|e| self.api_failure(operation, &e))?;
                    let set = match current.as_ref().and_then(|x| secret_set(x, &s.sink.key)) {
                        None => None,
                        Some(bytes) => Some(self.parse(operation, bytes)?),
                    };
                    let Some(set) = edit(set.as_ref())? else {
                        return Ok(false);
                    };
                    let bytes = serde_json::to_vec_pretty(&set).expect("a JSON value serializes");
                    let creating = current.is_none();
                    let result = match current {
                        None => {
                            let secret = Secret {
                                metadata: ObjectMeta {
                                    name: Some(s.sink.secret.clone()),
                                    namespace: Some(namespace.clone()),
                                    labels: Some(
                                        [(
                                            "app.kubernetes.io/managed-by".to_string(),
                                            "rekeyd".to_string(),
                                        )]
                                        .into(),
                                    ),
                                    ..Default::default()
                                },
                                data: Some([(s.sink.key.clone(), ByteString(bytes))].into()),
                                ..Default::default()
                            };
                            bounded(REQUEST_TIMEOUT, api.create(&PostParams::default(), &secret))
                                .await
                        }
                        Some(mut secret) => {
                            // Keeps the resourceVersion it was read at.
                            secret
                                .data
                                .get_or_insert_with(Default::default)
                                .insert(s.sink.key.clone(), ByteString(bytes));
                            if let Some(string_data) = secret.string_data.as_mut() {
                                string_data.remove(&s.sink.key);
                            }
                            bounded(
                                REQUEST_TIMEOUT,
                                api.replace(&s.sink.secret, &PostParams::default(), &secret),
                            )
                            .await
                        }
                    };
                    match result {
                        Ok(_) => return Ok(true),
                        // Written by someone else since the read (409), or
                        // deleted (404): read again and edit that.
                        Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => continue,
                        Err(e) if creating && api_code(&e) == Some(403) => {
                            return Err(self.failure(
                                operation,
                                ErrorKind::Refused,
                                format!(
                                    "{}; the Secret does not exist and this account may not create it: \
                                     create it beforehand (an empty Secret will do)",
                                    describe_api_error(&e)
                                ),
                            ));
                        }
                        Err(e) => return Err(self.api_failure(operation, &e)),
                    }
                }
                Err(self.failure(
                    operation,
                    ErrorKind::Transient,
                    format!("still changing under concurrent writers after {MAX_WRITE_ATTEMPTS} attempts"),
                ))
            }
        }
    }
}

impl SecretTarget {
    /// The API client and namespace, built once.
    async fn api(
        &self,
        target: &Target,
        operation: &'static str,
    ) -> Result<&(Api<Secret>, String), ProviderError> {
        self.api
            .get_or_try_init(|| async {
                let (mut config, _) = cluster_config(self.sink.kubeconfig.as_deref())
                    .await
                    .map_err(|e| target.failure(operation, ErrorKind::Transient, e.to_string()))?;
                config.connect_timeout = Some(REQUEST_TIMEOUT);
                config.read_timeout = Some(REQUEST_TIMEOUT);
                config.write_timeout = Some(REQUEST_TIMEOUT);
                let namespace = (self.sink.namespace.clone())
                    .unwrap_or_else(|| config.default_namespace.clone());
                let client = Client::try_from(config).map_err(|e| {
                    target.failure(
                        operation,
                        ErrorKind::Transient,
                        format!("cannot build the Kubernetes API client: {e}"),
                    )
                })?;
                Ok((Api::namespaced(client, &namespace), namespace))
            })
            .await
    }
}

/// The set's bytes in a Secret (`data`, else `stringData` as some tools
/// leave it).
fn secret_set<'s>(secret: &'s Secret, key: &str) -> Option<&'s [u8]> {
    (secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice()))
    .or_else(|| {
        (secret.string_data.as_ref())
            .and_then(|d| d.get(key))
            .map(|s| s.as_bytes())
    })
}

/// Writes `set` to `path` atomically and durably (a web server never
/// serves half a set, and a set a rotation acted on survives a power
/// loss), creating its directory (mode 0755) if need be.
fn write_file(path: &Path, set: &Value) -> io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(set).expect("a JSON value serializes");
    bytes.push(b'\n');
    crate::fsutil::write_atomic(path, &bytes, JWKS_FILE_MODE)
}

/// A withdrawal that would leave no key is refused: I1, the machine
/// withdraws a key only once another is proven, so an emptied set means
/// the published set is not what the journal says.
fn refuse_empty(id: &str) -> ProviderError {
    ProviderError {
        kind: ErrorKind::Refused,
        operation: WITHDRAW,
        status: None,
        code: None,
        detail: format!(
            "withdrawing key {id} would leave the JWK Set without a key; nothing was changed"
        ),
        retry_after: None,
    }
}

impl SecretApi for JwksKeys {
    fn capabilities(&self) -> Capabilities {
        KEY_CAPABILITIES
    }

    fn list<'a>(
        &'a self,
        _bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(async move { Ok(jwks::listing(self.published_ids().await?, &self.client_id)) })
    }

    fn create<'a>(
        &'a self,
        _bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(async move {
            let (id, public) = jwks::public_of(PUBLISH, request.value)?;
            let edit = |set: Option<&Value>| -> Result<Option<Value>, ProviderError> {
                let empty = json!({ "keys": [] });
                Ok(jwks::with_key(set.unwrap_or(&empty), &public))
            };
            for target in &self.targets {
                target.edit(PUBLISH, &edit).await?;
            }
            Ok(NewSecret {
                id: Some(id),
                value: request.value.cloned().expect("public_of checked it"),
                expires_at: None,
                registration_access_token: None,
            })
        })
    }

    fn delete<'a>(
        &'a self,
        _bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(async move {
            let edit = |set: Option<&Value>| -> Result<Option<Value>, ProviderError> {
                let Some(left) = set.and_then(|set| jwks::without(set, id)) else {
                    return Ok(None);
                };
                if jwks::ids(&left).is_empty() {
                    return Err(refuse_empty(id));
                }
                Ok(Some(left))
            };
            let mut deleted = false;
            for target in &self.targets {
                deleted |= target.edit(WITHDRAW, &edit).await?;
            }
            Ok(if deleted {
                Deleted::Deleted
            } else {
                Deleted::NotFound
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::key::{Alg, generate};

    fn bearer() -> Token {
        Token::new(
            SecretString::from("unused".to_string()),
            "Bearer".into(),
            None,
            Duration::from_secs(60),
        )
    }

    fn file_keys(path: &Path) -> JwksKeys {
        JwksKeys::new(
            "c".into(),
            &JwksConfig {
                file: Some(path.to_path_buf()),
                serve_path: None,
                kubernetes_secret: None,
            },
        )
    }

    fn published(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_file_gets_the_bootstrap_key_then_a_second_then_loses_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/jwks.json");
        let keys = file_keys(&path);
        let old = generate(Alg::Es256).unwrap();
        let new = generate(Alg::Es256).unwrap();

        assert!(keys.publish_initial(&[&old.to_secret()]).await.unwrap());
        assert!(
            !keys.publish_initial(&[&new.to_secret()]).await.unwrap(),
            "an existing set is the rotation's"
        );
        assert_eq!(jwks::ids(&published(&path)), [old.thumbprint()]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, JWKS_FILE_MODE);

        let request = CreateRequest {
            description: "",
            value: Some(&new.to_secret()),
        };
        let created = keys.create(&bearer(), request).await.unwrap();
        assert_eq!(created.id, Some(new.thumbprint()));
        keys.create(&bearer(), request).await.unwrap();
        assert_eq!(
            jwks::ids(&published(&path)),
            [old.thumbprint(), new.thumbprint()]
        );
        let listed: Vec<String> = (keys.list(&bearer()).await.unwrap())
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(listed, [old.thumbprint(), new.thumbprint()]);

        assert_eq!(
            keys.delete(&bearer(), &old.thumbprint()).await.unwrap(),
            Deleted::Deleted
        );
        assert_eq!(
            keys.delete(&bearer(), &old.thumbprint()).await.unwrap(),
            Deleted::NotFound
        );
        let set = published(&path);
        assert_eq!(jwks::ids(&set), [new.thumbprint()]);
        assert!(set["keys"][0].get("d").is_none(), "public members only");

        let e = keys.delete(&bearer(), &new.thumbprint()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert_eq!(
            jwks::ids(&published(&path)),
            [new.thumbprint()],
            "nothing changed"
        );
    }

    #[tokio::test]
    async fn a_new_place_gets_every_key_given_in_order_and_none_for_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let keys = file_keys(&path);
        assert!(!keys.publish_initial(&[]).await.unwrap());
        assert!(!path.exists(), "no keys: no set");
        let (current, pending) = (generate(Alg::Es256).unwrap(), generate(Alg::Es256).unwrap());
        assert!(
            keys.publish_initial(&[&current.to_secret(), &pending.to_secret()])
                .await
                .unwrap()
        );
        assert_eq!(
            jwks::ids(&published(&path)),
            [current.thumbprint(), pending.thumbprint()]
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_set_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, "<html>").unwrap();
        let keys = file_keys(&path);
        let key = generate(Alg::Es256).unwrap();
        let request = CreateRequest {
            description: "",
            value: Some(&key.to_secret()),
        };
        let e = keys.create(&bearer(), request).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(e.to_string().contains("jwks.json"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"<html>");
    }

    #[tokio::test]
    async fn a_key_counts_as_published_only_where_every_place_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        let keys = JwksKeys {
            client_id: "c".into(),
            targets: vec![Target::File(a.clone()), Target::File(b.clone())],
        };
        let old = generate(Alg::Es256).unwrap();
        let new = generate(Alg::Es256).unwrap();
        let listed = || async {
            (keys.list(&bearer()).await.unwrap())
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        };
        assert!(keys.publish_initial(&[&old.to_secret()]).await.unwrap());
        assert_eq!(listed().await, [old.thumbprint()]);

        // A publish interrupted after the first place: not listed, so the
        // resumed rotation publishes again, which completes the second.
        let both = json!({"keys": [old.public_jwk(), new.public_jwk()]});
        write_file(&a, &both).unwrap();
        assert_eq!(listed().await, [old.thumbprint()]);
        let request = CreateRequest {
            description: "",
            value: Some(&new.to_secret()),
        };
        keys.create(&bearer(), request).await.unwrap();
        assert_eq!(published(&a), both, "the first place is left alone");
        assert_eq!(
            jwks::ids(&published(&b)),
            [old.thumbprint(), new.thumbprint()]
        );
        assert_eq!(listed().await, [old.thumbprint(), new.thumbprint()]);

        // A withdrawal interrupted after the first place: repeating it
        // completes the second.
        write_file(&a, &json!({"keys": [new.public_jwk()]})).unwrap();
        assert_eq!(listed().await, [new.thumbprint()]);
        assert_eq!(
            keys.delete(&bearer(), &old.thumbprint()).await.unwrap(),
            Deleted::Deleted
        );
        assert_eq!(jwks::ids(&published(&b)), [new.thumbprint()]);
    }
}
