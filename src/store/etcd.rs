//! The etcd store: credential records shared by a fleet of hosts.
//!
//! Keys under the configured prefix:
//!
//! - `<prefix>/credentials/<name>`: the record, the same JSON document the
//!   file store writes. Its version is the key's `mod_revision`, so
//!   compare-and-swap is one etcd transaction comparing it.
//! - `<prefix>/claims/<name>`: present while a process rotates `<name>`
//!   (I6). Its value names the holder; it is attached to a lease that the
//!   holder keeps alive, so a holder killed with `kill -9` loses the claim
//!   once the lease runs out and another replica resumes the journal.
//! - `<prefix>/probes/<name>`: written and deleted by `check_writable`.
//! - `<prefix>/history/<name>`: the credential's rotation history
//!   ([`crate::history`]), versioned by its `mod_revision` like the record,
//!   written without the claim's fence (any process that committed a step
//!   appends it).
//!
//! Timing (S3). The lease expires on the etcd server, timed by the server
//! alone, so no replica needs to time another. The holder keeps it alive
//! every `claim_ttl / 4` and counts from the instant it *sent* its last
//! keep-alive that the server answered with a live TTL: once that is older
//! than half the TTL, `is_fresh()` is false and no new side effect starts
//! (a holder resumed after a pause or a suspend sees this at once: its
//! clocks kept running). A keep-alive that finds the lease gone, or
//! failures that last until the claim is stale, cancel `lost()`. What this
//! assumes: that the server's clock and ours run at nearly the same *rate*,
//! and that the pause between an `is_fresh()` check and the side effect it
//! licenses is short next to half the TTL. Safety does not rest on it
//! (S1): every destructive provider call is licensed by a compare-and-swap
//! of the journal, and while a claim is held those writes are fenced on its
//! lease, so a holder whose lease expired unnoticed writes nothing.
//!
//! Every request is bounded in time, by a quarter of the claim TTL (at
//! least 1 s, at most 5 s): a partitioned cluster makes a rotation fail (to
//! be resumed later), never hang, and never holds a step past the claim.
//! Errors name the key and the gRPC status, never a record's contents (I7).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::kubernetes::{Renewal, Tenure, keep_renewed, request_timeout};
use super::{Claim, CredentialRecord, Store, StoreError, Versioned, record};
use crate::config::{EtcdStoreConfig, EtcdTls};

/// Upper bound on one unary request (get, put, txn, lease calls), whatever
/// the claim TTL: generous next to a healthy cluster's milliseconds, short
/// enough that an unreachable one is reported while the operator is still
/// looking. Shorter TTLs bound requests at a quarter of the TTL (S3).
/// The largest history value written to one key, in bytes: below etcd's
/// default request limit (`--max-request-bytes`, 1.5 MiB).
pub const HISTORY_KEY_BYTES: usize = 1024 * 1024;

const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on establishing a TCP connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// The configured endpoints, for error messages.
    endpoints: String,
    claim_ttl: Duration,
    /// Bound on each request, below the claim TTL (S3).
    timeout: Duration,
    /// Written into claim keys: who rotates, for an operator reading etcd.
    holder: String,
    /// Claims this process holds: credential name → lease id. Writes to a
    /// claimed credential are fenced on that lease (see `compare_and_swap`).
    held: Arc<Mutex<HashMap<String, i64>>>,
    history_limit: usize,
}

