//! Configuration: the TOML file (plus `REKEYD__...` environment overrides)
//! is read into raw serde structs that reject unknown keys, then validated
//! into a typed [`Config`]. Every validation error names the key it is about,
//! so an operator can fix the file without reading our source.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rekeyd/rekeyd.toml";
/// Default listen address of the local API when `[api]` gives none.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9860";
/// Default cap on the open connections of the token API (`max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default cap of the diagnostics listener: probes and a scraper or two.
/// With the API's, it fits the common soft RLIMIT_NOFILE of 1024 without
/// being lowered (see `serve::http::connection_caps`).
pub const DEFAULT_DIAG_MAX_CONNECTIONS: usize = 64;
/// Default time a client has to send a request's head, from its first byte
/// (`header_timeout`).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a request may take from its first byte until its response
/// is written (`request_timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may wait for its next request (`idle_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of every listener timeout: beyond it a stuck client holds a
/// connection for no client's benefit.
pub const MAX_LISTENER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default grace period between promoting a new secret and deleting the old one.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(30);
/// An old secret kept longer than this defeats the point of rotating.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(30 * 86400);
/// Default mode of token files: readable by the owner only (I7).
pub const DEFAULT_SINK_MODE: u32 = 0o600;
/// Lifetime of a token whose reply has neither `expires_in` (RFC 6749 §5.1
/// only recommends it) nor a JWT `exp`: `refresh.default_lifetime`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Default shortest time between two forced logins of one credential
/// (`refresh.min_forced_interval`): applications asking for a fresh token
/// in a crash loop cost the provider one login per interval at most.
pub const DEFAULT_MIN_FORCED_INTERVAL: Duration = Duration::from_secs(5);
/// Upper bound of `refresh.min_forced_interval`.
pub const MAX_MIN_FORCED_INTERVAL: Duration = Duration::from_secs(3600);
/// Shortest token lifetime rekeyd accepts, from a reply or as the default:
/// a token that lives less than a second is expired by the time sinks and
/// hooks have it, and refreshing it would spin.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load config {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// A setting that is valid but probably not what the operator meant.
/// `rekeyd check` prints each one and `rekeyd run` logs it at WARN; neither
/// stops. A warning names keys, paths and client ids, never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The key the warning is about, e.g. `credentials[1].client_id`.
    pub key: String,
    /// What looks wrong and why it matters.
    pub reason: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.reason)
    }
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Raw shape of the file. Strings where the value needs validation, so that the
// error can say which key was wrong and why.
// ---------------------------------------------------------------------------

/// A value whose meaning depends on how the file wrote it. The `config`
/// crate hands a TOML number to a `String` field as its decimal text, so
/// `mode = 0o640` would arrive as "416" and be read as octal text, and an
/// error would quote a number the operator never wrote. Keys that take a
/// number, a unit or a name deserialize into this instead, and validation
/// decides what each kind means for that key.
#[derive(Debug, Clone, PartialEq)]
enum RawScalar {
    /// A TOML integer: the number itself, whatever base it was written in.
    Integer(i64),
    Text(String),
    /// Any other kind, named for the error ("a float", "a boolean", ...).
    Other(&'static str),
}

impl<'de> Deserialize<'de> for RawScalar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawScalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawScalar, E> {
                Ok(RawScalar::Integer(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawScalar, E> {
                Ok(i64::try_from(v)
                    .map_or(RawScalar::Other("an integer too large"), RawScalar::Integer))
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawScalar, E> {
                Ok(RawScalar::Other("a floating-point number"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<RawScalar, E> {
                Ok(RawScalar::Other("a boolean"))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawScalar, E> {
                Ok(RawScalar::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<RawScalar, E> {
                Ok(RawScalar::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawScalar, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RawScalar::Other("a list"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawScalar, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(RawScalar::Other("a table"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A boolean key's value: `true` or `false` only. The `config` crate would
/// otherwise read `1`, `"yes"` or `"on"` as `true`, and these keys are
/// opt-ins to exposure (`allow_non_loopback`, `allow_insecure_http`) or to
/// a rotation at every login: each must be written as the boolean it is.
/// Anything else is the usual type error, by key and kind of value.
fn strict_bool<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct Visitor;
    impl Visitor {
        // The kind of value, never the value: it may hold a secret.
        fn refuse<E: serde::de::Error>(kind: &str) -> Result<bool, E> {
            Err(E::custom(format!("expected a boolean, found {kind}")))
        }
    }
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<bool, E> {
            Self::refuse("an integer")
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<bool, E> {
            Self::refuse("an integer")
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<bool, E> {
            Self::refuse("a floating-point number")
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<bool, E> {
            Self::refuse("a string")
        }
    }
    deserializer.deserialize_any(Visitor)
}

/// A text key's value: a TOML string only. The `config` crate would hand
/// a number to a string field as its decimal text (`client_id = 0x10`
/// arriving as "16"), a name the operator never wrote. Anything else is
/// the usual type error, by key and kind of value, never the value (an
/// `extra_params` value may be an assertion).
fn strict_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    deserializer.deserialize_any(StrictString).map(Some)
}

/// [`strict_string`] for every value of a table (`extra_params`).
fn strict_strings<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct Values;
    impl<'de> serde::de::Visitor<'de> for Values {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table of strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                let value = map.next_value_seed(StrictString)?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Values)
}

struct StrictString;

impl StrictString {
    // The kind of value, never the value: it may hold a secret.
    fn refuse<E: serde::de::Error>(kind: &str) -> Result<String, E> {
        Err(E::custom(format!("expected a string, found {kind}")))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictString {
    type Value = String;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictString {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_string<E>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
        Self::refuse("an integer")
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
        Self::refuse("an integer")
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
        Self::refuse("a floating-point number")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
        Self::refuse("a boolean")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Self::refuse("a sequence")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Self::refuse("a map")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    api: Option<RawApi>,
    diag: Option<RawDiag>,
    log: Option<RawLog>,
    store: Option<RawStore>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
}

/// `[store]`: flat, with the settings of every kind side by side; validation
/// rejects a setting that does not belong to the chosen kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    claim_ttl: Option<RawScalar>,
    /// Every kind: entries kept in each credential's rotation history.
    history_limit: Option<RawScalar>,
    // kubernetes
    namespace: Option<String>,
    secret: Option<String>,
    lease: Option<String>,
    kubeconfig: Option<PathBuf>,
    // etcd
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    key_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "strict_bool")]
    allow_non_loopback: bool,
    // The limits of every listener; spelled out in each section because
    // serde's `flatten` cannot be combined with `deny_unknown_fields`.
    max_connections: Option<RawScalar>,
    header_timeout: Option<RawScalar>,
    request_timeout: Option<RawScalar>,
    idle_timeout: Option<RawScalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiag {
    listen: Option<String>,
    max_connections: Option<RawScalar>,
    header_timeout: Option<RawScalar>,
    request_timeout: Option<RawScalar>,
    idle_timeout: Option<RawScalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    #[serde(default, deserialize_with = "strict_string")]
    name: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    provider: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    client_id: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    customer_id: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    org_url: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    app_id: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    domain: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    realm: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    client_uuid: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    tenant: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    application_object_id: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    secret_api_credential: Option<String>,
    initial_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "strict_string")]
    initial_secret_credential: Option<String>,
    initial_key_file: Option<PathBuf>,
    client_assertion_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "strict_string")]
    assertion_audience: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    initial_secret_id: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    scope: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    audience: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    auth_method: Option<String>,
    #[serde(default, deserialize_with = "strict_strings")]
    extra_params: BTreeMap<String, String>,
    endpoints: Option<RawEndpoints>,
    registration: Option<RawRegistration>,
    jwks: Option<RawJwks>,
    refresh: Option<RawRefresh>,
    rotation: Option<RawRotation>,
    #[serde(default)]
    sinks: Vec<RawSink>,
    #[serde(default)]
    hooks: Vec<RawHook>,
    #[serde(default)]
    tokens: Vec<RawTokenProfile>,
}

/// One `[[credentials.tokens]]` table: another token of the credential's
/// client, with its own request parameters and sinks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenProfile {
    #[serde(default, deserialize_with = "strict_string")]
    name: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    scope: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    audience: Option<String>,
    #[serde(default, deserialize_with = "strict_strings")]
    extra_params: BTreeMap<String, String>,
    #[serde(default)]
    sinks: Vec<RawSink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    #[serde(default)]
    on: Vec<String>,
    command: Option<Vec<String>>,
    timeout: Option<RawScalar>,
    signal: Option<RawScalar>,
    pid_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    token_url: Option<String>,
    secrets_url: Option<String>,
    #[serde(default, deserialize_with = "strict_bool")]
    allow_insecure_http: bool,
    connect_timeout: Option<RawScalar>,
    request_timeout: Option<RawScalar>,
}

/// `[credentials.registration]`: RFC 7592 client registration management.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistration {
    #[serde(default, deserialize_with = "strict_string")]
    client_uri: Option<String>,
    access_token_file: Option<PathBuf>,
}

/// `[credentials.jwks]`: where a `private_key_jwt` client's public keys
/// are published for a server that fetches its `jwks_uri`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwks {
    file: Option<PathBuf>,
    #[serde(default, deserialize_with = "strict_string")]
    serve_path: Option<String>,
    #[serde(default, deserialize_with = "strict_string")]
    kubernetes_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    before_expiry: Option<RawScalar>,
    default_lifetime: Option<RawScalar>,
    min_forced_interval: Option<RawScalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    every: Option<RawScalar>,
    schedule: Option<String>,
    grace: Option<RawScalar>,
    #[serde(default, deserialize_with = "strict_bool")]
    on_login: bool,
    max_secret_age: Option<RawScalar>,
    before_expiry: Option<RawScalar>,
    verify_window: Option<RawScalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    kind: Option<String>,
    format: Option<String>,
    /// `format = "env"`.
    variable: Option<String>,
    /// `format = "template"`.
    template: Option<PathBuf>,
    // kind = "file"
    path: Option<PathBuf>,
    mode: Option<RawScalar>,
    owner: Option<RawScalar>,
    group: Option<RawScalar>,
    // kind = "kubernetes-secret"
    secret: Option<String>,
    key: Option<String>,
    namespace: Option<String>,
    kubeconfig: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub api: Option<ApiConfig>,
    pub diag: Option<DiagConfig>,
    pub log: LogConfig,
    pub store: StoreConfig,
    /// `[store] history_limit`: entries kept in each credential's rotation
    /// history ([`crate::history`]), a truncation marker included.
    pub history_limit: usize,
    pub credentials: Vec<CredentialConfig>,
}

/// The file store's directory under `state_dir` (one record, history and
/// lock file per credential): only the store writes there.
pub const FILE_STORE_DIR: &str = "credentials";

/// How long a rotation claim outlives a holder that stopped renewing it.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(15);

/// Where credential records (secret and rotation journal) are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// One file per credential under `state_dir`: a single host.
    #[default]
    File,
    /// One Secret shared by the replicas of a Kubernetes workload.
    Kubernetes(KubernetesStoreConfig),
    /// Keys in an etcd cluster shared by a fleet of hosts.
    Etcd(EtcdStoreConfig),
}

impl StoreConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::File => "file",
            StoreConfig::Kubernetes(_) => "kubernetes",
            StoreConfig::Etcd(_) => "etcd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesStoreConfig {
    /// `None`: the pod's own namespace (in cluster) or the kubeconfig's.
    pub namespace: Option<String>,
    /// The Secret holding every credential's record, one data key each.
    pub secret: String,
    /// The `coordination.k8s.io` Lease a replica holds while it rotates.
    pub lease: String,
    /// `None`: in-cluster configuration, else `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub claim_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdStoreConfig {
    /// Client URLs, all `http://host:port` or all `https://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix: records under `<prefix>/credentials/`, claims under
    /// `<prefix>/claims/`.
    pub prefix: String,
    pub claim_ttl: Duration,
    /// TLS to the members: `Some` exactly when the endpoints are `https`.
    pub tls: Option<EtcdTls>,
    /// etcd authentication (a user and its password): `None` for a
    /// cluster without `auth enable`.
    pub auth: Option<EtcdAuth>,
}

/// TLS to etcd (`store.ca_file`, `store.cert_file`, `store.key_file`),
/// the files read when the configuration is loaded, so that `rekeyd
/// check` finds an unreadable one and a reload sees a replaced one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA certificate(s), PEM, the members' certificates must chain to
    /// (etcd's `--trusted-ca-file` side: the cluster's own CA, not the
    /// system's roots).
    pub ca_file: PathBuf,
    pub ca_pem: Vec<u8>,
    /// A client certificate, for members started with
    /// `--client-cert-auth`.
    pub client: Option<EtcdClientCert>,
}

/// `store.cert_file` and `store.key_file`: PEM, the key redacted in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdClientCert {
    pub cert_file: PathBuf,
    pub cert_pem: Vec<u8>,
    pub key_file: PathBuf,
    pub key_pem: SecretBytes,
}

/// `store.username` and the password read from `store.password_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password_file: PathBuf,
    pub password: SecretBytes,
}

/// The content of a secret file the configuration names (a private key, a
/// password): compared (a reload notices a changed file) but never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `[api]`: the token API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: ListenAddr,
    pub key_file: PathBuf,
    pub limits: ListenerLimits,
}

/// `[diag]`: the diagnostics listener (`/livez`, `/readyz`,
/// `/readyz/{name}`, `/metrics`; never a token), which may listen beyond
/// the host without a key. With it, the token API serves `/v1/...` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagConfig {
    pub listen: ListenAddr,
    pub limits: ListenerLimits,
}

/// What one listener allows its clients, so that no number of local
/// clients starves the daemon (see `serve::http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once; more are refused with 503 at once. The
    /// daemon may lower it at start-up to fit the file-descriptor limit.
    pub max_connections: usize,
    /// From the first byte of a request until its head is complete.
    pub header_timeout: Duration,
    /// From the first byte of a request until its response is written.
    pub request_timeout: Duration,
    /// How long a connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for ListenerLimits {
    /// The token API's defaults.
    fn default() -> Self {
        ListenerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    MapsIndoors,
    Mappls,
    OAuth2,
    /// Okta: a token from the org's authorization server, secrets through
    /// the apps API (`/api/v1/apps/{appId}/credentials/secrets`).
    Okta,
    /// Auth0: a token from `https://{domain}/oauth/token`, the secret set
    /// through the Management API (`PATCH /api/v2/clients/{client_id}`).
    Auth0,
    /// Keycloak: a token from the realm's OpenID Connect endpoint, the
    /// secret set through the admin REST API
    /// (`PUT /admin/realms/{realm}/clients/{id}`).
    Keycloak,
    /// Microsoft Entra ID: a token from the tenant's v2.0 endpoint, secrets
    /// through Microsoft Graph (`addPassword`, `removePassword`).
    Entra,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::MapsIndoors => "mapsindoors",
            ProviderKind::Mappls => "mappls",
            ProviderKind::OAuth2 => "oauth2",
            ProviderKind::Okta => "okta",
            ProviderKind::Auth0 => "auth0",
            ProviderKind::Keycloak => "keycloak",
            ProviderKind::Entra => "entra",
        }
    }

    /// Whether rekeyd can rotate this provider's secrets (it has a secret
    /// API rekeyd speaks).
    pub fn has_secret_api(self) -> bool {
        matches!(
            self,
            ProviderKind::MapsIndoors
                | ProviderKind::Okta
                | ProviderKind::Auth0
                | ProviderKind::Keycloak
                | ProviderKind::Entra
        )
    }

    fn default_token_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::MapsIndoors => Some("https://auth.mapsindoors.com/connect/token"),
            ProviderKind::Mappls => Some("https://outpost.mapmyindia.com/api/security/oauth/token"),
            ProviderKind::OAuth2
            | ProviderKind::Okta
            | ProviderKind::Auth0
            | ProviderKind::Keycloak
            | ProviderKind::Entra => None,
        }
    }

    fn default_secrets_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::MapsIndoors => Some("https://auth.mapsindoors.com/api/clientcredentials"),
            _ => None,
        }
    }
}

/// The provider-specific ids a credential's default URLs are derived from
/// (each overridable in `[credentials.endpoints]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderIds {
    /// Okta: `org_url` (`https://example.okta.com`) and the OAuth app's
    /// `app_id` (the application id, not the client id). Token URL
    /// `{org_url}/oauth2/v1/token`; secrets
    /// `{org_url}/api/v1/apps/{app_id}/credentials/secrets` (Okta Management
    /// API, "Application Client Auth Credentials").
    Okta { org_url: Url, app_id: String },
    /// Auth0: the tenant's `domain` (`example.eu.auth0.com`). Token URL
    /// `https://{domain}/oauth/token`; secret
    /// `https://{domain}/api/v2/clients/{client_id}` (Management API v2).
    Auth0 { domain: String },
    /// Keycloak: the server's `base_url` (`https://sso.example.com`, with
    /// any path prefix such as `/auth`), the `realm`, and the client's
    /// internal id `client_uuid` (not its client id). Token URL
    /// `{base_url}/realms/{realm}/protocol/openid-connect/token`; client
    /// `{base_url}/admin/realms/{realm}/clients/{client_uuid}` (Keycloak
    /// admin REST API).
    Keycloak {
        base_url: Url,
        realm: String,
        client_uuid: String,
    },
    /// Microsoft Entra ID: the `tenant` (id or domain) and the
    /// application's `application_object_id` (its object id, not its
    /// application/client id). Token URL
    /// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`;
    /// secrets `https://graph.microsoft.com/v1.0/applications/{application_object_id}`
    /// (Microsoft Graph v1.0, application resource).
    Entra {
        tenant: String,
        application_object_id: String,
    },
}

