//! The rotation history's hash chain, pure: appending entries, dropping the
//! oldest beyond the bound behind a marker, and verifying the chain. No
//! I/O; [`super`] reads and writes the history through the store.
//!
//! Each entry carries in `prev` the SHA-256 (hex) of the previous entry's
//! canonical serialization ([`Entry::digest`]: compact JSON, fields in
//! declaration order, absent options left out), so editing an entry breaks
//! the link from the next one, and removing or inserting one breaks the
//! sequence numbers or a link. The first entry ever written has `seq` 0 and
//! `prev` [`GENESIS`].
//!
//! Bound: when the history holds more than its limit, the oldest entries
//! are dropped and a [`Step::Truncated`] marker takes the place of the
//! last one dropped: its `seq` is that entry's, its `prev` that entry's
//! digest, and `dropped` how many entries are gone (all up to and
//! including `seq`, so `dropped == seq + 1`). The entry after the marker
//! still names that digest in its own `prev`, so the kept entries are never
//! rewritten and the chain still verifies; a history cut from the front by
//! anything else starts without a marker and no longer at `seq` 0, which
//! [`verify`] reports.
//!
//! What a chain without a key cannot show: removing the newest entries, or
//! rewriting the whole file consistently. For that, every entry's `seq` and
//! digest also go to the systemd journal (see `crate::journal`), an
//! independent copy to compare with.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `prev` of the first entry ever written: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The history document's format; a reader refuses others.
pub const FORMAT_VERSION: u32 = 1;

/// What happened. Serialized in snake_case (`orphan_removed`); the names are
/// a stable interface (`rekeyd history --json`, `GET /v1/history/{name}`,
/// the journal's `REKEYD_STEP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// A rotation began (`rid`); `detail` says why (`schedule`, `forced`,
    /// `on_login`, `max_secret_age`, `provider_expiry`).
    Started,
    /// An operator asked for a rotation (SIGUSR1, `rekeyd rotate`,
    /// `POST /v1/rotate/{name}`); followed by `started`.
    Forced,
    /// The provider created the replacement secret (`secret_id`).
    Created,
    /// The replacement secret logged in.
    Verified,
    /// The replacement secret is current; the old one is kept for the grace
    /// period (`detail` names it).
    Promoted,
    /// The rotation ended: the promoted secret logged in once more after
    /// the grace period, and the old one is committed to deletion.
    Completed,
    /// The rotation was abandoned (the provider refused the new secret);
    /// the previous secret is current.
    Aborted,
    /// A retired secret (`secret_id`) was deleted at the provider.
    Deleted,
    /// A secret tagged for this credential that no journal tracked (a lost
    /// reply, a list that lagged) was deleted at the provider (S7).
    OrphanRemoved,
    /// An operator installed a secret (`rekeyd set-secret`).
    Set,
    /// Older entries were dropped to keep the history bounded.
    Truncated,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Forced => "forced",
            Step::Created => "created",
            Step::Verified => "verified",
            Step::Promoted => "promoted",
            Step::Completed => "completed",
            Step::Aborted => "aborted",
            Step::Deleted => "deleted",
            Step::OrphanRemoved => "orphan_removed",
            Step::Set => "set",
            Step::Truncated => "truncated",
        }
    }
}

/// A step to record: what happened, never a secret value (I7). Provider
/// ids and rotation ids only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub step: Step,
    /// The rotation's id, for steps of a rotation.
    pub rid: Option<String>,
    /// The provider's id of the secret the step concerns.
    pub secret_id: Option<String>,
    /// Free text for the operator; never holds a secret.
    pub detail: Option<String>,
}

impl Event {
    pub fn new(step: Step) -> Self {
        Event {
            step,
            rid: None,
            secret_id: None,
            detail: None,
        }
    }

    pub fn rid(mut self, rid: &str) -> Self {
        self.rid = Some(rid.to_string());
        self
    }