impl EtcdStore {
    /// Connects and proves the cluster answers a linearizable read (which
    /// needs a leader and a quorum), so a daemon pointed at a dead cluster
    /// stops at start-up instead of failing later, one rotation at a time.
    pub async fn connect(config: &EtcdStoreConfig) -> Result<Self, StoreError> {
        let endpoints = config.endpoints.join(",");
        let target = format!("etcd {}", config.prefix);
        let timeout = request_timeout(config.claim_ttl, MAX_REQUEST_TIMEOUT);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            // HTTP/2 pings notice a dead connection while a watch waits.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls));
        }
        if let Some(auth) = &config.auth {
            // Validated as UTF-8 text when the configuration was loaded.
            let password = String::from_utf8_lossy(auth.password.expose()).into_owned();
            options = options
                .with_user(auth.username.as_str(), password)
                // etcd's auth tokens expire (`--auth-token-ttl`, 5 min of
                // disuse for simple tokens); the client signs in again
                // rather than fail the next request.
                .with_auto_token_refresh(true);
        }
        let client = bounded(
            &target,
            &endpoints,
            timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|e| with_hint(e, config))?;
        let store = EtcdStore {
            client,
            prefix: config.prefix.clone(),
            endpoints,
            claim_ttl: config.claim_ttl,
            timeout,
            holder: holder_identity(),
            held: Arc::default(),
            history_limit: crate::history::DEFAULT_LIMIT,
        };
        let mut client = store.client.clone();
        let probe = GetOptions::new().with_count_only();
        store
            .call(
                &config.prefix,
                client.get(config.prefix.as_str(), Some(probe)),
            )
            .await
            .map_err(|e| with_hint(e, config))?;
        Ok(store)
    }

    /// Keeps at most `limit` history entries per credential.
    pub fn with_history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    /// Runs one request with the timeout, mapping failures to `Unavailable`.
    async fn call<T>(
        &self,
        key: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        bounded(
            &format!("etcd {key}"),
            &self.endpoints,
            self.timeout,
            request,
        )
        .await
    }

    /// The lease of this process's claim on `name`, if it holds one.
    fn held_lease(&self, name: &str) -> Option<i64> {
        self.held.lock().expect("claims map").get(name).copied()
    }

    /// One attempt at the claim.
    async fn try_claim(&self, name: &str) -> Result<Attempt, StoreError> {
        let key = self.key("claims", name);
        let mut client = self.client.clone();
        let ttl = lease_ttl_seconds(self.claim_ttl);
        // The lease's TTL runs on the server from when it got the grant,
        // which is after we sent it (S3).
        let tenure = Tenure::sending(self.claim_ttl);
        let lease = self.call(&key, client.lease_grant(ttl, None)).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                self.holder.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let outcome = self.call(&key, client.txn(txn)).await;
        match outcome {
            Ok(r) if r.succeeded() => {}
            other => {
                // Not ours: the unused lease would expire by itself, but an
                // explicit revoke keeps the cluster's lease table small. After
                // an error too: should the txn have landed unanswered, the
                // revoke deletes the claim key again rather than leave it
                // held by nobody until the TTL runs out.
                let _ = self.call(&key, client.lease_revoke(lease)).await;
                let response = other?;
                let revision =
                    first_get(response.op_responses()).map_or(0, |(revision, _lease)| revision);
                return Ok(Attempt::HeldAt(revision));
            }
        }
        debug!(key, lease, "rotation claim taken");
        let stop = CancellationToken::new();
        self.held
            .lock()
            .expect("claims map")
            .insert(name.to_string(), lease);
        tokio::spawn(keep_alive(
            self.client.clone(),
            key,
            lease,
            tenure.clone(),
            self.claim_ttl,
            self.timeout,
            stop.clone(),
        ));
        Ok(Attempt::Taken(EtcdClaim {
            name: name.to_string(),
            lease,
            held: self.held.clone(),
            tenure,
            stop,
        }))
    }

    /// Returns once the claim key (seen at `revision`) is deleted, or after
    /// one claim TTL at most: the caller tries again either way, so a missed
    /// event (compaction, a reconnect) costs a retry, not a hang.
    async fn wait_released(&self, name: &str, revision: i64) -> Result<(), StoreError> {
        let key = self.key("claims", name);
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = self
            .call(&key, client.watch(key.as_str(), Some(options)))
            .await?;
        let deadline = tokio::time::Instant::now() + self.claim_ttl;
        loop {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_elapsed) => return Ok(()),
                Ok(Ok(Some(response))) => {
                    let deleted = response
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete);
                    if deleted || response.canceled() {
                        return Ok(());
                    }
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(unavailable(&key, &self.endpoints, &e)),
            }
        }
    }
}