impl ProviderIds {
    /// Each id under its configuration key, as written (`rekeyd check`).
    pub fn fields(&self) -> Vec<(String, serde_json::Value)> {
        let pairs: Vec<(&str, &str)> = match self {
            ProviderIds::Okta { org_url, app_id } => {
                vec![("org_url", org_url.as_str()), ("app_id", app_id)]
            }
            ProviderIds::Auth0 { domain } => vec![("domain", domain)],
            ProviderIds::Keycloak {
                base_url,
                realm,
                client_uuid,
            } => vec![
                ("base_url", base_url.as_str()),
                ("realm", realm),
                ("client_uuid", client_uuid),
            ],
            ProviderIds::Entra {
                tenant,
                application_object_id,
            } => vec![
                ("tenant", tenant),
                ("application_object_id", application_object_id),
            ],
        };
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
            .collect()
    }

    /// Default token and secret-API URLs, as text; `None` where the
    /// provider has no default.
    fn default_urls(&self, client_id: &str) -> (Option<String>, Option<String>) {
        match self {
            ProviderIds::Okta { org_url, app_id } => {
                let base = org_url.as_str().trim_end_matches('/');
                (
                    Some(format!("{base}/oauth2/v1/token")),
                    Some(format!("{base}/api/v1/apps/{app_id}/credentials/secrets")),
                )
            }
            ProviderIds::Auth0 { domain } => (
                Some(format!("https://{domain}/oauth/token")),
                Some(format!("https://{domain}/api/v2/clients/{client_id}")),
            ),
            ProviderIds::Keycloak {
                base_url,
                realm,
                client_uuid,
            } => {
                let base = base_url.as_str().trim_end_matches('/');
                (
                    Some(format!(
                        "{base}/realms/{realm}/protocol/openid-connect/token"
                    )),
                    Some(format!("{base}/admin/realms/{realm}/clients/{client_uuid}")),
                )
            }
            ProviderIds::Entra {
                tenant,
                application_object_id,
            } => (
                Some(format!(
                    "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
                )),
                Some(format!(
                    "https://graph.microsoft.com/v1.0/applications/{application_object_id}"
                )),
            ),
        }
    }
}

/// How the client authenticates at an RFC 6749 token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    /// RFC 7523 §2.2 with a JWT rekeyd signs with the credential's key for
    /// every attempt (OpenID Connect Core §9); the store holds the key.
    PrivateKeyJwt,
    /// RFC 7523 §2.2 with a JWT a platform writes to
    /// [`AssertionConfig::file`]; nothing is stored.
    ClientAssertionFile,
}

impl AuthMethod {
    /// The configuration's name for it (`auth_method`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::ClientAssertionFile => "client_assertion_file",
        }
    }
}

/// Settings of the assertion-based methods ([`AuthMethod::PrivateKeyJwt`],
/// [`AuthMethod::ClientAssertionFile`]); holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionConfig {
    /// `assertion_audience`: the `aud` of the assertions rekeyd signs;
    /// `None`: the token endpoint URL (RFC 7523 §3 item 3).
    pub audience: Option<String>,
    /// `client_assertion_file`: read afresh for every login.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointsConfig {
    pub token_url: Url,
    pub secrets_url: Option<Url>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefreshConfig {
    /// Refresh this long before expiry (jittered); `None` means 70-80% of the lifetime.
    pub before_expiry: Option<Duration>,
    /// Lifetime of a token whose reply gives neither `expires_in` nor a JWT
    /// `exp` (see [`crate::token::lifetime`]); at least one second.
    pub default_lifetime: Duration,
    /// Shortest time between two forced logins (`POST
    /// /v1/token/{name}/refresh`, `rekeyd token --fresh`); zero limits only
    /// concurrency (one forced login at a time). See
    /// [`crate::token::forced`].
    pub min_forced_interval: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            before_expiry: None,
            default_lifetime: DEFAULT_TOKEN_LIFETIME,
            min_forced_interval: DEFAULT_MIN_FORCED_INTERVAL,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationTrigger {
    Every(Duration),
    /// Cron with seconds, evaluated in UTC; the text is kept for display.
    Schedule(String),
    /// Only `on_login` (or manual requests) rotate.
    Manual,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RotationConfig {
    pub trigger: RotationTrigger,
    pub grace: Duration,
    pub on_login: bool,
    /// Rotate once the current secret is older than this, whatever the
    /// trigger says (`None`: no bound).
    pub max_secret_age: Option<Duration>,
    /// How long before the provider-side expiry of the current secret
    /// (Entra `endDateTime`) a rotation is due, whatever the trigger says;
    /// `None`: [`crate::rotation::schedule::default_expiry_lead`].
    pub before_expiry: Option<Duration>,
    /// `verify_window`: how long a login with a new secret or key is
    /// retried while the provider may not accept it yet, before it counts
    /// as refused; `None`: [`CredentialConfig::verify_window`]'s default.
    pub verify_window: Option<Duration>,
}

/// How long a new secret is retried before it counts as refused, unless
/// `verify_window` says otherwise: the providers rekeyd knows accept a new
/// secret within seconds (Auth0 documents up to 30 s).
pub const DEFAULT_VERIFY_WINDOW: Duration = Duration::from_secs(60);

/// The default verify window of keys published at a `jwks_uri`
/// (`[credentials.jwks]`): the server fetches the new set only once its
/// cached copy is old enough (the served `max-age` is 30 s; oidc-provider
/// refetches for an unknown `kid` at most once a minute), so a new key
/// needs longer than a new secret to be accepted.
pub const JWKS_URI_VERIFY_WINDOW: Duration = Duration::from_secs(180);

pub use crate::format::SinkFormat;

/// One `[[credentials.sinks]]` entry: where each new token goes, and in
/// which format.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub format: SinkFormat,
    pub target: SinkTarget,
}

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkTarget {
    /// `kind = "file"` (the default): a token file on this host.
    File(FileSink),
    /// `kind = "kubernetes-secret"`: one data key of a Kubernetes Secret,
    /// for applications in other pods.
    KubernetesSecret(SecretSink),
}

impl SinkConfig {
    /// The token file, for a file sink.
    pub fn file(&self) -> Option<&FileSink> {
        match &self.target {
            SinkTarget::File(file) => Some(file),
            SinkTarget::KubernetesSecret(_) => None,
        }
    }

    /// How status, `/readyz/{name}` and the metrics name this sink: a
    /// file's path, or `kubernetes-secret:<namespace>/<secret>[<key>]`
    /// (without `<namespace>/` when it is the pod's own).
    pub fn label(&self) -> String {
        match &self.target {
            SinkTarget::File(file) => file.path.display().to_string(),
            SinkTarget::KubernetesSecret(s) => s.label(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSink {
    pub path: PathBuf,
    /// Permission bits, within [`SINK_MODE_ALLOWED`].
    pub mode: u32,
    /// The user the file is given to on every write; `None`: rekeyd's own.
    pub owner: Option<FileOwner>,
    /// The group the file is given to on every write; `None`: rekeyd's
    /// (or the directory's, when it is setgid).
    pub group: Option<FileOwner>,
}

/// Default data key of a Kubernetes Secret sink.
pub const DEFAULT_SECRET_SINK_KEY: &str = "token";

/// A Kubernetes Secret that rekeyd keeps one data key of up to date
/// ([`crate::serve::secret_sink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSink {
    /// `None`: the pod's own namespace (in cluster), else the kubeconfig
    /// context's.
    pub namespace: Option<String>,
    /// The Secret's name.
    pub secret: String,
    /// The data key holding the token; other keys are never touched.
    pub key: String,
    /// `None`: the `[store]` kubeconfig when the store is Kubernetes, else
    /// in-cluster configuration, else `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

impl SecretSink {
    fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("kubernetes-secret:{ns}/{}[{}]", self.secret, self.key),
            None => format!("kubernetes-secret:{}[{}]", self.secret, self.key),
        }
    }
}

/// A user or group a token file is given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOwner {
    /// The numeric uid or gid.
    pub id: u32,
    /// The name or number as the configuration gave it, for messages.
    pub shown: String,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookEvent {
    /// A new token was obtained.
    Token,
    /// A secret rotation completed.
    Rotation,
}

impl HookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::Token => "token",
            HookEvent::Rotation => "rotation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Run a program (argv, no shell) with a timeout.
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Send a signal to the process whose pid is in `pid_file` (re-read each time).
    Signal {
        signal: i32,
        name: String,
        pid_file: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    pub on: Vec<HookEvent>,
    pub action: HookAction,
}

/// A value from `extra_params`: sent to the provider as given, never shown
/// (it may be a client assertion or another secret; I7).
#[derive(Clone, PartialEq, Eq)]
pub struct ParamValue(String);

impl ParamValue {
    /// The value as sent in the token request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `[credentials.registration]`: where an RFC 7591 client's registration
/// is managed (RFC 7592 §2: `GET` reads it, `PUT` with the full metadata
/// updates it and may return a new `client_secret` and a new
/// `registration_access_token`).
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationConfig {
    /// `client_uri`: the `registration_client_uri` the server returned when
    /// the client was registered (RFC 7591 §3.2.1, RFC 7592 §3).
    pub client_uri: Url,
    /// `access_token_file`: a file holding the registration access token
    /// the server returned (RFC 7592 §3). rekeyd keeps the token it is
    /// given by each update in its store; a change of this file's content
    /// (an operator handing over a new token) takes precedence.
    pub access_token_file: PathBuf,
}

/// The data key of a `[credentials.jwks]` Kubernetes Secret.
pub const JWKS_SECRET_KEY: &str = "jwks.json";

/// `[credentials.jwks]`: a `private_key_jwt` client's public keys as a
/// JWK Set (RFC 7517 §5) where a server fetches them as the client's
/// `jwks_uri` (RFC 7591 §2): a file rekeyd writes, perhaps served at
/// `serve_path` on the diagnostics listener, and/or a Kubernetes Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksConfig {
    /// `file` (absolute), else `<state_dir>/jwks/<credential>.json` when
    /// `serve_path` is set (filled in once `state_dir` is known); written
    /// atomically and durably, mode 0644 (public keys).
    pub file: Option<PathBuf>,
    /// `serve_path`: where the diagnostics listener serves `file`.
    pub serve_path: Option<String>,
    /// `kubernetes_secret`: the Secret whose [`JWKS_SECRET_KEY`] holds the
    /// set, in the `[store]` namespace (kind kubernetes), else the pod's
    /// or kubeconfig context's.
    pub kubernetes_secret: Option<SecretSink>,
}

/// A resolved `secret_api_credential`: whose token calls a credential's
/// secret API, and how that token is obtained.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretApiCredential {
    /// The credential or token profile name, as configured.
    pub name: String,
    /// The credential whose secret the store holds (a profile's own
    /// credential).
    pub secret_of: String,
    /// Its token request: the credential, or the profile's view of it
    /// ([`CredentialConfig::profile_view`]). Filled in once every
    /// credential is read; always set in a loaded [`Config`].
    pub login: Option<Box<CredentialConfig>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CredentialConfig {
    pub name: String,
    pub provider: ProviderKind,
    pub client_id: String,
    pub customer_id: Option<String>,
    /// The provider's ids (Okta, Auth0, Keycloak, Entra); `None` for
    /// MapsIndoors (`customer_id` is its own key), Mappls and oauth2. Boxed,
    /// as `secret_api_credential`: a daemon keeps a few copies of every
    /// credential's configuration, and most have neither.
    pub ids: Option<Box<ProviderIds>>,
    /// `secret_api_credential`: the credential or token profile whose token
    /// calls the secret API (an administrative client: Okta's and Auth0's
    /// management APIs); `None`: the credential's own token.
    pub secret_api_credential: Option<Box<SecretApiCredential>>,
    /// `[credentials.registration]` (provider oauth2 only): the client's
    /// RFC 7592 registration, through which its secret is rotated. Boxed
    /// like the ids: most credentials have none.
    pub registration: Option<Box<RegistrationConfig>>,
    /// `[credentials.jwks]` (oauth2 with `private_key_jwt` only): where
    /// the client's public keys are published for its `jwks_uri`.
    pub jwks: Option<Box<JwksConfig>>,
    /// The bootstrap secret's file: `initial_secret_file` as written, or
    /// `$CREDENTIALS_DIRECTORY/<initial_secret_credential>` resolved when
    /// the configuration was loaded; `None` for a credential name loaded
    /// without `$CREDENTIALS_DIRECTORY` (an operator's command in a shell;
    /// see [`CredentialConfig::initial_secret_path`]). Read only while the
    /// store holds no secret for the credential.
    pub initial_secret_file: Option<PathBuf>,
    /// `initial_secret_credential`: the systemd credential name the file
    /// above was resolved from, `None` when the file was named directly.
    pub initial_secret_credential: Option<String>,
    pub initial_secret_id: Option<String>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub auth_method: AuthMethod,
    /// With `private_key_jwt` or `client_assertion_file`; boxed, as most
    /// credentials have none. (A `private_key_jwt` credential's
    /// `initial_key_file` is kept in `initial_secret_file`: it bootstraps
    /// the store the same way.)
    pub assertion: Option<Box<AssertionConfig>>,
    /// Extra form parameters of the token request (values may be
    /// assertions, so they are redacted in `Debug`).
    pub extra_params: BTreeMap<String, ParamValue>,
    pub endpoints: EndpointsConfig,
    pub refresh: RefreshConfig,
    pub rotation: Option<RotationConfig>,
    pub sinks: Vec<SinkConfig>,
    pub hooks: Vec<HookConfig>,
    /// `[[credentials.tokens]]`: further tokens minted from this
    /// credential's one secret, each served under its own name. Empty for
    /// most credentials (an empty `Vec` allocates nothing).
    pub tokens: Vec<TokenProfile>,
}

/// A token profile (`[[credentials.tokens]]`): the credential's client
/// asking for a token with other request parameters (RFC 6749 §3.3
/// `scope`, an `audience`, RFC 8707 `resource` through `extra_params`),
/// from the credential's secret and under its rotation (S8). Served at
/// `/v1/token/{name}` and refreshed on its own token's lifetime.
///
/// Nothing is inherited from the credential's own `scope`, `audience` or
/// `extra_params`: a profile's token request carries exactly what the
/// profile says, so a token never gets an audience nobody wrote next to
/// it. The credential's `[credentials.refresh]` settings apply.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProfile {
    /// Unique among credential names and profile names.
    pub name: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// Redacted in `Debug`, as the credential's.
    pub extra_params: BTreeMap<String, ParamValue>,
    pub sinks: Vec<SinkConfig>,
}

impl CredentialConfig {
    /// The key that named the bootstrap secret, for errors about it:
    /// `initial_key_file` (`private_key_jwt`: the bootstrap key),
    /// `initial_secret_credential` or `initial_secret_file`.
    pub fn initial_secret_key(&self) -> &'static str {
        if self.auth_method == AuthMethod::PrivateKeyJwt {
            "initial_key_file"
        } else if self.initial_secret_credential.is_some() {
            "initial_secret_credential"
        } else {
            "initial_secret_file"
        }
    }

    /// How long a rotation retries a login with the new secret or key
    /// before it counts as refused: `[credentials.rotation]
    /// verify_window`, else [`JWKS_URI_VERIFY_WINDOW`] for keys published
    /// at a `jwks_uri`, else [`DEFAULT_VERIFY_WINDOW`].
    pub fn verify_window(&self) -> Duration {
        match self.rotation.as_ref().and_then(|r| r.verify_window) {
            Some(window) => window,
            None if self.jwks.is_some() => JWKS_URI_VERIFY_WINDOW,
            None => DEFAULT_VERIFY_WINDOW,
        }
    }

    /// Whether the store holds nothing for this credential
    /// (`client_assertion_file`: the platform's file is the credential).
    pub fn stores_nothing(&self) -> bool {
        self.auth_method == AuthMethod::ClientAssertionFile
    }

    /// The bootstrap secret's file; for credential `index` (error keys),
    /// the configuration error naming `initial_secret_credential` when
    /// `$CREDENTIALS_DIRECTORY` was not set.
    pub fn initial_secret_path(&self, index: usize) -> Result<&Path, ConfigError> {
        match (&self.initial_secret_file, &self.initial_secret_credential) {
            (Some(path), _) => Ok(path),
            (None, name) => Err(no_credentials_directory(
                &format!("credentials[{index}].{}", self.initial_secret_key()),
                name.as_deref().unwrap_or_default(),
            )),
        }
    }

    /// The credential as profile `profile` asks for tokens: its name,
    /// request parameters and sinks in place of the credential's, no hooks,
    /// and no rotation (the credential rotates the one secret; a profile's
    /// login must never ask for a rotation, `on_login` included). The
    /// token engine and provider of a profile are built from this view;
    /// the secret is still read under the credential's name.
    pub fn profile_view(&self, profile: &TokenProfile) -> CredentialConfig {
        CredentialConfig {
            name: profile.name.clone(),
            provider: self.provider,
            client_id: self.client_id.clone(),
            customer_id: self.customer_id.clone(),
            ids: self.ids.clone(),
            secret_api_credential: None,
            registration: None,
            jwks: None,
            initial_secret_file: self.initial_secret_file.clone(),
            initial_secret_credential: self.initial_secret_credential.clone(),
            initial_secret_id: self.initial_secret_id.clone(),
            scope: profile.scope.clone(),
            audience: profile.audience.clone(),
            auth_method: self.auth_method,
            assertion: self.assertion.clone(),
            extra_params: profile.extra_params.clone(),
            endpoints: self.endpoints.clone(),
            refresh: self.refresh.clone(),
            rotation: None,
            sinks: profile.sinks.clone(),
            hooks: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl Config {
    /// Reads `path` and applies `REKEYD__...` environment overrides
    /// (`REKEYD__STATE_DIR`, `REKEYD__API__LISTEN`, `REKEYD__LOG__FORMAT`, ...).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let load_err = |message: String| ConfigError::Load {
            path: path.to_path_buf(),
            message,
        };
        // Read the file ourselves so that a missing file is reported as such,
        // not as an empty configuration.
        let text = std::fs::read_to_string(path).map_err(|e| load_err(e.to_string()))?;
        let mut credentials_directory = None;
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, v)| {
                if k == CREDENTIALS_DIRECTORY {
                    credentials_directory = Some(PathBuf::from(v));
                }
                k.starts_with("REKEYD__")
            })
            .collect();
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("REKEYD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("store.endpoints")
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| load_err(describe_load_error(&e, &text)))?;
        validate(raw, credentials_directory.as_deref())
    }

    /// Parses a TOML document without environment overrides (and without
    /// `$CREDENTIALS_DIRECTORY`, so `initial_secret_credential` is refused).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load {
                path: PathBuf::from("<inline>"),
                message: describe_load_error(&e, text),
            })?;
        validate(raw, None)
    }

    pub fn credential(&self, name: &str) -> Option<&CredentialConfig> {
        self.credentials.iter().find(|c| c.name == name)
    }

    /// The token profile named `name` and the credential it belongs to.
    pub fn token_profile(&self, name: &str) -> Option<(&CredentialConfig, &TokenProfile)> {
        self.credentials
            .iter()
            .find_map(|c| c.tokens.iter().find(|p| p.name == name).map(|p| (c, p)))
    }

    /// Whether `name` is served at `/v1/token/{name}`: a credential or a
    /// token profile.
    pub fn serves_token(&self, name: &str) -> bool {
        self.credential(name).is_some() || self.token_profile(name).is_some()
    }

    /// Settings that are valid but probably a mistake, in the order of the
    /// credentials. Derived from the validated configuration, so every
    /// `Config` answers the same however it was built.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut warnings = store_warnings(&self.store);
        warnings.extend(shared_client_warnings(&self.credentials));
        warnings.extend(shared_secret_warnings(&self.credentials));
        for (i, cred) in self.credentials.iter().enumerate() {
            if cred.stores_nothing() {
                continue;
            }
            if let Err(ConfigError::Invalid { key, reason }) = cred.initial_secret_path(i) {
                warnings.push(ConfigWarning {
                    key,
                    reason: format!(
                        "{reason}. `rekeyd run` refuses to start without it; the other \
                         commands do not need it"
                    ),
                });
            }
        }
        warnings
    }

    /// For the daemon (`rekeyd run`): every `initial_secret_credential`
    /// resolved, i.e. `$CREDENTIALS_DIRECTORY` was set. A service whose
    /// unit lacks the `LoadCredential=` line is refused at start, naming
    /// the key, as a configuration error (no restart fixes it), even when
    /// the store already holds a secret.
    pub fn require_credentials(&self) -> Result<(), ConfigError> {
        for (i, cred) in self.credentials.iter().enumerate() {
            if !cred.stores_nothing() {
                cred.initial_secret_path(i)?;
            }
        }
        Ok(())
    }
}