    pub fn secret(mut self, id: Option<&str>) -> Self {
        self.secret_id = id.map(str::to_string);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// One entry of the history as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// 0 for the first entry ever written, then one more per entry.
    pub seq: u64,
    /// When the step was recorded (RFC 3339, UTC, milliseconds).
    pub at: String,
    pub step: Step,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Markers only: how many entries were dropped in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// SHA-256 (hex) of the previous entry's canonical serialization.
    pub prev: String,
}

impl Entry {
    /// SHA-256 (hex) of this entry's canonical serialization: what the next
    /// entry's `prev` holds.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let canonical = serde_json::to_vec(self).expect("an entry serializes");
        hex::encode(sha2::Sha256::digest(canonical))
    }

    /// What the entry after this one must name in `prev`: this entry's
    /// digest, or, for a marker, the digest of the dropped entry it stands
    /// in for.
    fn link(&self) -> String {
        if self.step == Step::Truncated {
            self.prev.clone()
        } else {
            self.digest()
        }
    }
}

/// The stored history of one credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    pub format: u32,
    /// The credential the history belongs to: a history copied over
    /// another credential's does not verify.
    pub credential: String,
    /// Oldest first.
    pub entries: Vec<Entry>,
}

impl Document {
    pub fn new(credential: &str) -> Self {
        Document {
            format: FORMAT_VERSION,
            credential: credential.to_string(),
            entries: Vec::new(),
        }
    }
}

/// Appends `events` (recorded at `now`) to `doc`, then drops the oldest
/// entries beyond `limit` behind a marker. Returns the entries added.
/// `limit` is at least 2 (a marker and one entry); config keeps it far
/// above. The new entries are never dropped.
pub fn append(doc: &mut Document, events: &[Event], now: SystemTime, limit: usize) -> Vec<Entry> {
    append_marked(doc, events, now, limit).0
}

/// [`append`], also returning the marker it wrote when it dropped entries
/// (which then stands first in `doc`).
pub fn append_marked(
    doc: &mut Document,
    events: &[Event],
    now: SystemTime,
    limit: usize,
) -> (Vec<Entry>, Option<Entry>) {
    let at = humantime::format_rfc3339_millis(now).to_string();
    let mut added = Vec::with_capacity(events.len());
    for event in events {
        let (seq, prev) = match doc.entries.last() {
            Some(last) => (last.seq + 1, last.link()),
            None => (0, GENESIS.to_string()),
        };
        let entry = Entry {
            seq,
            at: at.clone(),
            step: event.step,
            rid: event.rid.clone(),
            secret_id: event.secret_id.clone(),
            detail: event.detail.clone(),
            dropped: None,
            prev,
        };
        doc.entries.push(entry.clone());
        added.push(entry);
    }
    let marker = truncate(doc, &at, limit.max(2).max(events.len() + 1));
    (added, marker)
}

/// Drops the oldest entries so that at most `limit` remain, a marker
/// counted, as the module doc describes. Returns the new marker, if it
/// dropped any.
fn truncate(doc: &mut Document, at: &str, limit: usize) -> Option<Entry> {
    if doc.entries.len() <= limit {
        return None;
    }
    let marked = doc
        .entries
        .first()
        .is_some_and(|e| e.step == Step::Truncated);
    let real_start = usize::from(marked);
    // Room for the marker.
    let keep = limit - 1;
    let real = doc.entries.len() - real_start;
    let drop = real - keep;
    let last_dropped = &doc.entries[real_start + drop - 1];
    let marker = Entry {
        seq: last_dropped.seq,
        at: at.to_string(),
        step: Step::Truncated,
        rid: None,
        secret_id: None,
        detail: None,
        dropped: Some(last_dropped.seq + 1),
        prev: last_dropped.link(),
    };
    doc.entries.drain(..real_start + drop);
    doc.entries.insert(0, marker.clone());
    Some(marker)
}

/// Why a history does not verify: the first bad entry and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct ChainError {
    /// Position of the first bad entry in the document (0 = oldest kept).
    pub index: usize,
    /// Its `seq`, when it has one.
    pub seq: Option<u64>,
    pub what: String,
}