impl Store for EtcdStore {
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
            let key = self.key("history", name);
            let mut client = self.client.clone();
            let response = self.call(&key, client.get(key.as_str(), None)).await?;
            Ok(response.kvs().first().map(|kv| Versioned {
                version: u64::try_from(kv.mod_revision()).unwrap_or_default(),
                value: kv.value().to_vec(),
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
            let key = self.key("history", name);
            // Refused here, the history module keeps fewer entries: etcd
            // refuses requests over its --max-request-bytes (1.5 MiB by
            // default) for good.
            if bytes.len() > HISTORY_KEY_BYTES {
                return Err(StoreError::TooLarge {
                    target: key,
                    size: bytes.len(),
                    limit: HISTORY_KEY_BYTES,
                });
            }
            let conflict = || StoreError::Conflict {
                name: format!("{name} (history)"),
                expected,
            };
            let compare = match expected {
                Some(v) => Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    i64::try_from(v).map_err(|_| conflict())?,
                ),
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                key.as_str(),
                bytes.to_vec(),
                None,
            )]);
            let mut client = self.client.clone();
            let response = self.call(&key, client.txn(txn)).await?;
            if !response.succeeded() {
                return Err(conflict());
            }
            let revision = response.header().map_or(0, |h| h.revision());
            Ok(u64::try_from(revision).unwrap_or_default())
        })
    }

    fn claim<'a>(
        &'a self,
        name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Claim>>, StoreError>> {
        Box::pin(async move {
            loop {
                match self.try_claim(name).await? {
                    Attempt::Taken(claim) => return Ok(Some(Box::new(claim) as Box<dyn Claim>)),
                    Attempt::HeldAt(_) if !wait => return Ok(None),
                    Attempt::HeldAt(revision) => self.wait_released(name, revision).await?,
                }
            }
        })
    }

    fn check_writable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        // A read can succeed on a cluster that cannot write: a member cut
        // off from its quorum, the space quota exceeded (NOSPACE alarm),
        // credentials allowed to read only. Only a write proves that the
        // record of a secret the provider is about to create can be kept
        // (I2), so write a probe key and delete it again.
        Box::pin(async move {
            let key = self.key("probes", name);
            let mut client = self.client.clone();
            self.call(&key, client.put(key.as_str(), self.holder.as_str(), None))
                .await?;
            self.call(&key, client.delete(key.as_str(), None)).await?;
            Ok(())
        })
    }

    fn load<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        Box::pin(async move {
            let key = self.key("credentials", name);
            let mut client = self.client.clone();
            let response = self.call(&key, client.get(key.as_str(), None)).await?;
            response
                .kvs()
                .first()
                .map(|kv| decode(&key, kv.mod_revision(), kv.value()))
                .transpose()
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let key = self.key("credentials", name);
            let claim_key = self.key("claims", name);
            let conflict = || StoreError::Conflict {
                name: name.to_string(),
                expected,
            };
            let mut compares = vec![match expected {
                Some(v) => {
                    // Revisions are i64 in etcd; a larger one cannot be stored.
                    let v = i64::try_from(v).map_err(|_| conflict())?;
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, v)
                }
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            }];
            // Fencing: while this process holds the claim, its writes land
            // only if the claim key is still attached to our lease. A holder
            // that stalled past the TTL (a paused VM or process)
            // and lost the claim to another replica cannot then overwrite
            // that replica's journal.
            let fence = self.held_lease(name);
            if let Some(lease) = fence {
                compares.push(Compare::lease(claim_key.as_str(), CompareOp::Equal, lease));
            }
            // The document's own `version` field is not authoritative here
            // (the key's mod_revision is, and is known only after the put).
            let bytes = record::encode(record, 0);
            let txn = Txn::new()
                .when(compares)
                .and_then([TxnOp::put(key.as_str(), bytes, None)])
                .or_else([TxnOp::get(claim_key.as_str(), None)]);
            let mut client = self.client.clone();
            let response = self.call(&key, client.txn(txn)).await?;
            if response.succeeded() {
                // The txn's revision is the one its put gave the key.
                let revision = response.header().map_or(0, |h| h.revision());
                return u64::try_from(revision).map_err(|_| StoreError::Unavailable {
                    target: format!("etcd {key}"),
                    reason: format!("the cluster answered an invalid revision {revision}"),
                });
            }
            let claim_now = first_get(response.op_responses()).map(|(_, lease)| lease);
            match why_cas_failed(fence, claim_now) {
                CasFailure::Conflict => Err(conflict()),
                CasFailure::ClaimLost => Err(StoreError::Unavailable {
                    target: format!("etcd {claim_key}"),
                    reason: "this process's rotation claim expired (its lease was not renewed \
                             in time); another process may be rotating, nothing was written"
                        .to_string(),
                }),
            }
        })
    }
}

