//! The rotation history: every rotation step, operator install and forced
//! rotation of a credential, appended to a bounded, hash-chained history
//! kept in the store next to the credential's record ([`chain`] has the
//! format and the rules).
//!
//! Order: a step is appended after the journal write that commits it has
//! landed, never before. A crash in between loses that one entry; it never
//! records a step that did not happen. The history is an audit trail, not
//! a journal: nothing resumes from it, and a history that cannot be written
//! (store unreachable, a history that no longer parses) costs a warning,
//! never a rotation step (I1 does not depend on it).
//!
//! Nothing of it is kept in memory between appends: each append reads the
//! stored history, adds to it and writes it back with the store's
//! compare-and-swap (another process, a replica or `rekeyd set-secret`, may
//! append at the same time).

pub mod chain;

use std::time::SystemTime;

pub use chain::{ChainError, Document, Entry, Event, Step};

use crate::store::{Store, StoreError};

/// Entries kept per credential unless `[store] history_limit` says
/// otherwise (a marker for the dropped ones included).
pub const DEFAULT_LIMIT: usize = 200;
/// Bounds of `[store] history_limit`.
pub const MIN_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 100_000;

/// Appends lost to concurrent appenders before giving up.
const MAX_ATTEMPTS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored history does not parse. It is left as it is (evidence);
    /// nothing is appended until an operator moves it away.
    #[error("the rotation history of {name} is unreadable: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("the rotation history of {0} kept changing under concurrent appends")]
    Contended(String),
}

/// A version for history bytes in stores without one of their own: the
/// first 8 bytes of their SHA-256.
pub(crate) fn content_version(bytes: &[u8]) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The stored history of `name`, if any.
pub async fn load(store: &dyn Store, name: &str) -> Result<Option<Document>, HistoryError> {
    let Some(stored) = store.load_history(name).await? else {
        return Ok(None);
    };
    chain::decode(&stored.value)
        .map(Some)
        .map_err(|reason| HistoryError::Corrupt {
            name: name.to_string(),
            reason,
        })
}

/// Appends `events` to the history of `name`, returning the entries as
/// stored. A store that keeps no history (test models) records nothing.
pub async fn append(
    store: &dyn Store,
    name: &str,
    events: &[Event],
    now: SystemTime,
) -> Result<Vec<Entry>, HistoryError> {
    append_batches(store, name, &[(now, events.to_vec())]).await
}

/// [`append`] for several batches of events, each recorded at its own
/// time, in one write of the history.
pub async fn append_batches(
    store: &dyn Store,
    name: &str,
    batches: &[(SystemTime, Vec<Event>)],
) -> Result<Vec<Entry>, HistoryError> {
    append_batches_marked(store, name, batches)
        .await
        .map(|(added, _)| added)
}

/// [`append_batches`], also returning the [`Step::Truncated`] marker the
/// write left at the head of the history when it dropped older entries
/// to keep the history bounded.
pub async fn append_batches_marked(
    store: &dyn Store,
    name: &str,
    batches: &[(SystemTime, Vec<Event>)],
) -> Result<(Vec<Entry>, Option<Entry>), HistoryError> {
    let count: usize = batches.iter().map(|(_, events)| events.len()).sum();
    if count == 0 || !store.keeps_history() {
        return Ok((Vec::new(), None));
    }
    // Lowered when the store refuses the history as too large for one of
    // its objects: the oldest entries go behind the marker, as for
    // `history_limit`.
    let mut limit = store.history_limit();
    for _ in 0..MAX_ATTEMPTS {
        let stored = store.load_history(name).await?;
        let (expected, mut doc) = match stored {
            None => (None, Document::new(name)),
            Some(v) => (
                Some(v.version),
                chain::decode(&v.value).map_err(|reason| HistoryError::Corrupt {
                    name: name.to_string(),
                    reason,
                })?,
            ),
        };
        let mut added = Vec::with_capacity(count);
        // A later batch's marker replaces an earlier one's.
        let mut marker = None;
        for (at, events) in batches {
            let (entries, new_marker) = chain::append_marked(&mut doc, events, *at, limit);
            added.extend(entries);
            marker = new_marker.or(marker);
        }
        match store
            .swap_history(name, expected, &chain::encode(&doc))
            .await
        {
            Ok(_) => return Ok((added, marker)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::TooLarge {
                size, limit: max, ..
            }) if doc.entries.len() > count + 1 => {
                limit = (doc.entries.len() / 2).max(count + 1);
                tracing::warn!(step = "history", credential = %name, bytes = size, max_bytes = max, kept = limit, "the rotation history is too large for the store; keeping fewer of its oldest entries");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HistoryError::Contended(name.to_string()))
}

/// Records `events` of credential `name` after the journal write that
/// committed them: appends them to the history and sends them to the
/// systemd journal ([`crate::journal`]). Never fails: a history that cannot
/// be written is warned about, and the journal still gets the events.
pub async fn record(store: &dyn Store, name: &str, events: &[Event], now: SystemTime) {
    record_batches(store, name, &[(now, events.to_vec())]).await;
}

/// [`record`] for several batches of events, each with its own time, in one
/// write of the history.
pub async fn record_batches(store: &dyn Store, name: &str, batches: &[(SystemTime, Vec<Event>)]) {
    let events: Vec<&Event> = batches.iter().flat_map(|(_, e)| e).collect();
    if events.is_empty() {
        return;
    }
    match append_batches_marked(store, name, batches).await {
        Ok((entries, marker)) if !entries.is_empty() => {
            // The marker too: the journal is the copy a truncated history
            // is compared with (a marker the journal never saw was forged).
            for entry in entries.iter().chain(&marker) {
                crate::journal::audit(name, entry.step, &entry_fields(entry));
            }
        }
        result => {
            if let Err(e) = result {
                tracing::warn!(step = "history", credential = %name, error = %e, "cannot append to the rotation history; the steps are in the log only");
            }
            for event in events {
                crate::journal::audit(name, event.step, &event_fields(event));
            }
        }
    }
}

fn event_fields(event: &Event) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(rid) = &event.rid {
        fields.push(("REKEYD_ROTATION_ID", rid.clone()));
    }
    if let Some(id) = &event.secret_id {
        fields.push(("REKEYD_SECRET_ID", id.clone()));
    }
    if let Some(detail) = &event.detail {
        fields.push(("REKEYD_DETAIL", detail.clone()));
    }
    fields
}

fn entry_fields(entry: &Entry) -> Vec<(&'static str, String)> {
    let mut fields = event_fields(&Event {
        step: entry.step,
        rid: entry.rid.clone(),
        secret_id: entry.secret_id.clone(),
        detail: entry.detail.clone(),
    });
    fields.push(("REKEYD_HISTORY_SEQ", entry.seq.to_string()));
    if let Some(dropped) = entry.dropped {
        fields.push(("REKEYD_HISTORY_DROPPED", dropped.to_string()));
    }
    fields.push(("REKEYD_HISTORY_DIGEST", entry.digest()));
    fields
}

/// The history as `rekeyd history --json` and `GET /v1/history/{name}`
/// show it: the stored document plus whether its chain verifies.
pub fn to_json(doc: &Document, name: &str) -> serde_json::Value {
    let verified = chain::verify(doc, name);
    serde_json::json!({
        "credential": name,
        "verified": verified.is_ok(),
        "verify_error": verified.err().map(|e| e.to_string()),
        "entries": doc.entries.iter().map(|e| {
            let mut v = serde_json::to_value(e).expect("an entry serializes");
            v["digest"] = serde_json::json!(e.digest());
            v
        }).collect::<Vec<_>>(),
    })
}
