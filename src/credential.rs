//! What the rest of the daemon sees of one running credential: its current
//! token and its status, both as watch channels so readers never block the
//! engine and always see the latest value.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::token::Token;

/// Human- and machine-readable state of a credential. Holds no secrets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CredentialStatus {
    pub name: String,
    pub provider: String,
    /// Wall-clock expiry of the token being served.
    #[serde(serialize_with = "serialize_time")]
    pub token_expires_at: Option<SystemTime>,
    #[serde(serialize_with = "serialize_time")]
    pub last_refresh_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Every secret we know of was rejected by the provider.
    pub locked_out: bool,
    pub rotation_phase: String,
    /// For an unfinished journal: what rekeyd waits for and the command
    /// that gets out of it ([`crate::rotation::waiting_for`]).
    pub rotation_waiting_for: Option<String>,
    pub last_rotation_error: Option<String>,
    /// Set while the provider refuses the rotation in a way that will not
    /// change on retry (e.g. the client already has its maximum number of
    /// secrets): the provider's error code, else its HTTP status. Retried
    /// slowly, and at once on `rekeyd rotate` or `POST /v1/rotate/{name}`.
    pub rotation_needs_operator: Option<String>,
    #[serde(serialize_with = "serialize_time")]
    pub last_rotated_at: Option<SystemTime>,
}

fn serialize_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

/// The reading side of a running credential.
#[derive(Clone)]
pub struct CredentialHandle {
    pub name: String,
    pub token: watch::Receiver<Option<Arc<Token>>>,
    pub status: watch::Receiver<CredentialStatus>,
    /// Wakes the token engine for an immediate refresh.
    pub refresh_now: Arc<Notify>,
    /// Asks for a rotation now (credentials with rotation configured).
    pub rotate_now: Arc<Notify>,
    /// Whether this credential's secret is rotated by rekeyd.
    pub rotates: bool,
}

impl CredentialHandle {
    /// The current token, if it has not expired.
    pub fn valid_token(&self) -> Option<Arc<Token>> {
        let now = Instant::now();
        self.token
            .borrow()
            .as_ref()
            .filter(|t| t.is_valid(now))
            .cloned()
    }
}

/// The writing side, shared by the credential's tasks.
#[derive(Clone)]
pub struct CredentialChannels {
    pub token: watch::Sender<Option<Arc<Token>>>,
    pub status: watch::Sender<CredentialStatus>,
    pub refresh_now: Arc<Notify>,
    pub rotate_now: Arc<Notify>,
    /// Wakes the token engine after a rotation promoted a new secret (S5).
    /// Apart from `refresh_now` because that login must not ask for yet
    /// another rotation (`on_login`), or rotations would chain forever.
    pub promoted: Arc<Notify>,
}

impl CredentialChannels {
    /// A new reading side for these channels.
    pub fn handle(&self, name: &str) -> CredentialHandle {
        CredentialHandle {
            name: name.to_string(),
            token: self.token.subscribe(),
            status: self.status.subscribe(),
            refresh_now: self.refresh_now.clone(),
            rotate_now: self.rotate_now.clone(),
            rotates: false,
        }
    }
}

/// Creates the channels of a credential and the handle that reads them.
pub fn channels(name: &str, provider: &str) -> (CredentialChannels, CredentialHandle) {
    let (token_tx, token_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(CredentialStatus {
        name: name.to_string(),
        provider: provider.to_string(),
        rotation_phase: "idle".to_string(),
        ..Default::default()
    });
    let refresh_now = Arc::new(Notify::new());
    let rotate_now = Arc::new(Notify::new());
    (
        CredentialChannels {
            token: token_tx,
            status: status_tx,
            refresh_now: refresh_now.clone(),
            rotate_now: rotate_now.clone(),
            promoted: Arc::new(Notify::new()),
        },
        CredentialHandle {
            name: name.to_string(),
            token: token_rx,
            status: status_rx,
            refresh_now,
            rotate_now,
            rotates: false,
        },
    )
}