/// Describes a configuration that cannot be read, by key and position only.
/// The `config` and `toml` crates quote the offending line or value in their
/// messages, and that line may hold (or sit next to) an assertion in
/// `extra_params`: their text reaches neither stderr, nor
/// `/dev/termination-log`, nor the daemon log on SIGHUP.
fn describe_load_error(e: &config::ConfigError, text: &str) -> String {
    use config::ConfigError as E;
    match e {
        E::FileParse { cause, .. } => match cause.downcast_ref::<toml::de::Error>() {
            Some(syntax) => {
                let mut out = String::from("TOML syntax error");
                if let Some(span) = syntax.span() {
                    let (line, column) = line_and_column(text, span.start);
                    out.push_str(&format!(" at line {line}, column {column}"));
                    if let Some(table) = table_at(text, line) {
                        out.push_str(&format!(" (in {table})"));
                    }
                }
                // The parser's own words ("invalid string, expected `\"`"),
                // without its rendering of the line.
                out.push_str(&format!(": {}", syntax.message()));
                out
            }
            None => "the file is not valid TOML".to_string(),
        },
        E::Type {
            key,
            unexpected,
            expected,
            ..
        } => {
            // "string \"...\"", "64-bit integer `5`": the kind, not the value.
            let found = unexpected.to_string();
            let kind = found.split(['"', '`']).next().unwrap_or_default().trim();
            match key {
                Some(key) => format!("key `{}`: expected {expected}, found a {kind}", dotted(key)),
                None => format!("expected {expected}, found a {kind}"),
            }
        }
        E::At {
            error,
            key: Some(key),
            ..
        } => format!(
            "key `{}`: {}",
            dotted(key),
            describe_load_error(error, text)
        ),
        E::At { error, .. } => describe_load_error(error, text),
        E::NotFound(key) => format!("key `{key}` not found"),
        // serde's words: quoted values go; a name in backticks stays only
        // when it reads like a key (see `without_file_text`).
        E::Message(message) => without_file_text(message),
        _ => "the configuration cannot be read".to_string(),
    }
}

/// A key path as this crate's own errors spell it: `config` writes
/// `credentials[0]endpoints`, we write `credentials[0].endpoints`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && (c.is_ascii_alphanumeric() || c == '_') {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The table header (`[credentials.endpoints]`, `[[credentials]]`) that
/// line `line` (1-based) belongs to, if the nearest header above it is one:
/// headers are key names only, never values.
fn table_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().take(line.saturating_sub(1)).collect();
    let header = lines
        .iter()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .rfind(|l| l.starts_with('['))?;
    let (open, close) = if header.starts_with("[[") {
        ("[[", "]]")
    } else {
        ("[", "]")
    };
    let name = header.strip_prefix(open)?.strip_suffix(close)?.trim();
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    (!name.is_empty() && name.chars().all(is_key_char)).then(|| format!("{open}{name}{close}"))
}

/// serde's `message` without text from the file that could be a value:
/// double-quoted parts become `"..."`, and a backticked name that does not
/// read like a configuration key becomes `` `...` ``. serde quotes an
/// unknown key or enum variant as written (`` unknown field `colour` ``),
/// and a secret pasted on a line of its own, or quoted as a key, is such a
/// "name"; a key (lowercase, at most one digit, at the end as in `oauth2`,
/// at most 32 characters) is kept because it names the operator's typo.
fn without_file_text(message: &str) -> String {
    let mut out = String::new();
    for (i, part) in without_quoted_values(message).split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 1 && !reads_like_a_key(part) {
            out.push_str("...");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// `[a-z][a-z_-]*[0-9]?`, at most 32 characters: how rekeyd spells its
/// keys and enum values. Generated secrets mix case or digits.
fn reads_like_a_key(name: &str) -> bool {
    let body = name
        .strip_suffix(|c: char| c.is_ascii_digit())
        .unwrap_or(name);
    name.len() <= 32
        && body.starts_with(|c: char| c.is_ascii_lowercase())
        && body
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
}

/// `message` with every double-quoted part replaced by `"..."`.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::new();
    for (i, part) in message.split('"').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        } else {
            out.push_str("\"...\"");
        }
    }
    out
}

/// The environment variable through which systemd names the directory of
/// the service's credentials (`LoadCredential=`, `LoadCredentialEncrypted=`,
/// `SetCredential=`); see <https://systemd.io/CREDENTIALS/>.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// `credentials_directory`: `$CREDENTIALS_DIRECTORY` of the process that
/// loads the configuration, which `initial_secret_credential` names resolve in.
fn validate(raw: RawConfig, credentials_directory: Option<&Path>) -> Result<Config, ConfigError> {
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/rekeyd"));
    if !state_dir.is_absolute() {
        return Err(ConfigError::invalid(
            "state_dir",
            format!("must be an absolute path, got {:?}", state_dir),
        ));
    }

    let api = raw
        .api
        .map(|api| validate_api(api, &state_dir))
        .transpose()?;
    let diag = raw.diag.map(validate_diag).transpose()?;
    if let (Some(api), Some(diag)) = (&api, &diag)
        && listeners_collide(&api.listen, &diag.listen)
    {
        return Err(ConfigError::invalid(
            "diag.listen",
            format!(
                "{} overlaps api.listen ({}); the diagnostics listener needs an address of its own",
                diag.listen, api.listen
            ),
        ));
    }

    let log = LogConfig {
        format: match raw.log.and_then(|l| l.format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "log.format",
                    format!("must be \"text\" or \"json\", got {other:?}"),
                ));
            }
        },
    };

    let history_limit =
        validate_history_limit(raw.store.as_ref().and_then(|s| s.history_limit.clone()))?;
    let store = validate_store(raw.store)?;

    if raw.credentials.is_empty() {
        return Err(ConfigError::invalid(
            "credentials",
            "at least one [[credentials]] entry is required",
        ));
    }
    // Credential and profile names share one namespace: each is served
    // at `/v1/token/{name}` and labels its own metrics.
    let mut names = HashMap::new();
    let mut credentials = Vec::with_capacity(raw.credentials.len());
    for (i, rc) in raw.credentials.into_iter().enumerate() {
        let cred = validate_credential(i, rc, credentials_directory)?;
        let own = std::iter::once((format!("credentials[{i}].name"), &cred.name));
        let profiles = (cred.tokens.iter().enumerate())
            .map(|(j, p)| (format!("credentials[{i}].tokens[{j}].name"), &p.name));
        for (key, name) in own.chain(profiles) {
            if let Some(first) = names.get(name) {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "duplicate token name {name:?}: `{first}` has it already (credential \
                         and token profile names are unique together, each is served at \
                         /v1/token/{{name}})"
                    ),
                ));
            }
            names.insert(name.clone(), key);
        }
        credentials.push(cred);
    }
    let mut files = FileClaims::reserve(&state_dir, api.as_ref(), diag.as_ref());
    let mut secret_keys = SecretClaims::reserve(&store);
    for (i, cred) in credentials.iter_mut().enumerate() {
        let own = cred
            .sinks
            .iter_mut()
            .enumerate()
            .map(|(j, sink)| (format!("credentials[{i}].sinks[{j}]"), sink));
        let profiles = cred.tokens.iter_mut().enumerate().flat_map(|(t, p)| {
            p.sinks
                .iter_mut()
                .enumerate()
                .map(move |(j, sink)| (format!("credentials[{i}].tokens[{t}].sinks[{j}]"), sink))
        });
        for (key, sink) in own.chain(profiles) {
            match &mut sink.target {
                SinkTarget::File(file) => {
                    let key = format!("{key}.path");
                    if let Some(first) = files.claim(&file.path, &key, "a token sink") {
                        return Err(ConfigError::invalid(
                            key,
                            format!(
                                "{} is taken by {first}; each file has one writer",
                                file.path.display()
                            ),
                        ));
                    }
                }
                SinkTarget::KubernetesSecret(secret) => {
                    // Two writers of one key would overwrite each other
                    // with every token.
                    let claimed =
                        secret_keys.claim(secret, &format!("{key}.secret"), "a token sink");
                    if let Some(first) = claimed {
                        return Err(ConfigError::invalid(
                            format!("{key}.key"),
                            format!(
                                "key {:?} of Secret {:?} is taken by {first}; each key has one writer",
                                secret.key, secret.secret
                            ),
                        ));
                    }
                    if secret.kubeconfig.is_none()
                        && let StoreConfig::Kubernetes(store) = &store
                    {
                        secret.kubeconfig = store.kubeconfig.clone();
                    }
                }
            }
        }
    }

    complete_jwks(
        &mut credentials,
        &state_dir,
        diag.is_some(),
        &store,
        (&mut files, &mut secret_keys),
    )?;
    check_one_owner_per_secret(&credentials)?;
    resolve_secret_api_credentials(&mut credentials)?;

    Ok(Config {
        state_dir,
        api,
        diag,
        log,
        store,
        history_limit,
        credentials,
    })
}