/// Checks `doc` as the history of credential `name`: the format, the owner,
/// the sequence numbers, every link, and that the history starts at the
/// beginning or at a marker.
pub fn verify(doc: &Document, name: &str) -> Result<(), ChainError> {
    let bad = |index: usize, seq: Option<u64>, what: String| ChainError { index, seq, what };
    if doc.format != FORMAT_VERSION {
        return Err(bad(
            0,
            None,
            format!(
                "unsupported history format {} (this rekeyd reads {FORMAT_VERSION})",
                doc.format
            ),
        ));
    }
    if doc.credential != name {
        return Err(bad(
            0,
            None,
            format!(
                "the history names credential {:?}, not {name:?} (copied from another credential?)",
                doc.credential
            ),
        ));
    }
    let mut previous: Option<&Entry> = None;
    for (index, entry) in doc.entries.iter().enumerate() {
        let at = |what: String| {
            Err(bad(
                index,
                Some(entry.seq),
                format!("entry {index} (seq {}): {what}", entry.seq),
            ))
        };
        if entry.step == Step::Truncated {
            if index != 0 {
                return at(
                    "a truncation marker after the first entry (entries were moved or inserted)"
                        .into(),
                );
            }
            if entry.dropped != Some(entry.seq + 1) {
                return at(format!(
                    "the truncation marker's count ({}) does not match its sequence number (edited)",
                    entry
                        .dropped
                        .map_or_else(|| "none".to_string(), |d| d.to_string())
                ));
            }
        } else if entry.dropped.is_some() {
            return at("an entry other than a truncation marker carries `dropped` (edited)".into());
        }
        if entry.prev.len() != 64 || !entry.prev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return at("`prev` is not a SHA-256 in hex (edited)".into());
        }
        match previous {
            None if entry.step == Step::Truncated => {}
            None => {
                if entry.seq != 0 || entry.prev != GENESIS {
                    return at(
                        "the history does not start at its beginning and no truncation marker says why (entries before it were removed)"
                            .into(),
                    );
                }
            }
            Some(p) => {
                if entry.seq != p.seq + 1 {
                    return at(format!(
                        "sequence number follows {} (an entry was removed or inserted)",
                        p.seq
                    ));
                }
                if entry.prev != p.link() {
                    return at(format!(
                        "`prev` does not match the digest of the entry before it (seq {}): that entry was edited, or this one was",
                        p.seq
                    ));
                }
            }
        }
        previous = Some(entry);
    }
    Ok(())
}

/// The bytes of `doc` as stored (pretty JSON: an operator reads it with
/// `cat`, `etcdctl get` or `kubectl get`). Digests do not depend on this
/// layout: they are taken over each entry's canonical form.
pub fn encode(doc: &Document) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(doc).expect("a history serializes");
    bytes.push(b'\n');
    bytes
}