enum Attempt {
    Taken(EtcdClaim),
    /// Someone else holds it; their claim key's revision, to watch from.
    HeldAt(i64),
}

/// Held while this process rotates a credential. Dropping it stops the
/// keep-alive, which then revokes the lease (deleting the claim key).
struct EtcdClaim {
    name: String,
    lease: i64,
    held: Arc<Mutex<HashMap<String, i64>>>,
    tenure: Tenure,
    stop: CancellationToken,
}

impl Claim for EtcdClaim {
    fn is_fresh(&self) -> bool {
        self.tenure.is_fresh()
    }

    fn lost(&self) -> CancellationToken {
        self.tenure.lost()
    }
}

impl Drop for EtcdClaim {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("claims map");
        if held.get(&self.name) == Some(&self.lease) {
            held.remove(&self.name);
        }
        self.stop.cancel();
    }
}

/// Keeps the claim's lease alive every quarter of its TTL, recording in
/// `tenure` when each answered keep-alive was sent, until the claim is
/// dropped (`stop`); then revokes the lease. A keep-alive that finds the
/// lease gone, or failures until the claim is stale, cancel its `lost()`
/// (S3). If this process dies instead, the lease expires by itself.
async fn keep_alive(
    client: Client,
    key: String,
    lease: i64,
    tenure: Tenure,
    ttl: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    keep_renewed(tenure, ttl, timeout, &key, &stop, || {
        // A fresh keep-alive stream per renewal: one request, one answer.
        // Nothing to repair after a reconnect, and each attempt is bounded.
        let mut client = client.clone();
        async move {
            match client.lease_keep_alive(lease).await {
                Ok(_) => Renewal::Renewed,
                // The server answered TTL 0: the lease expired (or was
                // revoked) before this keep-alive reached it. Writes are
                // fenced on it, so this process can no longer change the
                // journal.
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                    Renewal::Lost("its lease expired before it was renewed")
                }
                Err(e) => Renewal::Failed(describe(&e)),
            }
        }
    })
    .await;
    // A lost claim is still revoked only when it is dropped: a write that
    // has started keeps its fence until it lands or fails (S4).
    stop.cancelled().await;
    // Best effort: if it fails, the lease expires after the TTL.
    let mut client = client;
    let _ = tokio::time::timeout(timeout, client.lease_revoke(lease)).await;
    debug!(key, lease, "rotation claim released");
}

/// Runs `request` with `timeout`; failures become `Unavailable`.
async fn bounded<T>(
    target: &str,
    endpoints: &str,
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StoreError::Unavailable {
            target: target.to_string(),
            reason: format!("{} (endpoints {endpoints})", describe(&e)),
        }),
        Err(_elapsed) => Err(StoreError::Unavailable {
            target: target.to_string(),
            reason: format!("no answer within {timeout:?} (endpoints {endpoints})"),
        }),
    }
}