/// Completes every `[credentials.jwks]` with what the whole configuration
/// says: the default file of a `serve_path` without `file`
/// (`<state_dir>/jwks/<credential>.json`), the `[store]` cluster and
/// namespace for a Secret; and checks that a `serve_path` has a
/// diagnostics listener and that no two credentials (nor a token sink,
/// `files`) write to one place.
fn complete_jwks(
    credentials: &mut [CredentialConfig],
    state_dir: &Path,
    diag: bool,
    store: &StoreConfig,
    (files, secret_keys): (&mut FileClaims, &mut SecretClaims),
) -> Result<(), ConfigError> {
    let mut paths = HashMap::new();
    for (i, cred) in credentials.iter_mut().enumerate() {
        let Some(jwks) = cred.jwks.as_deref_mut() else {
            continue;
        };
        let key = |field: &str| format!("credentials[{i}].jwks.{field}");
        if let Some(path) = &jwks.serve_path {
            if !diag {
                return Err(ConfigError::invalid(
                    key("serve_path"),
                    "needs the diagnostics listener: add [diag] listen (or write the set with \
                     file where a web server serves it)",
                ));
            }
            if let Some(first) = paths.insert(path.clone(), i) {
                return Err(ConfigError::invalid(
                    key("serve_path"),
                    format!("{path:?} is served for credentials[{first}] already"),
                ));
            }
            if jwks.file.is_none() {
                jwks.file = Some(state_dir.join("jwks").join(format!("{}.json", cred.name)));
            }
        }
        if let Some(file) = &jwks.file
            && let Some(first) = files.claim(file, &key("file"), &format!("credentials[{i}]"))
        {
            return Err(ConfigError::invalid(
                key("file"),
                format!(
                    "{} is taken by {first}; each file has one writer",
                    file.display()
                ),
            ));
        }
        if let Some(secret) = &mut jwks.kubernetes_secret {
            if let StoreConfig::Kubernetes(store) = store {
                secret.namespace = store.namespace.clone();
                secret.kubeconfig = store.kubeconfig.clone();
            }
            if let Some(first) = secret_keys.claim(
                secret,
                &key("kubernetes_secret"),
                &format!("credentials[{i}]"),
            ) {
                return Err(ConfigError::invalid(
                    key("kubernetes_secret"),
                    format!(
                        "key {:?} of Secret {:?} is taken by {first}; each key has one writer",
                        secret.key, secret.secret
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Points each `secret_api_credential` at the credential or token profile
/// it names: its token request, and the credential whose secret it uses.
fn resolve_secret_api_credentials(credentials: &mut [CredentialConfig]) -> Result<(), ConfigError> {
    // Most configurations name none: no copy of every credential then.
    if credentials
        .iter()
        .all(|c| c.secret_api_credential.is_none())
    {
        return Ok(());
    }
    let views: Vec<(String, String, CredentialConfig)> = credentials
        .iter()
        .flat_map(|c| {
            let own = std::iter::once((c.name.clone(), c.name.clone(), c.clone()));
            let profiles =
                (c.tokens.iter()).map(|p| (p.name.clone(), c.name.clone(), c.profile_view(p)));
            own.chain(profiles).collect::<Vec<_>>()
        })
        .collect();
    for (i, cred) in credentials.iter_mut().enumerate() {
        let Some(admin) = &mut cred.secret_api_credential else {
            continue;
        };
        let Some((_, secret_of, view)) = views.iter().find(|(name, ..)| *name == admin.name) else {
            return Err(ConfigError::invalid(
                format!("credentials[{i}].secret_api_credential"),
                format!(
                    "names {:?}, which is neither a credential nor a token profile",
                    admin.name
                ),
            ));
        };
        admin.secret_of = secret_of.clone();
        // Its token only; its own rotation and sinks are its credential's.
        let mut login = view.clone();
        login.rotation = None;
        login.secret_api_credential = None;
        admin.login = Some(Box::new(login));
    }
    Ok(())
}

/// `[store] history_limit`: a count within
/// [`crate::history::MIN_LIMIT`]..=[`crate::history::MAX_LIMIT`].
fn validate_history_limit(raw: Option<RawScalar>) -> Result<usize, ConfigError> {
    use crate::history::{DEFAULT_LIMIT, MAX_LIMIT, MIN_LIMIT};
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(value) => count(
            "store.history_limit",
            value,
            MIN_LIMIT..=MAX_LIMIT,
            "entries",
        ),
    }
}

/// A count key's value (`max_connections`, `history_limit`): a TOML
/// integer, or decimal digits in quotes, within `range`. Anything else is
/// refused, where the `config` crate would have read `1.5` as 2 and `true`
/// as 1. Errors never print the number: it may not be in the base the
/// operator wrote (`0x7FFFFFFF` arrives as 2147483647).
fn count(
    key: &str,
    value: RawScalar,
    range: std::ops::RangeInclusive<usize>,
    unit: &str,
) -> Result<usize, ConfigError> {
    let bounds = format!("between {} and {} {unit}", range.start(), range.end());
    let n = match value {
        RawScalar::Integer(n) => n,
        RawScalar::Text(text) => match text.parse::<i64>() {
            Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => {
                return Err(ConfigError::invalid(
                    key,
                    format!("expected a whole number {bounds}, got {text:?}"),
                ));
            }
        },
        RawScalar::Other(kind) => {
            return Err(ConfigError::invalid(
                key,
                format!("expected a whole number {bounds}, got {kind}"),
            ));
        }
    };
    usize::try_from(n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| ConfigError::invalid(key, format!("must be {bounds}")))
}

/// S8, one secret, one owner. A rotation deletes the secret it replaces, so
/// no credential may live on a secret that another credential rotates.
/// Before the store holds a record, a credential's secret comes from
/// `initial_secret_file`, and `initial_secret_id` names it at the provider
/// (there is no other source: later secrets live in the store under the
/// credential's unique name). Two credentials hold the same secret when
/// those files are the same file or those ids are equal.
fn check_one_owner_per_secret(credentials: &[CredentialConfig]) -> Result<(), ConfigError> {
    for shared in shared_secrets(credentials) {
        refuse_if_either_rotates(
            credentials,
            (shared.first, shared.second),
            shared.key,
            shared.same,
        )?;
    }
    Ok(())
}

/// Two credentials holding one secret (`first < second`): the key of the
/// second that names it, and how it is the same.
struct SharedSecret {
    first: usize,
    second: usize,
    key: &'static str,
    same: String,
}

/// Every pair of credentials that hold the same secret, the second against
/// the first credential that named it (see [`check_one_owner_per_secret`]).
fn shared_secrets(credentials: &[CredentialConfig]) -> Vec<SharedSecret> {
    // For each way of naming a secret, the first credential that named it.
    // Checking every later one against that first one finds each group of
    // credentials on one secret that has a rotating member: either the first
    // rotates and the second meets it, or a later one rotates and meets the
    // first.
    let mut by_path = HashMap::new();
    let mut by_file = HashMap::new();
    let mut by_id = HashMap::new();
    let mut by_credential = HashMap::new();
    let mut found = Vec::new();
    for (j, cred) in credentials.iter().enumerate() {
        // Not resolved (no $CREDENTIALS_DIRECTORY): the same credential
        // name is the same file.
        if cred.initial_secret_file.is_none()
            && let Some(name) = &cred.initial_secret_credential
            && let Some(i) = first_holder(&mut by_credential, name.as_str(), j)
        {
            found.push(SharedSecret {
                first: i,
                second: j,
                key: cred.initial_secret_key(),
                same: format!(
                    "{name:?} is the credential `credentials[{i}].initial_secret_credential` names"
                ),
            });
        }
        if let Some(path) = &cred.initial_secret_file {
            let same_path = first_holder(&mut by_path, normalize_lexically(path), j);
            let same_file =
                file_identity(path).and_then(|file| first_holder(&mut by_file, file, j));
            // The same file by path and by identity is one finding.
            let mut holders: Vec<usize> = [same_path, same_file].into_iter().flatten().collect();
            holders.dedup();
            for i in holders {
                let other = credentials[i]
                    .initial_secret_file
                    .as_ref()
                    .expect("indexed by its initial_secret_file");
                found.push(SharedSecret {
                    first: i,
                    second: j,
                    key: cred.initial_secret_key(),
                    same: format!(
                        "{} is the same file as `credentials[{i}].{}` ({})",
                        path.display(),
                        credentials[i].initial_secret_key(),
                        other.display()
                    ),
                });
            }
        }
        if let Some(id) = &cred.initial_secret_id
            && let Some(i) = first_holder(&mut by_id, id.as_str(), j)
        {
            found.push(SharedSecret {
                first: i,
                second: j,
                key: "initial_secret_id",
                same: format!("{id:?} is also `credentials[{i}].initial_secret_id`"),
            });
        }
    }
    found
}

/// Credentials that share a secret without either rotating: allowed (no
/// rotation deletes it), but the way to share a secret is token profiles,
/// and the first `[credentials.rotation]` added would be refused.
fn shared_secret_warnings(credentials: &[CredentialConfig]) -> Vec<ConfigWarning> {
    shared_secrets(credentials)
        .into_iter()
        .filter(|s| {
            credentials[s.first].rotation.is_none() && credentials[s.second].rotation.is_none()
        })
        .map(|s| ConfigWarning {
            key: format!("credentials[{}].{}", s.second, s.key),
            reason: format!(
                "{}: credentials {:?} and {:?} hold one secret. That works only while neither \
                 rotates (S8: a rotation would delete the secret the other lives on, so adding \
                 [credentials.rotation] to either is refused); to get several tokens from one \
                 secret, give one credential [[credentials.tokens]] profiles",
                s.same, credentials[s.first].name, credentials[s.second].name
            ),
        })
        .collect()
}

/// Refuses credentials `i` and `j` (`i < j`), which hold the same secret, if
/// either of them rotates (S8). `same` says how they share it.
fn refuse_if_either_rotates(
    credentials: &[CredentialConfig],
    (i, j): (usize, usize),
    field: &str,
    same: String,
) -> Result<(), ConfigError> {
    let (first, second) = (&credentials[i], &credentials[j]);
    let why = match (first.rotation.is_some(), second.rotation.is_some()) {
        (false, false) => return Ok(()),
        (true, false) => rotation_locks_out(&first.name, &second.name),
        (false, true) => rotation_locks_out(&second.name, &first.name),
        (true, true) => "both rotate, and the first rotation of either would delete the secret \
                         the other lives on, locking it out"
            .to_string(),
    };
    Err(ConfigError::invalid(
        format!("credentials[{j}].{field}"),
        format!(
            "{same}: {why}. Give each credential a secret of its own (S8: one secret, one \
             owner); several scopes or audiences on one secret belong in one credential, as \
             token profiles ([[credentials.tokens]])"
        ),
    ))
}

fn rotation_locks_out(rotating: &str, other: &str) -> String {
    format!(
        "credential {rotating:?} rotates, and its first rotation would delete the secret \
         credential {other:?} lives on, locking {other:?} out"
    )
}

/// The index recorded for `key`, if another credential recorded it first;
/// else records `index`.
fn first_holder<K: Eq + Hash>(seen: &mut HashMap<K, usize>, key: K, index: usize) -> Option<usize> {
    let first = *seen.entry(key).or_insert(index);
    (first != index).then_some(first)
}

/// `path` without `.` components, each `..` removing the component before
/// it, without asking the file system: two spellings of one missing file
/// still compare equal. Where the removed component is a symlink this may
/// equate two different files, which only errs towards refusing.
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            // At the root `pop` does nothing, as `/..` is `/`.
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The files the configuration has rekeyd write (token sinks, JWKS files),
/// so that no two writers share one, however it is spelt: by lexically
/// normalized path, and, for a file that exists already, by device and
/// inode ([`file_identity`]: a symlink, a hard link). rekeyd's own files
/// are claimed first ([`FileClaims::reserve`]): a token written over a
/// credential's record would lose its secret (I1).
#[derive(Default)]
struct FileClaims {
    by_path: HashMap<PathBuf, String>,
    by_file: HashMap<(u64, u64), String>,
    /// Directories only rekeyd itself writes in, lexically normalized and,
    /// where they exist, resolved.
    dirs: Vec<(PathBuf, String)>,
}

impl FileClaims {
    /// Claims of rekeyd's own files under `state_dir` and the API's key
    /// file and unix sockets.
    fn reserve(state_dir: &Path, api: Option<&ApiConfig>, diag: Option<&DiagConfig>) -> Self {
        let mut claims = FileClaims::default();
        let store = state_dir.join(FILE_STORE_DIR);
        let owner = format!("the record store ({})", store.display());
        if let Ok(real) = std::fs::canonicalize(&store) {
            claims.dirs.push((real, owner.clone()));
        }
        claims.dirs.push((normalize_lexically(&store), owner));
        if let Some(api) = api {
            claims.claim(&api.key_file, "api.key_file", "the API key");
            if let ListenAddr::Unix(path) = &api.listen {
                claims.claim(path, "api.listen", "the API socket");
            }
        }
        if let Some(ListenAddr::Unix(path)) = diag.map(|d| &d.listen) {
            claims.claim(path, "diag.listen", "the diagnostics socket");
        }
        claims
    }

    /// Claims `path` for the writer `owner` (its description in errors,
    /// with the config key `key`); `Some` names the writer that claimed
    /// the file first.
    fn claim(&mut self, path: &Path, key: &str, owner: &str) -> Option<String> {
        let normalized = normalize_lexically(path);
        // Where the path leads: the file itself where it exists (a link to
        // a record), else its directory (a link to the store's).
        let resolved = std::fs::canonicalize(path).ok().or_else(|| {
            (path.parent())
                .and_then(|dir| std::fs::canonicalize(dir).ok())
                .zip(path.file_name())
                .map(|(dir, name)| dir.join(name))
        });
        for (dir, first) in &self.dirs {
            if normalized.starts_with(dir) || resolved.as_ref().is_some_and(|r| r.starts_with(dir))
            {
                return Some(first.clone());
            }
        }
        if let Some(first) = self.by_path.get(&normalized) {
            return Some(first.clone());
        }
        let claimed_by = format!("{owner} (`{key}`)");
        if let Some(identity) = file_identity(path) {
            if let Some(first) = self.by_file.get(&identity) {
                return Some(first.clone());
            }
            self.by_file.insert(identity, claimed_by.clone());
        }
        self.by_path.insert(normalized, claimed_by);
        None
    }
}

/// The data keys of Kubernetes Secrets the configuration has rekeyd write
/// (token sinks, JWKS Secrets), so that no two writers share one; the
/// Kubernetes store's Secret is the store's alone ([`SecretClaims::reserve`]):
/// a token written over a record would lose the credential's secret (I1).
#[derive(Default)]
struct SecretClaims {
    /// `(namespace, Secret, key)` to the writer that claimed it.
    keys: HashMap<(Option<String>, String, String), String>,
    /// The store's Secret: `(namespace, name)`.
    store: Option<(Option<String>, String)>,
}

impl SecretClaims {
    fn reserve(store: &StoreConfig) -> Self {
        SecretClaims {
            keys: HashMap::new(),
            store: match store {
                StoreConfig::Kubernetes(k) => Some((k.namespace.clone(), k.secret.clone())),
                _ => None,
            },
        }
    }

    /// Claims `sink`'s data key for the writer `owner` (config key `key`);
    /// `Some` names the writer that holds it already.
    fn claim(&mut self, sink: &SecretSink, key: &str, owner: &str) -> Option<String> {
        if let Some((namespace, name)) = &self.store {
            // A namespace left to the pod's own may be the store's: the
            // same name is refused unless both namespaces are given and
            // differ.
            let same_namespace =
                namespace.is_none() || sink.namespace.is_none() || *namespace == sink.namespace;
            if *name == sink.secret && same_namespace {
                return Some("the record store (`store.secret`)".to_string());
            }
        }
        let target = (
            sink.namespace.clone(),
            sink.secret.clone(),
            sink.key.clone(),
        );
        if let Some(first) = self.keys.get(&target) {
            return Some(first.clone());
        }
        self.keys.insert(target, format!("{owner} (`{key}`)"));
        None
    }
}

/// Device and inode of the file at `path`, following symlinks, so that a
/// symlink, a `..` through a linked directory, a hard link or a bind mount
/// does not hide that two paths are one file. `None` when the file cannot
/// be examined: a missing bootstrap file has its own error, raised when it
/// is needed, and must not fail validation.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Two credentials of one client at one token endpoint are legitimate (a
/// client may hold several secrets), but they are also what sharing a secret
/// looks like when S8 cannot see it: a copy of the bootstrap file, or files
/// already removed after bootstrap. Warn, so the operator checks.
/// An etcd password sent over plain http to a member beyond this host can
/// be read on the network (etcd's Authenticate call carries it as is).
fn store_warnings(store: &StoreConfig) -> Vec<ConfigWarning> {
    let StoreConfig::Etcd(etcd) = store else {
        return Vec::new();
    };
    let remote = etcd.endpoints.iter().position(|e| {
        Url::parse(e).is_ok_and(|u| {
            u.scheme() == "http"
                && !match u.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(name)) => name == "localhost",
                    None => false,
                }
        })
    });
    match (&etcd.auth, remote) {
        (Some(_), Some(i)) => vec![ConfigWarning {
            key: "store.password_file".to_string(),
            reason: format!(
                "the etcd password travels unencrypted to store.endpoints[{i}], beyond this \
                 host; use https endpoints (store.ca_file)"
            ),
        }],
        _ => Vec::new(),
    }
}

fn shared_client_warnings(credentials: &[CredentialConfig]) -> Vec<ConfigWarning> {
    let mut first = HashMap::new();
    let mut warnings = Vec::new();
    for (j, cred) in credentials.iter().enumerate() {
        let endpoint = (
            cred.provider,
            cred.endpoints.token_url.as_str(),
            cred.client_id.as_str(),
        );
        let Some(i) = first_holder(&mut first, endpoint, j) else {
            continue;
        };
        warnings.push(ConfigWarning {
            key: format!("credentials[{j}].client_id"),
            reason: format!(
                "client {:?} at {} is also `credentials[{i}].client_id` (credential {:?}); \
                 that is safe only if the two hold different secrets: if they share one and \
                 either rotates, its rotation deletes the secret the other lives on (S8)",
                cred.client_id, cred.endpoints.token_url, credentials[i].name
            ),
        });
    }
    warnings
}

fn validate_store(raw: Option<RawStore>) -> Result<StoreConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(StoreConfig::File);
    };
    let kind = raw.kind.as_deref().unwrap_or("file");
    // Settings of another kind are a mistake worth stopping for: the operator
    // believes state is shared when it is not.
    let given = [
        (
            "claim_ttl",
            raw.claim_ttl.is_some(),
            &["kubernetes", "etcd"][..],
        ),
        ("namespace", raw.namespace.is_some(), &["kubernetes"][..]),
        ("secret", raw.secret.is_some(), &["kubernetes"][..]),
        ("lease", raw.lease.is_some(), &["kubernetes"][..]),
        ("kubeconfig", raw.kubeconfig.is_some(), &["kubernetes"][..]),
        ("endpoints", raw.endpoints.is_some(), &["etcd"][..]),
        ("prefix", raw.prefix.is_some(), &["etcd"][..]),
        ("ca_file", raw.ca_file.is_some(), &["etcd"][..]),
        ("cert_file", raw.cert_file.is_some(), &["etcd"][..]),
        ("key_file", raw.key_file.is_some(), &["etcd"][..]),
        ("username", raw.username.is_some(), &["etcd"][..]),
        ("password_file", raw.password_file.is_some(), &["etcd"][..]),
    ];
    for (field, present, kinds) in given {
        if present && !kinds.contains(&kind) {
            return Err(ConfigError::invalid(
                format!("store.{field}"),
                format!(
                    "applies to store.kind = {}, not {kind:?}",
                    kinds
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
    }
    let claim_ttl = match raw.claim_ttl {
        None => DEFAULT_CLAIM_TTL,
        Some(value) => {
            let text = duration_text("store.claim_ttl", value)?;
            let ttl = parse_duration("store.claim_ttl", &text)?;
            // At least 4 s: store requests time out at a quarter of the
            // TTL and no less than 1 s, and a holder stops starting side
            // effects at half of it (S3); below 4 s one slow renewal would
            // stop every run.
            if ttl < Duration::from_secs(4) || ttl > Duration::from_secs(3600) {
                return Err(ConfigError::invalid(
                    "store.claim_ttl",
                    format!("must be between 4s and 1h, got {text:?}"),
                ));
            }
            ttl
        }
    };
    match kind {
        "file" => Ok(StoreConfig::File),
        "kubernetes" => {
            let name = |field: &str, value: Option<String>, default: &str| {
                let value = value.unwrap_or_else(|| default.to_string());
                if is_dns_subdomain(&value) {
                    Ok(value)
                } else {
                    Err(ConfigError::invalid(
                        format!("store.{field}"),
                        format!(
                            "{value:?} is not a Kubernetes object name (lowercase a-z, 0-9, '-' and '.', at most 253)"
                        ),
                    ))
                }
            };
            let namespace = match raw.namespace {
                None => None,
                Some(ns) if is_dns_label(&ns) => Some(ns),
                Some(ns) => {
                    return Err(ConfigError::invalid(
                        "store.namespace",
                        format!("{ns:?} is not a Kubernetes namespace name"),
                    ));
                }
            };
            if let Some(path) = &raw.kubeconfig
                && !path.is_absolute()
            {
                return Err(ConfigError::invalid(
                    "store.kubeconfig",
                    format!("must be an absolute path, got {path:?}"),
                ));
            }
            Ok(StoreConfig::Kubernetes(KubernetesStoreConfig {
                namespace,
                secret: name("secret", raw.secret, "rekeyd-state")?,
                lease: name("lease", raw.lease, "rekeyd-rotation")?,
                kubeconfig: raw.kubeconfig,
                claim_ttl,
            }))
        }
        "etcd" if !cfg!(feature = "etcd") => Err(ConfigError::invalid(
            "store.kind",
            "\"etcd\" needs a rekeyd built with the `etcd` cargo feature (this one was not)",
        )),
        "etcd" => {
            let endpoints = raw.endpoints.unwrap_or_default();
            if endpoints.is_empty() {
                return Err(ConfigError::invalid(
                    "store.endpoints",
                    "is required for store.kind = \"etcd\" (e.g. [\"http://10.0.0.1:2379\"])",
                ));
            }
            // One scheme for all: the client applies one TLS setting to
            // every member.
            let https = endpoints[0].starts_with("https://");
            let scheme = if https { "https" } else { "http" };
            for (i, endpoint) in endpoints.iter().enumerate() {
                let ok = Url::parse(endpoint).is_ok_and(|u| {
                    u.scheme() == scheme
                        && u.host().is_some()
                        && u.port().is_some()
                        && u.path() == "/"
                        && u.query().is_none()
                        && u.username().is_empty()
                });
                if !ok {
                    let also = if i > 0 {
                        " (like store.endpoints[0])".to_string()
                    } else {
                        String::new()
                    };
                    return Err(ConfigError::invalid(
                        format!("store.endpoints[{i}]"),
                        format!(
                            "expected \"http://host:port\" or \"https://host:port\"{also}, got {endpoint:?}"
                        ),
                    ));
                }
            }
            let tls = etcd_tls(https, raw.ca_file, raw.cert_file, raw.key_file)?;
            let auth = etcd_auth(raw.username, raw.password_file)?;
            let prefix = raw.prefix.unwrap_or_else(|| "/rekeyd".to_string());
            if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
                return Err(ConfigError::invalid(
                    "store.prefix",
                    format!("must start with '/' and not end with one, got {prefix:?}"),
                ));
            }
            Ok(StoreConfig::Etcd(EtcdStoreConfig {
                endpoints,
                prefix,
                claim_ttl,
                tls,
                auth,
            }))
        }
        other => Err(ConfigError::invalid(
            "store.kind",
            format!("expected \"file\", \"kubernetes\" or \"etcd\", got {other:?}"),
        )),
    }
}

/// `store.ca_file`, `store.cert_file`, `store.key_file`: required (the CA)
/// and allowed only with `https` endpoints, the certificate and its key
/// together.
fn etcd_tls(
    https: bool,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Result<Option<EtcdTls>, ConfigError> {
    if !https {
        for (field, given) in [
            ("ca_file", ca_file.is_some()),
            ("cert_file", cert_file.is_some()),
            ("key_file", key_file.is_some()),
        ] {
            if given {
                return Err(ConfigError::invalid(
                    format!("store.{field}"),
                    "applies to https endpoints only (store.endpoints are http://)",
                ));
            }
        }
        return Ok(None);
    }
    let Some(ca_file) = ca_file else {
        return Err(ConfigError::invalid(
            "store.ca_file",
            "is required with https endpoints: the CA certificate (PEM) that signed the etcd \
             members' certificates (etcd's --trusted-ca-file)",
        ));
    };
    let client = match (cert_file, key_file) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "store.key_file",
                "is required with store.cert_file (the client certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "store.cert_file",
                "is required with store.key_file (the client certificate of that key)",
            ));
        }
        (Some(cert_file), Some(key_file)) => Some((cert_file, key_file)),
    };
    let ca_pem = pem_file("store.ca_file", &ca_file, "CERTIFICATE", false)?;
    let client = match client {
        None => None,
        Some((cert_file, key_file)) => Some(EtcdClientCert {
            cert_pem: pem_file("store.cert_file", &cert_file, "CERTIFICATE", false)?,
            key_pem: SecretBytes(pem_file("store.key_file", &key_file, "PRIVATE KEY", true)?),
            cert_file,
            key_file,
        }),
    };
    Ok(Some(EtcdTls {
        ca_file,
        ca_pem,
        client,
    }))
}

/// `store.username` and `store.password_file`, both or neither.
fn etcd_auth(
    username: Option<String>,
    password_file: Option<PathBuf>,
) -> Result<Option<EtcdAuth>, ConfigError> {
    match (username, password_file) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            "store.password_file",
            "is required with store.username (the file holding that user's etcd password)",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "store.username",
            "is required with store.password_file (the etcd user the password is for)",
        )),
        (Some(username), Some(password_file)) => {
            if username.is_empty() || username.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    "store.username",
                    "must be an etcd user name (not empty, no control characters)",
                ));
            }
            let bytes = secret_file("store.password_file", &password_file, true)?;
            // One line: the newline an editor or `echo` adds is not part
            // of the password.
            let password = bytes
                .strip_suffix(b"\n")
                .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
                .unwrap_or(&bytes)
                .to_vec();
            if password.is_empty() || std::str::from_utf8(&password).is_err() {
                return Err(ConfigError::invalid(
                    "store.password_file",
                    format!(
                        "{} holds no password (empty, or not UTF-8 text)",
                        password_file.display()
                    ),
                ));
            }
            Ok(Some(EtcdAuth {
                username,
                password_file,
                password: SecretBytes(password),
            }))
        }
    }
}

