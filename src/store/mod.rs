//! Durable per-credential state: the secret in use and the rotation journal.
//!
//! The [`Store`] trait is shaped for compare-and-swap on a version number, so
//! the same rotation driver works on the local file store and on shared
//! stores where other replicas write concurrently.

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
pub mod kubernetes;
pub mod record;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::{Config, StoreConfig};

pub use record::{
    CredentialRecord, RegistrationToken, RetiredSecret, Rotation, SecretEntry, sha256_hex,
};

/// A value together with the version it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else wrote since we read: re-read and decide again.
    #[error("store record for {name} changed concurrently (expected version {expected:?})")]
    Conflict { name: String, expected: Option<u64> },
    /// The record exists but cannot be understood. Never silently replaced:
    /// it may hold the only copy of a working secret.
    #[error("store record {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A shared store could not be reached or refused the request. `target`
    /// names the object or key, `reason` the status and the server's code.
    #[error("store {target}: {reason}")]
    Unavailable { target: String, reason: String },
    /// The write would make the object larger than the store takes (a
    /// Kubernetes Secret holds at most 1 MiB, an etcd request 1.5 MiB by
    /// default): nothing was written. `size` and `limit` in bytes.
    #[error("store {target}: {size} bytes would exceed the {limit}-byte limit of the object")]
    TooLarge {
        target: String,
        size: usize,
        limit: usize,
    },
}

/// Held while one actor drives a rotation of a credential (I6); dropping it
/// releases the claim.
///
/// A claim only makes it likely that one actor works at a time (DESIGN.md
/// S1): a Lease or an etcd lease can lapse under a stalled API server, a
/// paused process or a suspended machine. Safety comes from the journal's
/// compare-and-swap; the claim's job is to keep a holder that may have lost
/// it from *starting* side effects (S3).
pub trait Claim: Send + Sync {
    /// Whether a new side effect may start now: the holder's last confirmed
    /// renewal is recent enough that no other actor can have taken the
    /// claim over yet (S3). A kernel lock never lapses: always true.
    fn is_fresh(&self) -> bool {
        true
    }

    /// Cancelled once the claim is lost or its renewal has failed for so
    /// long that it may have been taken over (S3); the rotation run then
    /// stops at its next step and the journal is resumed later. A kernel
    /// lock is never lost: a token that is never cancelled.
    fn lost(&self) -> tokio_util::sync::CancellationToken {
        tokio_util::sync::CancellationToken::new()
    }
}

pub trait Store: Send + Sync {
    /// Claims the right to rotate credential `name`. `wait`: block until the
    /// current holder lets go; otherwise `Ok(None)` when someone holds it.
    fn claim<'a>(
        &'a self,
        name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Claim>>, StoreError>>;

    /// Proves that a record for `name` can be written now (space, permissions),
    /// so a rotation stops before the provider creates anything (I2).
    fn check_writable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Reads the record of credential `name`, if there is one. May return
    /// the record a write still in flight is replacing: fine for logins,
    /// which re-read when a secret is refused.
    fn load<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>>;

    /// Like [`Store::load`], but first waits for a write of `name` still in
    /// flight to land (S4): for whoever decides what the journal needs next
    /// (a rotation run, a restarted credential, an operator command), so
    /// nobody resumes from the record a write is replacing. Shared stores
    /// serve every read after the writes it answered: `load` already is.
    fn load_settled<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        self.load(name)
    }

    /// Writes `record` if the stored version is still `expected` (`None`:
    /// only if no record exists) and returns the new version.
    fn compare_and_swap<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Whether this store keeps a rotation history ([`crate::history`]).
    /// Every configurable store does; test models need not.
    fn keeps_history(&self) -> bool {
        false
    }

    /// How many entries the history of a credential keeps
    /// (`[store] history_limit`).
    fn history_limit(&self) -> usize {
        crate::history::DEFAULT_LIMIT
    }

    /// The stored rotation history of `name` (bytes as
    /// [`crate::history::chain::encode`] writes them) with a version for
    /// [`Store::swap_history`]. A separate object from the record, so that
    /// appending to it never makes a journal compare-and-swap fail, and a
    /// history that cannot be written never stops a rotation.
    fn load_history<'a>(
        &'a self,
        _name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<Vec<u8>>>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Writes the history of `name` if its stored version is still
    /// `expected` (`None`: only if there is none), like
    /// [`Store::compare_and_swap`]; [`StoreError::Conflict`] otherwise.
    fn swap_history<'a>(
        &'a self,
        name: &'a str,
        _expected: Option<u64>,
        _bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            Err(StoreError::Unavailable {
                target: format!("history of {name}"),
                reason: "this store keeps no rotation history".into(),
            })
        })
    }
}

/// Opens the store that `[store]` configures. Shared stores connect here, so
/// a daemon that cannot reach its store says so before it starts anything.
pub async fn open(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match &config.store {
        StoreConfig::File => {
            let store =
                file::FileStore::new(&config.state_dir).with_history_limit(config.history_limit);
            // Like a stale socket: what a killed process left is cleared at
            // the next start (I7: those temp files hold secrets).
            let swept = store.sweep_temp_files()?;
            if swept > 0 {
                tracing::info!(
                    step = "start",
                    swept,
                    "removed temp files an interrupted write left in the state directory"
                );
            }
            Ok(Arc::new(store))
        }
        StoreConfig::Kubernetes(k8s) => Ok(Arc::new(
            kubernetes::KubernetesStore::connect(k8s)
                .await?
                .with_history_limit(config.history_limit),
        )),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => Ok(Arc::new(
            etcd::EtcdStore::connect(etcd)
                .await?
                .with_history_limit(config.history_limit),
        )),
        // Config validation rejects `kind = "etcd"` in builds without it.
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => Err(StoreError::Unavailable {
            target: "etcd".into(),
            reason: "this rekeyd was built without the `etcd` cargo feature".into(),
        }),
    }
}