/// Parses what [`encode`] wrote. The error says where, not what (a hand-
/// edited history is not expected to hold secrets, but quoting stays off
/// as for the record, I7).
pub fn decode(bytes: &[u8]) -> Result<Document, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a rotation history ({}) at line {} column {}",
            match e.classify() {
                serde_json::error::Category::Eof => "truncated",
                serde_json::error::Category::Syntax => "not valid JSON",
                _ => "unexpected shape",
            },
            e.line(),
            e.column()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn filled(n: usize, limit: usize) -> Document {
        let mut doc = Document::new("maps");
        for i in 0..n {
            append(
                &mut doc,
                &[Event::new(Step::Created)
                    .rid("r")
                    .secret(Some(&format!("s{i}")))],
                t(i as u64),
                limit,
            );
        }
        doc
    }

    #[test]
    fn a_fresh_chain_verifies_and_links_each_entry_to_the_one_before() {
        let doc = filled(5, 200);
        assert_eq!(doc.entries.len(), 5);
        assert_eq!(doc.entries[0].prev, GENESIS);
        assert_eq!(doc.entries[3].prev, doc.entries[2].digest());
        verify(&doc, "maps").unwrap();
        let round = decode(&encode(&doc)).unwrap();
        assert_eq!(round, doc);
        verify(&round, "maps").unwrap();
    }

    #[test]
    fn editing_any_field_is_found_at_the_next_entry() {
        let doc = filled(5, 200);
        let mut edited = doc.clone();
        edited.entries[2].secret_id = Some("other".into());
        let e = verify(&edited, "maps").unwrap_err();
        assert_eq!((e.index, e.seq), (3, Some(3)), "{e}");
        let mut edited = doc.clone();
        edited.entries[1].at = "2020-01-01T00:00:00.000Z".into();
        assert_eq!(verify(&edited, "maps").unwrap_err().index, 2);
    }

    #[test]
    fn removing_an_entry_in_the_middle_or_at_the_front_is_found() {
        let doc = filled(5, 200);
        let mut cut = doc.clone();
        cut.entries.remove(2);
        let e = verify(&cut, "maps").unwrap_err();
        assert_eq!(e.index, 2, "{e}");
        let mut front = doc.clone();
        front.entries.drain(..2);
        let e = verify(&front, "maps").unwrap_err();
        assert_eq!((e.index, e.seq), (0, Some(2)), "{e}");
        assert!(e.what.contains("does not start"), "{e}");
    }

    #[test]
    fn the_bound_drops_the_oldest_behind_a_marker_that_still_verifies() {
        let doc = filled(25, 10);
        assert_eq!(doc.entries.len(), 10);
        let marker = &doc.entries[0];
        assert_eq!(marker.step, Step::Truncated);
        assert_eq!(marker.dropped, Some(16));
        assert_eq!(marker.seq, 15);
        assert_eq!(doc.entries[1].seq, 16);
        assert_eq!(doc.entries[9].seq, 24);
        verify(&doc, "maps").unwrap();
        // Cutting the marker and more from the front is still found.
        let mut cut = doc.clone();
        cut.entries.drain(..3);
        assert!(verify(&cut, "maps").is_err());
        // So is a marker that lies about what it dropped.
        let mut lying = doc.clone();
        lying.entries[0].dropped = Some(3);
        assert_eq!(verify(&lying, "maps").unwrap_err().index, 0);
        // And a kept entry removed right after the marker.
        let mut gap = doc.clone();
        gap.entries.remove(1);
        assert_eq!(verify(&gap, "maps").unwrap_err().index, 1);
    }

    #[test]
    fn append_returns_the_marker_it_wrote() {
        let mut doc = filled(9, 10);
        let (added, marker) = append_marked(&mut doc, &[Event::new(Step::Set)], t(100), 10);
        assert_eq!((added.len(), marker), (1, None));
        let (added, marker) = append_marked(&mut doc, &[Event::new(Step::Set)], t(101), 10);
        assert_eq!(added.len(), 1);
        assert_eq!(marker.as_ref(), Some(&doc.entries[0]));
        // 11 entries, limit 10: the marker and the newest 9.
        assert_eq!(marker.unwrap().dropped, Some(2));
        // Beyond the bound, every append writes a new marker.
        let (_, marker) = append_marked(&mut doc, &[Event::new(Step::Set)], t(102), 10);
        assert_eq!(marker.unwrap().dropped, Some(3));
    }

    #[test]
    fn the_marker_links_to_the_last_dropped_entry() {
        let full = filled(12, 200);
        let bounded = filled(12, 10);
        // 12 entries, limit 10: 9 kept (seq 3..=11), marker for seq 0..=2.
        assert_eq!(bounded.entries[0].prev, full.entries[2].digest());
        assert_eq!(bounded.entries[1], full.entries[3]);
    }

    #[test]
    fn another_credentials_history_does_not_verify() {
        let doc = filled(2, 200);
        assert!(verify(&doc, "other").unwrap_err().what.contains("\"maps\""));
    }

    #[test]
    fn decode_errors_do_not_quote_the_bytes() {
        let e =
            decode(b"{\"format\":1,\"credential\":\"maps\",\"entries\":[{\"seq\":\"hunter2\"}]}")
                .unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