/// A PEM file's bytes, with at least one `-----BEGIN ...{label}-----`
/// block (`PRIVATE KEY` also matches `EC PRIVATE KEY`, `RSA PRIVATE KEY`).
/// The file itself is parsed when the store connects.
fn pem_file(key: &str, path: &Path, label: &str, private: bool) -> Result<Vec<u8>, ConfigError> {
    let bytes = secret_file(key, path, private)?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !has_block {
        return Err(ConfigError::invalid(
            key,
            format!("{} holds no PEM {label}", path.display()),
        ));
    }
    Ok(bytes)
}

/// Reads a file the configuration names. A `private` one (a key, a
/// password) must not be accessible to all users (I7): rekeyd refuses
/// rather than use a secret others may have read.
fn secret_file(key: &str, path: &Path, private: bool) -> Result<Vec<u8>, ConfigError> {
    if !path.is_absolute() {
        return Err(ConfigError::invalid(
            key,
            format!("must be an absolute path, got {path:?}"),
        ));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {} ({e})", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {} ({e})", path.display())))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} is accessible to all users (mode {mode:04o}); make it readable by \
                     rekeyd only (chmod o-rwx)",
                    path.display()
                ),
            ));
        }
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut bytes)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {} ({e})", path.display())))?;
    Ok(bytes)
}

/// RFC 1123 label: a namespace name.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: the name of a Secret or a Lease.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Parses `key`'s value: `"IP:PORT"` or `"unix:/absolute/path"`.
fn parse_listen(key: &str, text: &str) -> Result<ListenAddr, ConfigError> {
    if let Some(path) = text.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(ConfigError::invalid(
                key,
                format!("unix socket path must be absolute, got {text:?}"),
            ));
        }
        return Ok(ListenAddr::Unix(path));
    }
    text.parse().map(ListenAddr::Tcp).map_err(|_| {
        ConfigError::invalid(
            key,
            format!("expected \"IP:PORT\" or \"unix:/path\", got {text:?}"),
        )
    })
}

/// Whether two listeners would fight over one address: the same socket
/// path, or the same TCP port on the same or a wildcard address (port 0
/// picks a free port each time).
fn listeners_collide(a: &ListenAddr, b: &ListenAddr) -> bool {
    match (a, b) {
        (ListenAddr::Unix(a), ListenAddr::Unix(b)) => a == b,
        (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => false,
    }
}

/// Validates the limits of the listener in `section` (`api` or `diag`).
fn validate_limits(
    section: &str,
    default_max_connections: usize,
    max_connections: Option<RawScalar>,
    header_timeout: Option<RawScalar>,
    request_timeout: Option<RawScalar>,
    idle_timeout: Option<RawScalar>,
) -> Result<ListenerLimits, ConfigError> {
    let key = |field: &str| format!("{section}.{field}");
    let defaults = ListenerLimits::default();
    let max_connections = match max_connections {
        None => default_max_connections,
        Some(n) => count(&key("max_connections"), n, 1..=1_000_000, "connections")?,
    };
    // Text with a unit, like every duration key: a bare number has none.
    let timeout = |field: &str, value: Option<RawScalar>, default: Duration| {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = duration_text(&key(field), value)?;
        let d = parse_duration(&key(field), &text)?;
        if d.is_zero() || d > MAX_LISTENER_TIMEOUT {
            return Err(ConfigError::invalid(
                key(field),
                format!("must be more than 0s and at most 1h, got {text:?}"),
            ));
        }
        Ok(d)
    };
    let header_timeout = timeout("header_timeout", header_timeout, defaults.header_timeout)?;
    let request_timeout = timeout("request_timeout", request_timeout, defaults.request_timeout)?;
    let idle_timeout = timeout("idle_timeout", idle_timeout, defaults.idle_timeout)?;
    // The head is part of the request: a longer header_timeout would never
    // apply.
    if header_timeout > request_timeout {
        return Err(ConfigError::invalid(
            key("header_timeout"),
            format!(
                "{} is longer than {} ({}); the request head is part of the request",
                humantime::format_duration(header_timeout),
                key("request_timeout"),
                humantime::format_duration(request_timeout),
            ),
        ));
    }
    Ok(ListenerLimits {
        max_connections,
        header_timeout,
        request_timeout,
        idle_timeout,
    })
}

fn validate_api(api: RawApi, state_dir: &Path) -> Result<ApiConfig, ConfigError> {
    let listen = parse_listen(
        "api.listen",
        api.listen.as_deref().unwrap_or(DEFAULT_API_LISTEN),
    )?;
    // The token endpoint hands out bearer tokens: exposing it beyond the
    // host must be a deliberate choice.
    if let ListenAddr::Tcp(addr) = listen
        && !addr.ip().is_loopback()
        && !api.allow_non_loopback
    {
        return Err(ConfigError::invalid(
            "api.listen",
            format!(
                "{addr} is not a loopback address; set api.allow_non_loopback = true to expose the API beyond this host (for probes and metrics, a [diag] listener is the safer choice)"
            ),
        ));
    }
    let key_file = api.key_file.unwrap_or_else(|| state_dir.join("api.key"));
    if !key_file.is_absolute() {
        return Err(ConfigError::invalid(
            "api.key_file",
            format!("must be an absolute path, got {:?}", key_file),
        ));
    }
    let limits = validate_limits(
        "api",
        DEFAULT_MAX_CONNECTIONS,
        api.max_connections,
        api.header_timeout,
        api.request_timeout,
        api.idle_timeout,
    )?;
    Ok(ApiConfig {
        listen,
        key_file,
        limits,
    })
}

/// `[diag]` needs no loopback address: it serves no token, no status and
/// no rotation, only what probes and a scraper need.
fn validate_diag(diag: RawDiag) -> Result<DiagConfig, ConfigError> {
    let text = diag.listen.ok_or_else(|| {
        ConfigError::invalid(
            "diag.listen",
            "is required in [diag], e.g. \"0.0.0.0:9861\" or \"unix:/run/rekeyd/diag.sock\"",
        )
    })?;
    let listen = parse_listen("diag.listen", &text)?;
    let limits = validate_limits(
        "diag",
        DEFAULT_DIAG_MAX_CONNECTIONS,
        diag.max_connections,
        diag.header_timeout,
        diag.request_timeout,
        diag.idle_timeout,
    )?;
    Ok(DiagConfig { listen, limits })
}

fn validate_credential(
    i: usize,
    rc: RawCredential,
    credentials_directory: Option<&Path>,
) -> Result<CredentialConfig, ConfigError> {
    let key = |field: &str| format!("credentials[{i}].{field}");
    let required = |value: Option<String>, field: &str| {
        value
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| ConfigError::invalid(key(field), "is required"))
    };

    let name = required(rc.name, "name")?;
    check_token_name(&key("name"), &name)?;
    let provider_text = required(rc.provider, "provider")?;
    let provider = match provider_text.as_str() {
        "mapsindoors" => ProviderKind::MapsIndoors,
        "mappls" => ProviderKind::Mappls,
        "oauth2" => ProviderKind::OAuth2,
        "okta" => ProviderKind::Okta,
        "auth0" => ProviderKind::Auth0,
        "keycloak" => ProviderKind::Keycloak,
        "entra" => ProviderKind::Entra,
        other => {
            return Err(ConfigError::invalid(
                key("provider"),
                format!(
                    "unknown provider {other:?}; expected mapsindoors, mappls, oauth2, okta, auth0, keycloak or entra"
                ),
            ));
        }
    };
    let client_id = required(rc.client_id, "client_id")?;
    let ids = validate_provider_ids(
        i,
        provider,
        RawIds {
            org_url: rc.org_url,
            app_id: rc.app_id,
            domain: rc.domain,
            base_url: rc.base_url,
            realm: rc.realm,
            client_uuid: rc.client_uuid,
            tenant: rc.tenant,
            application_object_id: rc.application_object_id,
        },
    )?;

    // Okta, Auth0, Keycloak and Entra are RFC 6749 token endpoints.
    let standard = matches!(
        provider,
        ProviderKind::OAuth2
            | ProviderKind::Okta
            | ProviderKind::Auth0
            | ProviderKind::Keycloak
            | ProviderKind::Entra
    );
    let auth_method = match (standard, rc.auth_method.as_deref()) {
        (true, None | Some("client_secret_basic")) => AuthMethod::ClientSecretBasic,
        (_, Some("client_secret_post")) => AuthMethod::ClientSecretPost,
        // Okta's token endpoint takes private_key_jwt too, and its
        // Management API publishes the app's keys (`okta_keys`).
        (_, Some("private_key_jwt")) if provider == ProviderKind::Okta => AuthMethod::PrivateKeyJwt,
        (_, Some(method @ ("private_key_jwt" | "client_assertion_file")))
            if provider != ProviderKind::OAuth2 =>
        {
            return Err(ConfigError::invalid(
                key("auth_method"),
                format!(
                    "{method} is supported with provider oauth2 only, not {}",
                    provider.as_str()
                ),
            ));
        }
        (_, Some("private_key_jwt")) => AuthMethod::PrivateKeyJwt,
        (_, Some("client_assertion_file")) => AuthMethod::ClientAssertionFile,
        (true, Some(other)) => {
            return Err(ConfigError::invalid(
                key("auth_method"),
                format!(
                    "expected client_secret_basic, client_secret_post, private_key_jwt or \
                     client_assertion_file, got {other:?}"
                ),
            ));
        }
        // MapsIndoors and Mappls only accept the secret in the form body.
        (_, None) => AuthMethod::ClientSecretPost,
        (_, Some(other)) => {
            return Err(ConfigError::invalid(
                key("auth_method"),
                format!(
                    "{} only supports client_secret_post, got {other:?}",
                    provider.as_str()
                ),
            ));
        }
    };

    let (initial_secret_file, assertion) = validate_assertion_method(
        i,
        auth_method,
        AssertionKeys {
            initial_secret_given: rc.initial_secret_file.is_some()
                || rc.initial_secret_credential.is_some(),
            initial_key_file: rc.initial_key_file,
            client_assertion_file: rc.client_assertion_file,
            assertion_audience: rc.assertion_audience,
            rotation: rc.rotation.is_some(),
            registration: rc.registration.is_some(),
            extra_params: &rc.extra_params,
        },
    )?;
    let initial_secret_file = match (rc.initial_secret_file, &rc.initial_secret_credential) {
        _ if assertion.is_some() => initial_secret_file,
        (None, None) => {
            return Err(ConfigError::invalid(
                key("initial_secret_file"),
                "is required, or initial_secret_credential (it is read only while the store \
                 holds no secret for this credential)",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                key("initial_secret_credential"),
                "names the bootstrap secret a second time: give initial_secret_file or \
                 initial_secret_credential, not both",
            ));
        }
        (Some(path), None) => {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    key("initial_secret_file"),
                    format!("must be an absolute path, got {:?}", path),
                ));
            }
            Some(path)
        }
        (None, Some(name)) => credential_file(
            &key("initial_secret_credential"),
            name,
            credentials_directory,
        )?,
    };

    check_request_params(&key(""), provider, &rc.extra_params, rc.audience.is_some())?;

    let mut defaults = ids
        .as_deref()
        .map_or((None, None), |ids| ids.default_urls(&client_id));
    let okta_keys = provider == ProviderKind::Okta && auth_method == AuthMethod::PrivateKeyJwt;
    if okta_keys {
        // A private_key_jwt app's keys live next to its secrets.
        defaults.1 = defaults.1.map(|url| {
            url.strip_suffix("/credentials/secrets")
                .map_or(url.clone(), |app| format!("{app}/credentials/jwks"))
        });
    }
    let insecure_http = rc.endpoints.as_ref().is_some_and(|e| e.allow_insecure_http);
    let endpoints = validate_endpoints(i, provider, &defaults, rc.endpoints)?;
    if okta_keys && rc.rotation.is_some() {
        check_okta_jwks_url(
            &key("endpoints.secrets_url"),
            endpoints.secrets_url.as_ref(),
        )?;
    }
    let registration = rc
        .registration
        .map(|r| validate_registration(i, provider, insecure_http, r))
        .transpose()?;

    let (before_expiry, default_lifetime, min_forced_interval) =
        rc.refresh.map_or((None, None, None), |r| {
            (r.before_expiry, r.default_lifetime, r.min_forced_interval)
        });
    let min_forced_interval = match min_forced_interval {
        None => DEFAULT_MIN_FORCED_INTERVAL,
        Some(value) => {
            let d = duration(&key("refresh.min_forced_interval"), value)?;
            if d > MAX_MIN_FORCED_INTERVAL {
                return Err(ConfigError::invalid(
                    key("refresh.min_forced_interval"),
                    "must be at most 1h (an application whose token was refused waits that long for a new one)",
                ));
            }
            d
        }
    };
    let default_lifetime = match default_lifetime {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(value) => {
            let d = duration(&key("refresh.default_lifetime"), value)?;
            if d < MIN_TOKEN_LIFETIME {
                return Err(ConfigError::invalid(
                    key("refresh.default_lifetime"),
                    "must be at least 1s (a shorter token is already expired when it is served)",
                ));
            }
            d
        }
    };
    let refresh = RefreshConfig {
        default_lifetime,
        min_forced_interval,
        before_expiry: before_expiry
            .map(|value| duration(&key("refresh.before_expiry"), value))
            .transpose()?
            .map(|d| {
                if d.is_zero() {
                    Err(ConfigError::invalid(
                        key("refresh.before_expiry"),
                        "must be greater than zero",
                    ))
                } else {
                    Ok(d)
                }
            })
            .transpose()?,
    };

    let jwks = rc
        .jwks
        .map(|j| validate_jwks(i, provider, auth_method, registration.is_some(), j))
        .transpose()?;
    let rotation = rc
        .rotation
        .map(|r| validate_rotation(i, provider, registration.is_some() || jwks.is_some(), r))
        .transpose()?;
    if rotation.is_some() && provider == ProviderKind::MapsIndoors && rc.customer_id.is_none() {
        return Err(ConfigError::invalid(
            key("customer_id"),
            "is required when [credentials.rotation] is set (the MapsIndoors secret API is per customer)",
        ));
    }
    // A key's id is its kid, known from the key itself.
    if rotation.is_some()
        && provider == ProviderKind::Okta
        && auth_method != AuthMethod::PrivateKeyJwt
        && rc.initial_secret_id.is_none()
    {
        return Err(ConfigError::invalid(
            key("initial_secret_id"),
            "is required to rotate with provider okta: an app holds at most two secrets, so the \
             bootstrap secret (its id, ocs...) must be retired by the first rotation",
        ));
    }
    if let Some(admin) = &rc.secret_api_credential {
        if registration.is_some() {
            return Err(ConfigError::invalid(
                key("secret_api_credential"),
                "does not apply with [credentials.registration]: the registration access token calls that API",
            ));
        }
        if rotation.is_none() {
            return Err(ConfigError::invalid(
                key("secret_api_credential"),
                "is used only to rotate: set [credentials.rotation] or remove it",
            ));
        }
        check_token_name(&key("secret_api_credential"), admin)?;
    } else if rotation.is_some()
        && matches!(
            provider,
            ProviderKind::Okta | ProviderKind::Auth0 | ProviderKind::Entra
        )
    {
        return Err(ConfigError::invalid(
            key("secret_api_credential"),
            format!(
                "is required to rotate with provider {}: name the credential (or token profile) \
                 whose token may call its management API",
                provider.as_str()
            ),
        ));
    }

    let sinks = rc
        .sinks
        .into_iter()
        .enumerate()
        .map(|(j, s)| validate_sink(&key(&format!("sinks[{j}]")), s, &name))
        .collect::<Result<Vec<_>, _>>()?;

    let hooks = rc
        .hooks
        .into_iter()
        .enumerate()
        .map(|(j, h)| validate_hook(&key(&format!("hooks[{j}]")), h, rotation.is_some()))
        .collect::<Result<Vec<_>, _>>()?;

    let tokens = rc
        .tokens
        .into_iter()
        .enumerate()
        .map(|(j, t)| validate_profile(&key(&format!("tokens[{j}]")), provider, t))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(CredentialConfig {
        name,
        provider,
        client_id,
        customer_id: rc.customer_id,
        ids,
        secret_api_credential: rc.secret_api_credential.map(|name| {
            Box::new(SecretApiCredential {
                name,
                secret_of: String::new(),
                login: None,
            })
        }),
        registration: registration.map(Box::new),
        jwks: jwks.map(Box::new),
        initial_secret_file,
        initial_secret_credential: rc.initial_secret_credential,
        initial_secret_id: rc.initial_secret_id,
        scope: rc.scope,
        audience: rc.audience,
        auth_method,
        assertion: assertion.map(Box::new),
        extra_params: rc
            .extra_params
            .into_iter()
            .map(|(k, v)| (k, ParamValue(v)))
            .collect(),
        endpoints,
        refresh,
        rotation,
        sinks,
        hooks,
        tokens,
    })
}