fn unavailable(key: &str, endpoints: &str, e: &etcd_client::Error) -> StoreError {
    StoreError::Unavailable {
        target: format!("etcd {key}"),
        reason: format!("{} (endpoints {endpoints})", describe(e)),
    }
}

/// The gRPC status code and message (or the client's own error) with its root
/// cause, e.g. `gRPC status Unavailable: tcp connect error: Connection
/// refused`. etcd's messages are fixed texts: they never quote a value.
fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(status) => (
            format!("gRPC status {:?}: {}", status.code(), status.message()),
            std::error::Error::source(status),
        ),
        other => (other.to_string(), std::error::Error::source(other)),
    };
    // The root cause says what happened (`Connection refused`); the
    // layers between repeat the status message.
    let mut root = None;
    while let Some(cause) = source {
        root = Some(cause.to_string());
        source = cause.source();
    }
    if let Some(root) = root
        && !text.contains(&root)
    {
        text.push_str(": ");
        text.push_str(&root);
    }
    text
}

/// The client's TLS settings: the cluster's CA alone as the roots (the
/// system's are not consulted: an etcd cluster has its own CA), and the
/// client certificate when configured. Each member's name is checked
/// against its endpoint's host (RFC 6125), as etcd's own clients do.
fn tls_options(tls: &EtcdTls) -> TlsOptions {
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some(client) = &tls.client {
        options = options.identity(Identity::from_pem(
            &client.cert_pem,
            client.key_pem.expose(),
        ));
    }
    options
}

/// Adds what the operator should look at to a failed connection, when the
/// failure says it: the TLS and authentication settings are the usual
/// suspects of a cluster that is up but refuses us. The client's own
/// words stay in front.
fn with_hint(e: StoreError, config: &EtcdStoreConfig) -> StoreError {
    let StoreError::Unavailable { target, reason } = e else {
        return e;
    };
    let lower = reason.to_ascii_lowercase();
    let hint = if lower.contains("unknownissuer")
        || lower.contains("unknown issuer")
        || lower.contains("badsignature")
    {
        Some("the server's certificate is not signed by the CA in store.ca_file".to_string())
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host of store.endpoints (its \
             subjectAltName must)"
                .to_string(),
        )
    } else if lower.contains("certificaterequired")
        || lower.contains("certificate required")
        || lower.contains("bad certificate")
        || lower.contains("badcertificate")
        || lower.contains("unknown ca")
        || lower.contains("unknownca")
    {
        Some(match config.tls.as_ref().and_then(|t| t.client.as_ref()) {
            None => "the server asks for a client certificate (etcd --client-cert-auth): set \
                     store.cert_file and store.key_file"
                .to_string(),
            Some(_) => "the server refused the client certificate in store.cert_file (not \
                        signed by a CA its --trusted-ca-file names?)"
                .to_string(),
        })
    } else if config.tls.is_some()
        && ["connection closed", "connection reset", "broken pipe"]
            .iter()
            .any(|m| lower.contains(m))
    {
        // TLS 1.3: a server refuses a client certificate (or its absence)
        // after the client finished its handshake, and the client may see
        // only the connection closing, not the alert.
        Some(match config.tls.as_ref().and_then(|t| t.client.as_ref()) {
            None => "the server closed the TLS connection: if it asks for a client certificate \
                     (etcd --client-cert-auth), set store.cert_file and store.key_file"
                .to_string(),
            Some(_) => "the server closed the TLS connection: it may have refused the client \
                        certificate in store.cert_file (not signed by a CA its \
                        --trusted-ca-file names?)"
                .to_string(),
        })
    } else if lower.contains("authentication failed") {
        Some(match &config.auth {
            Some(auth) => format!(
                "etcd refused user {:?} with the password in store.password_file",
                auth.username
            ),
            None => "etcd wants a user: set store.username and store.password_file".to_string(),
        })
    } else if lower.contains("user name is empty") || lower.contains("invalid auth token") {
        Some(
            "etcd has authentication enabled: set store.username and store.password_file"
                .to_string(),
        )
    } else if lower.contains("permission denied") {
        Some(format!(
            "the etcd user lacks read-write access to the keys under {}",
            config.prefix
        ))
    } else {
        None
    };
    let reason = match hint {
        Some(hint) => format!("{reason}; {hint}"),
        None => reason,
    };
    StoreError::Unavailable { target, reason }
}