/// Okta publishes a `private_key_jwt` app's keys at
/// `{org}/api/v1/apps/{appId}/credentials/jwks` (Management API, OAuth 2.0
/// client JSON Web Keys): a rotation through any other URL (the app's
/// secrets, say) would publish nothing. `field` names the key in errors.
fn check_okta_jwks_url(field: &str, url: Option<&Url>) -> Result<(), ConfigError> {
    let shape = url
        .and_then(|u| u.path_segments())
        .map(|s| s.filter(|s| !s.is_empty()).collect::<Vec<_>>());
    match shape.as_deref() {
        Some([.., "api", "v1", "apps", _, "credentials", "jwks"]) => Ok(()),
        _ => Err(ConfigError::invalid(
            field,
            "must be the app's key URL, https://ORG/api/v1/apps/APP_ID/credentials/jwks, to \
             rotate the key of a private_key_jwt app with provider okta (or leave it out: it is \
             derived from org_url and app_id)",
        )),
    }
}

/// The keys of the assertion-based methods, as one credential gives them.
struct AssertionKeys<'a> {
    /// `initial_secret_file` or `initial_secret_credential` is set.
    initial_secret_given: bool,
    initial_key_file: Option<PathBuf>,
    client_assertion_file: Option<PathBuf>,
    assertion_audience: Option<String>,
    rotation: bool,
    registration: bool,
    extra_params: &'a BTreeMap<String, String>,
}

/// Checks the keys of `private_key_jwt` and `client_assertion_file`
/// (credential `i`): each method's own keys are required with it and
/// refused without it. Returns the bootstrap key file (kept where the
/// bootstrap secret's would be) and the method's settings, `None` for the
/// secret-based methods.
fn validate_assertion_method(
    i: usize,
    method: AuthMethod,
    raw: AssertionKeys<'_>,
) -> Result<(Option<PathBuf>, Option<AssertionConfig>), ConfigError> {
    let key = |field: &str| format!("credentials[{i}].{field}");
    let absolute = |field: &str, path: PathBuf| {
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(ConfigError::invalid(
                key(field),
                format!("must be an absolute path, got {path:?}"),
            ))
        }
    };
    let keyed = matches!(
        method,
        AuthMethod::PrivateKeyJwt | AuthMethod::ClientAssertionFile
    );
    if !keyed {
        for (given, field) in [
            (raw.initial_key_file.is_some(), "initial_key_file"),
            (raw.client_assertion_file.is_some(), "client_assertion_file"),
            (raw.assertion_audience.is_some(), "assertion_audience"),
        ] {
            if given {
                return Err(ConfigError::invalid(
                    key(field),
                    format!(
                        "applies only with auth_method = \"{}\" (auth_method is {:?})",
                        if field == "client_assertion_file" {
                            "client_assertion_file"
                        } else {
                            "private_key_jwt"
                        },
                        method.as_str()
                    ),
                ));
            }
        }
        return Ok((None, None));
    }
    // RFC 7521 §4.2: rekeyd sets both; an operator's would be a second one.
    for param in ["client_assertion", "client_assertion_type"] {
        if raw.extra_params.contains_key(param) {
            return Err(ConfigError::invalid(
                key(&format!("extra_params.{param}")),
                format!(
                    "is set by rekeyd itself with auth_method = {:?}",
                    method.as_str()
                ),
            ));
        }
    }
    // private_key_jwt rotates its key where the key is published (the
    // registration's jwks, checked with [credentials.rotation]).
    if method == AuthMethod::ClientAssertionFile && (raw.rotation || raw.registration) {
        let table = if raw.rotation {
            "rotation"
        } else {
            "registration"
        };
        return Err(ConfigError::invalid(
            key(table),
            format!(
                "does not apply with auth_method = \"client_assertion_file\": rekeyd stores \
                 nothing to rotate, the platform replaces the assertion; remove [credentials.{table}]"
            ),
        ));
    }
    if raw.initial_secret_given {
        return Err(ConfigError::invalid(
            key("initial_secret_file"),
            format!(
                "does not apply with auth_method = {:?}: {}",
                method.as_str(),
                if method == AuthMethod::PrivateKeyJwt {
                    "the client authenticates with a key; give initial_key_file instead"
                } else {
                    "the client authenticates with the assertion in client_assertion_file; nothing is stored"
                }
            ),
        ));
    }
    if method == AuthMethod::PrivateKeyJwt {
        if raw.client_assertion_file.is_some() {
            return Err(ConfigError::invalid(
                key("client_assertion_file"),
                "applies only with auth_method = \"client_assertion_file\"; private_key_jwt signs its own assertions with initial_key_file's key",
            ));
        }
        let file = raw.initial_key_file.ok_or_else(|| {
            ConfigError::invalid(
                key("initial_key_file"),
                "is required with auth_method = \"private_key_jwt\": a PEM (PKCS#8) or JWK file \
                 with the client's private key (read only while the store holds no key for this credential)",
            )
        })?;
        if let Some(audience) = &raw.assertion_audience
            && audience.trim().is_empty()
        {
            return Err(ConfigError::invalid(
                key("assertion_audience"),
                "must not be empty",
            ));
        }
        Ok((
            Some(absolute("initial_key_file", file)?),
            Some(AssertionConfig {
                audience: raw.assertion_audience,
                file: None,
            }),
        ))
    } else {
        for (given, field) in [
            (raw.initial_key_file.is_some(), "initial_key_file"),
            (raw.assertion_audience.is_some(), "assertion_audience"),
        ] {
            if given {
                return Err(ConfigError::invalid(
                    key(field),
                    "applies only with auth_method = \"private_key_jwt\" (the platform's assertion carries its own audience)",
                ));
            }
        }
        let file = raw.client_assertion_file.ok_or_else(|| {
            ConfigError::invalid(
                key("client_assertion_file"),
                "is required with auth_method = \"client_assertion_file\": the file a platform \
                 keeps an assertion in (e.g. a Kubernetes projected service-account token)",
            )
        })?;
        Ok((
            None,
            Some(AssertionConfig {
                audience: None,
                file: Some(absolute("client_assertion_file", file)?),
            }),
        ))
    }
}

/// A credential's or token profile's name: it is a URL path segment
/// (`/v1/token/{name}`), a metrics label and part of secret tags, so it
/// keeps to a-z, 0-9 and '-'.
fn check_token_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?} may contain only a-z, 0-9 and '-'"),
        ));
    }
    Ok(())
}

/// The token request parameters of a credential or profile whose keys
/// start with `prefix` (`credentials[0].` or `credentials[0].tokens[1].`).
fn check_request_params(
    prefix: &str,
    provider: ProviderKind,
    extra_params: &BTreeMap<String, String>,
    has_audience: bool,
) -> Result<(), ConfigError> {
    for param in extra_params.keys() {
        if matches!(
            param.as_str(),
            "grant_type" | "client_id" | "client_secret" | "scope" | "audience"
        ) {
            return Err(ConfigError::invalid(
                format!("{prefix}extra_params.{param}"),
                "is set by rekeyd itself and cannot be overridden",
            ));
        }
    }
    // The RFC 6749 token endpoints take it (Auth0 requires it for API
    // tokens, the Management API's included).
    let standard = matches!(
        provider,
        ProviderKind::OAuth2
            | ProviderKind::Okta
            | ProviderKind::Auth0
            | ProviderKind::Keycloak
            | ProviderKind::Entra
    );
    if has_audience && !standard {
        return Err(ConfigError::invalid(
            format!("{prefix}audience"),
            format!(
                "is only supported by providers oauth2, okta, auth0, keycloak and entra, not {}",
                provider.as_str()
            ),
        ));
    }
    Ok(())
}

/// One `[[credentials.tokens]]` table; `key` is `credentials[i].tokens[j]`.
/// Uniqueness of its name among all token names is checked by the caller.
fn validate_profile(
    key: &str,
    provider: ProviderKind,
    raw: RawTokenProfile,
) -> Result<TokenProfile, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let name = raw
        .name
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| ConfigError::invalid(field("name"), "is required"))?;
    check_token_name(&field("name"), &name)?;
    check_request_params(
        &format!("{key}."),
        provider,
        &raw.extra_params,
        raw.audience.is_some(),
    )?;
    let sinks = raw
        .sinks
        .into_iter()
        .enumerate()
        .map(|(k, s)| validate_sink(&field(&format!("sinks[{k}]")), s, &name))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TokenProfile {
        name,
        scope: raw.scope,
        audience: raw.audience,
        extra_params: raw
            .extra_params
            .into_iter()
            .map(|(k, v)| (k, ParamValue(v)))
            .collect(),
        sinks,
    })
}

/// Signals a hook may send, by name.
const HOOK_SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
];

fn validate_hook(key: &str, raw: RawHook, rotates: bool) -> Result<HookConfig, ConfigError> {
    let mut on = Vec::new();
    for (i, event) in raw.on.iter().enumerate() {
        let event = match event.as_str() {
            "token" => HookEvent::Token,
            "rotation" if rotates => HookEvent::Rotation,
            "rotation" => {
                return Err(ConfigError::invalid(
                    format!("{key}.on[{i}]"),
                    "\"rotation\" needs a [credentials.rotation] section",
                ));
            }
            other => {
                return Err(ConfigError::invalid(
                    format!("{key}.on[{i}]"),
                    format!("expected \"token\" or \"rotation\", got {other:?}"),
                ));
            }
        };
        if !on.contains(&event) {
            on.push(event);
        }
    }
    if on.is_empty() {
        return Err(ConfigError::invalid(
            format!("{key}.on"),
            "list at least one event: [\"token\"], [\"rotation\"] or both",
        ));
    }
    let action = match (raw.command, raw.signal, raw.pid_file) {
        (Some(argv), None, None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.command"),
                    "must name a program: [\"/path/to/program\", \"arg\", ...]",
                ));
            }
            if !Path::new(&argv[0]).is_absolute() {
                return Err(ConfigError::invalid(
                    format!("{key}.command"),
                    format!(
                        "the program must be an absolute path (no shell, no PATH search), got {:?}",
                        argv[0]
                    ),
                ));
            }
            let timeout = raw
                .timeout
                .map(|t| duration(&format!("{key}.timeout"), t))
                .transpose()?
                .unwrap_or(Duration::from_secs(30));
            HookAction::Command { argv, timeout }
        }
        (None, Some(signal), Some(pid_file)) => {
            let signal = match signal {
                RawScalar::Text(text) => text,
                // A number means different signals on different systems.
                RawScalar::Integer(_) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.signal"),
                        "give the signal's name (HUP, INT, QUIT, USR1, USR2 or TERM), not its number",
                    ));
                }
                RawScalar::Other(kind) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.signal"),
                        format!("expected a signal name such as \"HUP\", got {kind}"),
                    ));
                }
            };
            let name = signal.trim_start_matches("SIG").to_ascii_uppercase();
            let number = HOOK_SIGNALS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        format!("{key}.signal"),
                        format!("expected one of HUP, INT, QUIT, USR1, USR2, TERM, got {signal:?}"),
                    )
                })?;
            if !pid_file.is_absolute() {
                return Err(ConfigError::invalid(
                    format!("{key}.pid_file"),
                    "must be an absolute path",
                ));
            }
            if raw.timeout.is_some() {
                return Err(ConfigError::invalid(
                    format!("{key}.timeout"),
                    "only applies to `command` hooks",
                ));
            }
            HookAction::Signal {
                signal: number,
                name,
                pid_file,
            }
        }
        (None, Some(_), None) => {
            return Err(ConfigError::invalid(
                format!("{key}.pid_file"),
                "is required with `signal`",
            ));
        }
        _ => {
            return Err(ConfigError::invalid(
                key.to_string(),
                "set either `command` or `signal` with `pid_file`",
            ));
        }
    };
    Ok(HookConfig { on, action })
}

/// The provider ids as written.
struct RawIds {
    org_url: Option<String>,
    app_id: Option<String>,
    domain: Option<String>,
    base_url: Option<String>,
    realm: Option<String>,
    client_uuid: Option<String>,
    tenant: Option<String>,
    application_object_id: Option<String>,
}

/// Okta's `org_url` and `app_id`, Auth0's `domain`, Keycloak's `base_url`,
/// `realm` and `client_uuid`: required by their provider, refused
/// elsewhere (a key that does nothing is a mistake).
fn validate_provider_ids(
    i: usize,
    provider: ProviderKind,
    raw: RawIds,
) -> Result<Option<Box<ProviderIds>>, ConfigError> {
    let key = |field: &str| format!("credentials[{i}].{field}");
    let RawIds {
        org_url,
        app_id,
        domain,
        base_url,
        realm,
        client_uuid,
        tenant,
        application_object_id,
    } = raw;
    let given = [
        ("org_url", &org_url),
        ("app_id", &app_id),
        ("domain", &domain),
        ("base_url", &base_url),
        ("realm", &realm),
        ("client_uuid", &client_uuid),
        ("tenant", &tenant),
        ("application_object_id", &application_object_id),
    ];
    let wanted: &[&str] = match provider {
        ProviderKind::Okta => &["org_url", "app_id"],
        ProviderKind::Auth0 => &["domain"],
        ProviderKind::Keycloak => &["base_url", "realm", "client_uuid"],
        ProviderKind::Entra => &["tenant", "application_object_id"],
        _ => &[],
    };
    for (field, value) in given {
        match (wanted.contains(&field), value) {
            (true, None) => {
                return Err(ConfigError::invalid(
                    key(field),
                    format!("is required for provider {}", provider.as_str()),
                ));
            }
            (false, Some(_)) => {
                return Err(ConfigError::invalid(
                    key(field),
                    format!("is not used by provider {}", provider.as_str()),
                ));
            }
            _ => {}
        }
    }
    // An id ends up in a URL path or host: no characters that would move it.
    let plain = |field: &str, value: &str| {
        let ok = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(())
        } else {
            Err(ConfigError::invalid(
                key(field),
                "must be letters, digits, '-', '_' or '.'",
            ))
        }
    };
    Ok(Some(Box::new(match provider {
        ProviderKind::Okta => {
            let text = org_url.unwrap_or_default();
            let url = parse_url(&key("org_url"), &text, false)?;
            if url.path() != "/" || url.query().is_some() {
                return Err(ConfigError::invalid(
                    key("org_url"),
                    "must be the org's base URL, like https://example.okta.com (no path)",
                ));
            }
            let app_id = app_id.unwrap_or_default();
            plain("app_id", &app_id)?;
            ProviderIds::Okta {
                org_url: url,
                app_id,
            }
        }
        ProviderKind::Auth0 => {
            let domain = domain.unwrap_or_default();
            plain("domain", &domain)?;
            ProviderIds::Auth0 { domain }
        }
        ProviderKind::Keycloak => {
            let text = base_url.unwrap_or_default();
            let url = parse_url(&key("base_url"), &text, false)?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(ConfigError::invalid(
                    key("base_url"),
                    "must be the server's base URL, like https://sso.example.com (a path prefix such as /auth is fine, a query is not)",
                ));
            }
            let realm = realm.unwrap_or_default();
            plain("realm", &realm)?;
            let client_uuid = client_uuid.unwrap_or_default();
            plain("client_uuid", &client_uuid)?;
            ProviderIds::Keycloak {
                base_url: url,
                realm,
                client_uuid,
            }
        }
        ProviderKind::Entra => {
            let tenant = tenant.unwrap_or_default();
            plain("tenant", &tenant)?;
            let application_object_id = application_object_id.unwrap_or_default();
            plain("application_object_id", &application_object_id)?;
            ProviderIds::Entra {
                tenant,
                application_object_id,
            }
        }
        _ => return Ok(None),
    })))
}

fn validate_endpoints(
    i: usize,
    provider: ProviderKind,
    defaults: &(Option<String>, Option<String>),
    raw: Option<RawEndpoints>,
) -> Result<EndpointsConfig, ConfigError> {
    let key = |field: &str| format!("credentials[{i}].endpoints.{field}");
    let raw = raw.unwrap_or(RawEndpoints {
        token_url: None,
        secrets_url: None,
        allow_insecure_http: false,
        connect_timeout: None,
        request_timeout: None,
    });
    let token_text = raw
        .token_url
        .or_else(|| defaults.0.clone())
        .or_else(|| provider.default_token_url().map(str::to_owned))
        .ok_or_else(|| ConfigError::invalid(key("token_url"), "is required for provider oauth2"))?;
    let token_url = parse_url(&key("token_url"), &token_text, raw.allow_insecure_http)?;
    let secrets_url = match raw
        .secrets_url
        .or_else(|| defaults.1.clone())
        .or_else(|| provider.default_secrets_url().map(str::to_owned))
    {
        Some(_) if !provider.has_secret_api() => {
            return Err(ConfigError::invalid(
                key("secrets_url"),
                format!("provider {} has no secret API", provider.as_str()),
            ));
        }
        Some(text) => Some(parse_url(
            &key("secrets_url"),
            &text,
            raw.allow_insecure_http,
        )?),
        None => None,
    };
    let connect_timeout = raw
        .connect_timeout
        .map(|t| duration(&key("connect_timeout"), t))
        .transpose()?
        .unwrap_or(Duration::from_secs(10));
    let request_timeout = raw
        .request_timeout
        .map(|t| duration(&key("request_timeout"), t))
        .transpose()?
        .unwrap_or(Duration::from_secs(30));
    Ok(EndpointsConfig {
        token_url,
        secrets_url,
        connect_timeout,
        request_timeout,
    })
}

/// Secrets travel in these requests, so plain HTTP is only allowed where no
/// network sees it (loopback) unless the operator opts in explicitly.
/// The errors name the host at most, never the URL as written: it may
/// embed credentials (refused below, but only once it parses).
fn parse_url(key: &str, text: &str, allow_insecure_http: bool) -> Result<Url, ConfigError> {
    let url =
        Url::parse(text).map_err(|e| ConfigError::invalid(key, format!("invalid URL ({e})")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || host_is_loopback(&url) => {}
        "http" => {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "plain http to a non-loopback host ({}) would expose secrets; use https or set endpoints.allow_insecure_http = true",
                    url.host_str().unwrap_or_default()
                ),
            ));
        }
        other => {
            return Err(ConfigError::invalid(
                key,
                format!("unsupported scheme {other:?}; expected https"),
            ));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::invalid(
            key,
            "must not embed credentials in the URL",
        ));
    }
    Ok(url)
}

fn host_is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// `[credentials.registration]`: only for `provider = "oauth2"` (the other
/// providers have their own secret APIs), both keys required.
fn validate_registration(
    i: usize,
    provider: ProviderKind,
    allow_insecure_http: bool,
    raw: RawRegistration,
) -> Result<RegistrationConfig, ConfigError> {
    let key = |field: &str| format!("credentials[{i}].registration.{field}");
    if provider != ProviderKind::OAuth2 {
        return Err(ConfigError::invalid(
            format!("credentials[{i}].registration"),
            format!(
                "applies only to provider oauth2 (RFC 7592); provider {} has its own secret API",
                provider.as_str()
            ),
        ));
    }
    let client_uri = raw
        .client_uri
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| ConfigError::invalid(key("client_uri"), "is required"))?;
    let client_uri = parse_url(&key("client_uri"), &client_uri, allow_insecure_http)?;
    let access_token_file = raw
        .access_token_file
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| ConfigError::invalid(key("access_token_file"), "is required"))?;
    Ok(RegistrationConfig {
        client_uri,
        access_token_file,
    })
}

/// `[credentials.jwks]`: only for an oauth2 `private_key_jwt` client
/// without `[credentials.registration]` (whose keys are in the
/// registration), with somewhere to publish. `state_dir`, the default
/// file and the Secret's cluster are filled in by [`validate`].
fn validate_jwks(
    i: usize,
    provider: ProviderKind,
    method: AuthMethod,
    registration: bool,
    raw: RawJwks,
) -> Result<JwksConfig, ConfigError> {
    let table = format!("credentials[{i}].jwks");
    let key = |field: &str| format!("{table}.{field}");
    if provider != ProviderKind::OAuth2 || method != AuthMethod::PrivateKeyJwt {
        return Err(ConfigError::invalid(
            table,
            "applies only to provider oauth2 with auth_method = \"private_key_jwt\" \
             (it publishes the client's public keys for its jwks_uri)",
        ));
    }
    if registration {
        return Err(ConfigError::invalid(
            table,
            "does not apply with [credentials.registration]: keys are published in the \
             registration's jwks there; give one of the two",
        ));
    }
    if raw.file.is_none() && raw.serve_path.is_none() && raw.kubernetes_secret.is_none() {
        return Err(ConfigError::invalid(
            table,
            "needs file, serve_path or kubernetes_secret: somewhere to publish the keys",
        ));
    }
    if let Some(file) = &raw.file
        && !file.is_absolute()
    {
        return Err(ConfigError::invalid(
            key("file"),
            format!("must be an absolute path, got {file:?}"),
        ));
    }
    if let Some(path) = &raw.serve_path {
        let segments_ok = path.len() > 1
            && path.starts_with('/')
            && path[1..].split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
            });
        if !segments_ok {
            return Err(ConfigError::invalid(
                key("serve_path"),
                format!(
                    "{path:?} is not a path like \"/jwks/app.json\" (segments of a-z, A-Z, \
                     0-9, '-', '.', '_', '~')"
                ),
            ));
        }
        if crate::serve::api::DIAG_PATHS
            .iter()
            .any(|p| p.split('/').nth(1) == path.split('/').nth(1))
        {
            return Err(ConfigError::invalid(
                key("serve_path"),
                format!("{path:?} is a diagnostics path of rekeyd's own"),
            ));
        }
    }
    let kubernetes_secret = match raw.kubernetes_secret {
        None => None,
        Some(name) => {
            if !is_dns_subdomain(&name) {
                return Err(ConfigError::invalid(
                    key("kubernetes_secret"),
                    format!(
                        "{name:?} is not a Kubernetes object name (lowercase a-z, 0-9, '-' and '.', at most 253)"
                    ),
                ));
            }
            Some(SecretSink {
                namespace: None,
                secret: name,
                key: JWKS_SECRET_KEY.to_string(),
                kubeconfig: None,
            })
        }
    };
    Ok(JwksConfig {
        file: raw.file,
        serve_path: raw.serve_path,
        kubernetes_secret,
    })
}

fn validate_rotation(
    i: usize,
    provider: ProviderKind,
    published: bool,
    raw: RawRotation,
) -> Result<RotationConfig, ConfigError> {
    let key = |field: &str| format!("credentials[{i}].rotation.{field}");
    if provider == ProviderKind::OAuth2 && !published {
        return Err(ConfigError::invalid(
            format!("credentials[{i}].rotation"),
            "provider oauth2 rotates its secret only through RFC 7592 registration management \
             (add [credentials.registration] with client_uri and access_token_file) or, for a \
             private_key_jwt client whose server fetches its jwks_uri, [credentials.jwks]",
        ));
    }
    if !provider.has_secret_api() && !published {
        return Err(ConfigError::invalid(
            format!("credentials[{i}].rotation"),
            format!(
                "provider {} has no secret API, so its secret cannot be rotated by rekeyd",
                provider.as_str()
            ),
        ));
    }
    let trigger = match (raw.every, raw.schedule) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                key("every"),
                "set either `every` or `schedule`, not both",
            ));
        }
        (Some(every), None) => {
            let d = duration(&key("every"), every)?;
            if d < Duration::from_secs(1) || d > Duration::from_secs(10 * 365 * 86400) {
                return Err(ConfigError::invalid(
                    key("every"),
                    "must be between 1s and 10 years",
                ));
            }
            RotationTrigger::Every(d)
        }
        (None, Some(schedule)) => {
            validate_cron(&key("schedule"), &schedule)?;
            RotationTrigger::Schedule(schedule)
        }
        // `max_secret_age` alone: rotate only when the secret gets that old;
        // `before_expiry` alone: only before the provider's expiry.
        (None, None)
            if raw.on_login || raw.max_secret_age.is_some() || raw.before_expiry.is_some() =>
        {
            RotationTrigger::Manual
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                key("every"),
                "one of `every`, `schedule`, `max_secret_age`, `before_expiry` or `on_login = true` is required",
            ));
        }
    };
    let grace = raw
        .grace
        .map(|g| duration(&key("grace"), g))
        .transpose()?
        .unwrap_or(DEFAULT_ROTATION_GRACE);
    if grace > MAX_ROTATION_GRACE {
        return Err(ConfigError::invalid(
            key("grace"),
            "must be at most 30 days: the old secret stays valid that long",
        ));
    }
    let max_secret_age = raw
        .max_secret_age
        .map(|a| duration(&key("max_secret_age"), a))
        .transpose()?;
    if let Some(age) = max_secret_age {
        // Shorter than the grace period, every rotation would be followed
        // by another before the old secret is even deleted.
        if age <= grace || age < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                key("max_secret_age"),
                format!(
                    "must be at least 1s and longer than `grace` ({})",
                    humantime::format_duration(grace)
                ),
            ));
        }
    }
    let before_expiry = raw
        .before_expiry
        .map(|b| duration(&key("before_expiry"), b))
        .transpose()?;
    if let Some(lead) = before_expiry {
        // Zero would rotate only once the secret no longer works (I1).
        if lead < Duration::from_secs(1) || lead > Duration::from_secs(10 * 365 * 86400) {
            return Err(ConfigError::invalid(
                key("before_expiry"),
                "must be between 1s and 10 years: how long before the provider's expiry of the secret a rotation is due",
            ));
        }
    }
    let verify_window = raw
        .verify_window
        .map(|w| duration(&key("verify_window"), w))
        .transpose()?;
    if let Some(window) = verify_window
        && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window)
    {
        return Err(ConfigError::invalid(
            key("verify_window"),
            "must be between 1s and 1h: how long a login with the new secret or key is retried before it counts as refused",
        ));
    }
    Ok(RotationConfig {
        trigger,
        grace,
        on_login: raw.on_login,
        max_secret_age,
        before_expiry,
        verify_window,
    })
}

/// Checks a cron expression with seconds ("sec min hour day month weekday").
fn validate_cron(key: &str, expr: &str) -> Result<(), ConfigError> {
    crate::rotation::schedule::parse_cron(expr)
        .map(|_| ())
        .map_err(|reason| ConfigError::invalid(key, reason))
}

fn validate_sink(key: &str, raw: RawSink, credential: &str) -> Result<SinkConfig, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let kind = raw.kind.as_deref().unwrap_or("file");
    // Settings of the other kind, or of another format, are refused: the
    // operator expects them to do something.
    let given = [
        ("path", raw.path.is_some(), "file"),
        ("mode", raw.mode.is_some(), "file"),
        ("owner", raw.owner.is_some(), "file"),
        ("group", raw.group.is_some(), "file"),
        ("secret", raw.secret.is_some(), "kubernetes-secret"),
        ("key", raw.key.is_some(), "kubernetes-secret"),
        ("namespace", raw.namespace.is_some(), "kubernetes-secret"),
        ("kubeconfig", raw.kubeconfig.is_some(), "kubernetes-secret"),
    ];
    if kind == "file" || kind == "kubernetes-secret" {
        for (name, present, applies_to) in given {
            if present && kind != applies_to {
                return Err(ConfigError::invalid(
                    field(name),
                    format!("applies to kind = {applies_to:?}, not {kind:?}"),
                ));
            }
        }
    }
    let format = sink_format(
        key,
        raw.format.as_deref(),
        raw.variable,
        raw.template,
        credential,
    )?;
    let target = match kind {
        "file" => SinkTarget::File(file_sink(key, raw.path, raw.mode, raw.owner, raw.group)?),
        "kubernetes-secret" => SinkTarget::KubernetesSecret(secret_sink(
            key,
            raw.secret,
            raw.key,
            raw.namespace,
            raw.kubeconfig,
        )?),
        other => {
            return Err(ConfigError::invalid(
                field("kind"),
                format!("expected \"file\" or \"kubernetes-secret\", got {other:?}"),
            ));
        }
    };
    Ok(SinkConfig { format, target })
}