/// The record stored at `key`, or `Corrupt` naming the key (not the value).
fn decode(
    key: &str,
    mod_revision: i64,
    bytes: &[u8],
) -> Result<Versioned<CredentialRecord>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: format!("etcd {key}"),
        reason,
    };
    let version = u64::try_from(mod_revision)
        .map_err(|_| corrupt(format!("invalid mod_revision {mod_revision}")))?;
    let (_, value) = record::decode(bytes).map_err(corrupt)?;
    Ok(Versioned { version, value })
}

/// The (mod_revision, lease) of the key a txn's `or_else` get found.
fn first_get(responses: Vec<TxnOpResponse>) -> Option<(i64, i64)> {
    responses.into_iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| (kv.mod_revision(), kv.lease())),
        _ => None,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum CasFailure {
    /// The record changed since it was read.
    Conflict,
    /// Our claim's lease no longer holds the claim key.
    ClaimLost,
}

/// Why a compare-and-swap's compares failed, from the lease we fenced on
/// (if any) and the lease the claim key is attached to now (if it exists).
fn why_cas_failed(fenced_on: Option<i64>, claim_lease_now: Option<i64>) -> CasFailure {
    match fenced_on {
        Some(ours) if claim_lease_now != Some(ours) => CasFailure::ClaimLost,
        _ => CasFailure::Conflict,
    }
}

/// etcd leases have whole-second TTLs: round up, so the claim never lives
/// shorter than configured.
fn lease_ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// `host/pid/random`: unique per process, and says where to look.
fn holder_identity() -> String {
    format!(
        "{}/{}/{:08x}",
        hostname(),
        std::process::id(),
        rand::random::<u32>()
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SecretEntry;
    use secrecy::{ExposeSecret, SecretString};
    use std::time::SystemTime;

    #[test]
    fn cas_failure_is_claim_lost_only_when_fenced_and_the_lease_moved() {
        assert_eq!(why_cas_failed(None, None), CasFailure::Conflict);
        assert_eq!(why_cas_failed(None, Some(7)), CasFailure::Conflict);
        assert_eq!(why_cas_failed(Some(7), Some(7)), CasFailure::Conflict);
        assert_eq!(why_cas_failed(Some(7), Some(8)), CasFailure::ClaimLost);
        assert_eq!(why_cas_failed(Some(7), None), CasFailure::ClaimLost);
    }

    #[test]
    fn lease_ttl_rounds_up_to_whole_seconds() {
        assert_eq!(lease_ttl_seconds(Duration::from_secs(15)), 15);
        assert_eq!(lease_ttl_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(lease_ttl_seconds(Duration::from_millis(1)), 1);
    }

    #[test]
    fn holder_identities_differ_per_store() {
        let a = holder_identity();
        assert_ne!(a, holder_identity());
        assert!(a.contains(&format!("/{}/", std::process::id())), "{a}");
    }

    #[test]
    fn decode_round_trips_and_never_quotes_a_corrupt_value() {
        let record = CredentialRecord::new(SecretEntry {
            id: Some("id1".into()),
            value: SecretString::from("s3cret-value"),
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
        });
        let got = decode("/p/credentials/a", 42, &record::encode(&record, 0)).unwrap();
        assert_eq!(got.version, 42);
        assert_eq!(got.value.current.value.expose_secret(), "s3cret-value");

        let text = String::from_utf8(record::encode(&record, 0)).unwrap();
        let bad = text.replace("\"id1\"", "{\"x\":\"s3cret-value\"}");
        let err = decode("/p/credentials/a", 42, bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/p/credentials/a"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}