/// `format`, with `variable` (env) and `template` (template), which belong
/// to those formats only.
fn sink_format(
    key: &str,
    format: Option<&str>,
    variable: Option<String>,
    template: Option<PathBuf>,
    credential: &str,
) -> Result<SinkFormat, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let format = format.unwrap_or("raw");
    if variable.is_some() && format != "env" {
        return Err(ConfigError::invalid(
            field("variable"),
            format!("applies to format = \"env\", not {format:?}"),
        ));
    }
    if template.is_some() && format != "template" {
        return Err(ConfigError::invalid(
            field("template"),
            format!("applies to format = \"template\", not {format:?}"),
        ));
    }
    Ok(match format {
        "raw" => SinkFormat::Raw,
        "json" => SinkFormat::Json,
        "header" => SinkFormat::Header,
        "exec-credential" => SinkFormat::ExecCredential,
        "env" => {
            let variable =
                variable.unwrap_or_else(|| crate::format::default_env_variable(credential));
            if !crate::format::is_env_variable(&variable) {
                return Err(ConfigError::invalid(
                    field("variable"),
                    format!(
                        "{variable:?} is not an environment variable name (letters, digits and '_', not starting with a digit)"
                    ),
                ));
            }
            SinkFormat::Env { variable }
        }
        "template" => {
            let Some(path) = template else {
                return Err(ConfigError::invalid(
                    field("template"),
                    "is required for format = \"template\" (the template file)",
                ));
            };
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    field("template"),
                    format!("must be an absolute path, got {path:?}"),
                ));
            }
            let template = crate::format::TokenTemplate::load(&path).map_err(|reason| {
                ConfigError::invalid(field("template"), format!("{}: {reason}", path.display()))
            })?;
            SinkFormat::Template(template)
        }
        other => {
            return Err(ConfigError::invalid(
                field("format"),
                format!("expected {}, got {other:?}", crate::format::FORMAT_NAMES),
            ));
        }
    })
}

/// The file of systemd credential `name` (`initial_secret_credential`):
/// `$CREDENTIALS_DIRECTORY/name`. systemd sets that variable only for a
/// service with credentials (LoadCredential=, LoadCredentialEncrypted=,
/// SetCredential=; <https://systemd.io/CREDENTIALS/>), so its absence means
/// the unit lacks the line, which no restart fixes: a configuration error
/// for the daemon ([`Config::require_credentials`]). The operator's
/// commands (`rekeyd check`, `status`, `history`, ...), run from a shell
/// without it, load the configuration all the same: `None` then, and the
/// bootstrap secret is unreadable until the variable is set
/// ([`CredentialConfig::initial_secret_path`]).
/// A credential name is a plain file name in that directory.
fn credential_file(
    key: &str,
    name: &str,
    credentials_directory: Option<&Path>,
) -> Result<Option<PathBuf>, ConfigError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control)
        // NAME_MAX: systemd refuses longer credential names as well.
        && name.len() <= 255;
    if !plain {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{name:?} is not a credential name (a plain file name: no '/', not \".\" or \"..\", at most 255 bytes)"
            ),
        ));
    }
    let Some(dir) = credentials_directory else {
        return Ok(None);
    };
    if !dir.is_absolute() {
        return Err(ConfigError::invalid(
            key,
            format!("${CREDENTIALS_DIRECTORY} must be an absolute path, got {dir:?}"),
        ));
    }
    Ok(Some(dir.join(name)))
}

/// Why the file of systemd credential `name` cannot be found: no
/// `$CREDENTIALS_DIRECTORY` in this process's environment.
fn no_credentials_directory(key: &str, name: &str) -> ConfigError {
    ConfigError::invalid(
        key,
        format!(
            "${CREDENTIALS_DIRECTORY} is not set: the service needs \
             LoadCredential={name}:/path/to/secret (or LoadCredentialEncrypted=) in its \
             systemd unit, which sets it; outside systemd, set {CREDENTIALS_DIRECTORY} to \
             the directory holding {name:?}"
        ),
    )
}

fn file_sink(
    key: &str,
    path: Option<PathBuf>,
    mode: Option<RawScalar>,
    owner: Option<RawScalar>,
    group: Option<RawScalar>,
) -> Result<FileSink, ConfigError> {
    let path = path.ok_or_else(|| ConfigError::invalid(format!("{key}.path"), "is required"))?;
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(ConfigError::invalid(
            format!("{key}.path"),
            format!("must be an absolute file path, got {:?}", path),
        ));
    }
    let mode = sink_mode(&format!("{key}.mode"), mode)?;
    let owner = sink_owner(&format!("{key}.owner"), owner, Principal::User)?;
    let group = sink_owner(&format!("{key}.group"), group, Principal::Group)?;
    Ok(FileSink {
        path,
        mode,
        owner,
        group,
    })
}

/// Longest data key of a Secret sink: its expiry annotation
/// `rekeyd/<key>.expires-at` must keep its name part within the 63
/// characters Kubernetes allows.
pub const MAX_SECRET_SINK_KEY: usize = 63 - ".expires-at".len();

fn secret_sink(
    key: &str,
    secret: Option<String>,
    data_key: Option<String>,
    namespace: Option<String>,
    kubeconfig: Option<PathBuf>,
) -> Result<SecretSink, ConfigError> {
    let field = |f: &str| format!("{key}.{f}");
    let secret = secret.ok_or_else(|| {
        ConfigError::invalid(
            field("secret"),
            "is required for kind = \"kubernetes-secret\" (the Secret's name)",
        )
    })?;
    if !is_dns_subdomain(&secret) {
        return Err(ConfigError::invalid(
            field("secret"),
            format!(
                "{secret:?} is not a Kubernetes object name (lowercase a-z, 0-9, '-' and '.', at most 253)"
            ),
        ));
    }
    let data_key = data_key.unwrap_or_else(|| DEFAULT_SECRET_SINK_KEY.to_string());
    // A Secret data key is `[-._a-zA-Z0-9]+`; the annotation recording the
    // expiry also needs it to start with a letter or digit and stay short.
    let valid_key = data_key.len() <= MAX_SECRET_SINK_KEY
        && data_key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && data_key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !valid_key {
        return Err(ConfigError::invalid(
            field("key"),
            format!(
                "{data_key:?} is not a usable Secret data key (letters, digits, '-', '.' and '_', starting with a letter or digit, at most {MAX_SECRET_SINK_KEY})"
            ),
        ));
    }
    if let Some(ns) = &namespace
        && !is_dns_label(ns)
    {
        return Err(ConfigError::invalid(
            field("namespace"),
            format!("{ns:?} is not a Kubernetes namespace name"),
        ));
    }
    if let Some(path) = &kubeconfig
        && !path.is_absolute()
    {
        return Err(ConfigError::invalid(
            field("kubeconfig"),
            format!("must be an absolute path, got {path:?}"),
        ));
    }
    Ok(SecretSink {
        namespace,
        secret,
        key: data_key,
        kubeconfig,
    })
}

/// The bits a token file may have: read and write for its owner, read for
/// its group. Others are refused rather than applied: access for all users
/// (I7), execute (a token is no program) and group write (readers never
/// write; rekeyd replaces the file). This also refuses a mode written as a
/// decimal TOML number by mistake: `640` is 0o1200, `440` is 0o670.
pub const SINK_MODE_ALLOWED: u32 = 0o640;

/// `mode`: a TOML integer is the mode itself (`0o640`), text is octal
/// digits (`"0640"`). Errors quote text as written and never print an
/// integer, which may not be in the base the operator used.
fn sink_mode(key: &str, value: Option<RawScalar>) -> Result<u32, ConfigError> {
    const FORMS: &str = "write it in octal, as the TOML integer 0o640 or the text \"0640\"";
    let (mode, shown) = match value {
        None => return Ok(DEFAULT_SINK_MODE),
        Some(RawScalar::Text(text)) => {
            let digits = text.strip_prefix("0o").unwrap_or(&text);
            let mode = u32::from_str_radix(digits, 8)
                .ok()
                .filter(|m| digits.chars().all(|c| c.is_ascii_digit()) && *m <= 0o777);
            let Some(mode) = mode else {
                return Err(ConfigError::invalid(
                    key,
                    format!("{text:?} is not an octal file mode; {FORMS}"),
                ));
            };
            (mode, format!("{text:?}"))
        }
        Some(RawScalar::Integer(n)) => {
            let Some(mode) = u32::try_from(n).ok().filter(|m| *m <= 0o777) else {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "this integer is not a file mode (a TOML integer is taken as the \
                         number it is, not as octal digits); {FORMS}"
                    ),
                ));
            };
            (mode, "this mode".to_string())
        }
        Some(RawScalar::Other(kind)) => {
            return Err(ConfigError::invalid(key, format!("got {kind}; {FORMS}")));
        }
    };
    let refusal = if mode & 0o007 != 0 {
        // I7: a token file is never world-readable.
        Some("gives access to all users; token files must not be world-accessible")
    } else if mode & 0o400 == 0 {
        Some("does not let the owner read the file")
    } else if mode & 0o111 != 0 {
        Some("makes the file executable; a token file is not a program")
    } else if mode & 0o020 != 0 {
        Some("lets the group write the file; readers only read it, rekeyd replaces it")
    } else {
        None
    };
    debug_assert!(refusal.is_some() || mode & !SINK_MODE_ALLOWED == 0);
    match refusal {
        Some(why) => Err(ConfigError::invalid(
            key,
            format!(
                "{shown} {why} (allowed: read and write for the owner, read for the group, such as 0o640 or \"0600\")"
            ),
        )),
        None => Ok(mode),
    }
}

#[derive(Debug, Clone, Copy)]
enum Principal {
    User,
    Group,
}

/// `owner` or `group`: a name known to this system, or a numeric id (TOML
/// integer or digits). Names are resolved now, so a typo is a
/// configuration error rather than a failed write.
fn sink_owner(
    key: &str,
    value: Option<RawScalar>,
    principal: Principal,
) -> Result<Option<FileOwner>, ConfigError> {
    let what = match principal {
        Principal::User => "user",
        Principal::Group => "group",
    };
    // u32::MAX is chown(2)'s "leave unchanged", never a real id.
    let valid_id = |n: i64| u32::try_from(n).ok().filter(|id| *id != u32::MAX);
    let bad_id = || {
        ConfigError::invalid(
            key,
            format!("this number is not a {what} id (0 to 4294967294)"),
        )
    };
    let text = match value {
        None => return Ok(None),
        Some(RawScalar::Integer(n)) => {
            let id = valid_id(n).ok_or_else(bad_id)?;
            return Ok(Some(FileOwner {
                id,
                shown: id.to_string(),
            }));
        }
        Some(RawScalar::Text(text)) => text,
        Some(RawScalar::Other(kind)) => {
            return Err(ConfigError::invalid(
                key,
                format!("expected a {what} name or a numeric id, got {kind}"),
            ));
        }
    };
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        let id = text
            .parse::<i64>()
            .ok()
            .and_then(valid_id)
            .ok_or_else(bad_id)?;
        return Ok(Some(FileOwner { id, shown: text }));
    }
    let found = match principal {
        Principal::User => crate::fsutil::user_id(&text),
        Principal::Group => crate::fsutil::group_id(&text),
    };
    match found {
        Ok(Some(id)) => Ok(Some(FileOwner { id, shown: text })),
        Ok(None) => Err(ConfigError::invalid(
            key,
            format!(
                "no {what} named {text:?} on this system; give a numeric id where the name is \
                 not known (a container without that entry in /etc/{})",
                match principal {
                    Principal::User => "passwd",
                    Principal::Group => "group",
                }
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            key,
            format!("cannot look up {what} {text:?}: {e}"),
        )),
    }
}

/// A duration key's value: text with units (`"30s"`, `"24h"`). A bare
/// number has no unit, so it is refused with the form to use; the message
/// does not repeat the number, which the `config` crate may have rewritten
/// (a TOML `0x1E` arrives as 30).
fn duration(key: &str, value: RawScalar) -> Result<Duration, ConfigError> {
    let text = duration_text(key, value)?;
    parse_duration(key, &text)
}

fn duration_text(key: &str, value: RawScalar) -> Result<String, ConfigError> {
    let kind = match value {
        RawScalar::Text(text) => return Ok(text),
        RawScalar::Integer(_) => "a number without a unit",
        RawScalar::Other(kind) => kind,
    };
    Err(ConfigError::invalid(
        key,
        format!(
            "a duration is text with a unit, such as \"90s\", \"5m\" or \"24h\" (in quotes), \
             got {kind}"
        ),
    ))
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("invalid duration {text:?} ({e}); use e.g. \"30s\", \"5m\", \"24h\""),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of a configuration that cannot be read.
    fn load_error(text: &str) -> String {
        match Config::from_toml(text) {
            Err(ConfigError::Load { message, .. }) => message,
            other => panic!("expected a load error, got {other:?}"),
        }
    }

    #[test]
    fn parse_errors_give_key_and_position_never_the_text() {
        const VALUE: &str = "eyJhbGciOi.assertion.value";
        let credential = "[[credentials]]\nname = \"a\"\nprovider = \"oauth2\"\n";
        for (text, expected) in [
            (
                format!("{credential}extra_params = {{ client_assertion = \"{VALUE}\" x }}\n"),
                "TOML syntax error at line 4, column 66 (in [[credentials]]): missing comma between key-value pairs, expected `,`",
            ),
            (
                format!(
                    "{credential}[credentials.endpoints]  # note\ntoken_url = \"{VALUE}\nx = 1\n"
                ),
                "TOML syntax error at line 5, column 40 (in [credentials.endpoints]): invalid basic string, expected `\"`",
            ),
            (
                format!("{credential}extra_params.a = \"{VALUE}\"\nextra_params.a = \"{VALUE}\"\n"),
                "TOML syntax error at line 5, column 14 (in [[credentials]]): duplicate key",
            ),
            (
                format!("{credential}[credentials.endpoints]\nallow_insecure_http = \"{VALUE}\"\n"),
                "key `credentials[0].endpoints.allow_insecure_http`: expected a boolean, found a string",
            ),
            (
                format!("{credential}client_id = [\"{VALUE}\"]\n"),
                "key `credentials[0].client_id`: expected a string, found a sequence",
            ),
        ] {
            let message = load_error(&text);
            assert_eq!(message, expected, "{text}");
            assert!(!message.contains("assertion"), "{message}");
        }
        // A URL that embeds a password is named by key and host only.
        for (url, reason) in [
            (
                "http://user:pa55w0rd-value@auth.example.com/t",
                "plain http to a non-loopback host (auth.example.com)",
            ),
            (
                "https://user:pa55w0rd-value@auth.example.com:99999/t",
                "invalid URL (invalid port number)",
            ),
        ] {
            let Err(e) = Config::from_toml(&format!(
                "{credential}client_id = \"c\"\ninitial_secret_file = \"/x\"\n\
                 [credentials.endpoints]\ntoken_url = \"{url}\"\n"
            )) else {
                panic!("{url} accepted");
            };
            let message = e.to_string();
            assert!(
                message.contains("`credentials[0].endpoints.token_url`")
                    && message.contains(reason),
                "{message}"
            );
            assert!(!message.contains("pa55w0rd"), "{message}");
        }
        assert_eq!(
            without_file_text(r#"invalid value: string "x", expected `a`"#),
            r#"invalid value: string "...", expected `a`"#
        );
        // A key quoted as written by serde: kept when it reads like a key,
        // hidden when it could be a secret pasted as a key (found by the
        // `config` fuzz target).
        assert_eq!(
            load_error("colour = 1\nstate_dir = \"/x\"\n"),
            "unknown field `colour`, expected one of `state_dir`, `api`, `diag`, `log`, `store`, `credentials`"
        );
        for key in [
            "\"fzS3cr3t-Qm9vN2xhYmVsLXJvdGF0ZQ\"",
            "a1b2c3d4e5f6",
            "x0000000000000000000000000000000000",
        ] {
            let message = load_error(&format!("{key} = \"#\"\n"));
            assert!(
                message.starts_with("unknown field `...`, expected one of `state_dir`"),
                "{message}"
            );
        }
    }

    #[test]
    fn lexical_normalization_drops_dots_and_resolves_parents() {
        for (spelled, normal) in [
            ("/etc/rekeyd/./x/../maps.secret", "/etc/rekeyd/maps.secret"),
            ("/etc//rekeyd/maps.secret", "/etc/rekeyd/maps.secret"),
            ("/etc/rekeyd/", "/etc/rekeyd"),
            ("/../etc", "/etc"),
        ] {
            assert_eq!(
                normalize_lexically(Path::new(spelled)),
                Path::new(normal),
                "{spelled}"
            );
        }
    }

    #[test]
    fn a_shared_client_warning_names_both_keys() {
        let credential = |name: &str| {
            format!(
                "[[credentials]]\nname = \"{name}\"\nprovider = \"mappls\"\nclient_id = \"c\"\n\
                 initial_secret_file = \"/etc/rekeyd/{name}.secret\"\n"
            )
        };
        let config = Config::from_toml(&[credential("a"), credential("b")].concat()).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key, "credentials[1].client_id");
        assert!(warnings[0].reason.contains("`credentials[0].client_id`"));
    }
}
