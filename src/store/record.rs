//! The persisted record of one credential and its on-disk (JSON) form.

use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// A client secret with its provider id (when known) and creation time.
#[derive(Debug, Clone)]
pub struct SecretEntry {
    pub id: Option<String>,
    pub value: SecretString,
    pub created_at: SystemTime,
    /// When the provider says the secret stops working, on the provider's
    /// clock (Entra `endDateTime`, RFC 7591 `client_secret_expires_at`);
    /// `None`: it never expires, or rekeyd has not learnt when. A rotation
    /// is due before then whatever the trigger says
    /// ([`crate::rotation::schedule::expiry_due`]).
    pub expires_at: Option<SystemTime>,
}

/// The rotation journal (DESIGN.md): written before every external effect so
/// that a restart knows what may have happened at the provider.
#[derive(Debug, Clone, Default)]
pub enum Rotation {
    #[default]
    Idle,
    /// Intent recorded; the create call may or may not have reached the
    /// provider. `attempt` is written afresh by every actor that resumes this
    /// phase (S2) and is part of the created secret's tag, so the secrets of
    /// earlier attempts can be told apart and deleted. `chosen`: the value
    /// rekeyd generated for an API that takes caller-chosen values, stored
    /// before the call (I2) so that every retry sends the same one.
    Creating {
        rid: String,
        attempt: String,
        chosen: Option<SecretString>,
    },
    /// The provider answered; the new secret is persisted but not yet proven.
    Created { rid: String, pending: SecretEntry },
    /// `current` is the new secret; `old` is deleted after `delete_after`.
    Promoted {
        rid: String,
        old: SecretEntry,
        delete_after: SystemTime,
    },
}

impl Rotation {
    pub fn phase(&self) -> &'static str {
        match self {
            Rotation::Idle => "idle",
            Rotation::Creating { .. } => "creating",
            Rotation::Created { .. } => "created",
            Rotation::Promoted { .. } => "promoted",
        }
    }
}

impl Rotation {
    /// The old secret of a promoted rotation: still valid at the provider
    /// until deleted, so it still counts as a fallback (S5).
    pub fn old(&self) -> Option<&SecretEntry> {
        match self {
            Rotation::Promoted { old, .. } => Some(old),
            _ => None,
        }
    }
}

/// A secret the journal retires: its provider id and the SHA-256 (hex) of
/// its value when the value was known. Kept so that `set-secret` can refuse
/// a secret rekeyd deleted (S6) without keeping the value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredSecret {
    pub id: Option<String>,
    pub sha256: Option<String>,
    /// In the retire list: since when the provider's listings have not
    /// shown this id. A list may lag behind a create, so an absent id is
    /// taken as gone only after [`crate::rotation::machine::SWEEP_MIN_AGE`].
    pub missing_since: Option<SystemTime>,
    /// In the retire list: a listing showed this id as this client's
    /// (S7). Such an id is deleted even when a later listing no longer
    /// shows it (a 404 is done), since that listing may lag.
    pub confirmed: bool,
}

impl RetiredSecret {
    pub fn of(entry: &SecretEntry) -> Self {
        RetiredSecret {
            id: entry.id.clone(),
            sha256: Some(sha256_hex(&entry.value)),
            missing_since: None,
            confirmed: false,
        }
    }

    /// An id found by the sweep (S7): its value was never known.
    pub fn id_only(id: &str) -> Self {
        RetiredSecret {
            id: Some(id.to_string()),
            sha256: None,
            missing_since: None,
            confirmed: false,
        }
    }
}

/// The SHA-256 of a secret's value, hex: compares values without keeping them.
pub fn sha256_hex(value: &SecretString) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(value.expose_secret().as_bytes()))
}

/// An RFC 7592 registration access token the server handed out in an
/// update reply (the one `access_token_file` held stops working then).
#[derive(Debug, Clone)]
pub struct RegistrationToken {
    pub value: SecretString,
    /// The SHA-256 (hex, [`sha256_hex`]) of the `access_token_file`
    /// content this token descends from: once the file holds something
    /// else, an operator handed over a new token, and the file wins.
    pub file_sha256: String,
}

/// How many retired secrets the record remembers for `set-secret`.
pub const RETIRED_HISTORY: usize = 16;

#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub current: SecretEntry,
    pub rotation: Rotation,
    pub last_rotated_at: Option<SystemTime>,
    /// Secrets the journal has committed to deleting at the provider: the
    /// compare-and-swap that adds an id here is what licenses its delete
    /// (S1); the id leaves the list once the delete is done. Every entry
    /// has an id.
    pub retire: Vec<RetiredSecret>,
    /// The last [`RETIRED_HISTORY`] secrets deleted (or dropped) by the
    /// journal, newest last: `set-secret` refuses them (S6).
    pub retired: Vec<RetiredSecret>,
    /// A rotation ended and its listing (the S7 sweep) has not been done
    /// yet: the journal is unfinished until it is, so a crash in between
    /// does not skip the sweep.
    pub listing_owed: bool,
    /// The registration access token an RFC 7592 update returned (`None`:
    /// the one in `access_token_file` is in use).
    pub registration: Option<RegistrationToken>,
}

impl CredentialRecord {
    pub fn new(current: SecretEntry) -> Self {
        CredentialRecord {
            current,
            rotation: Rotation::Idle,
            last_rotated_at: None,
            retire: Vec::new(),
            retired: Vec::new(),
            listing_owed: false,
            registration: None,
        }
    }

    /// The journal's phase as operators see it: the rotation's phase, or
    /// `retiring` while idle with secrets still to delete.
    pub fn phase(&self) -> &'static str {
        match self.rotation {
            Rotation::Idle if !self.retire.is_empty() || self.listing_owed => "retiring",
            _ => self.rotation.phase(),
        }
    }

    /// Whether the journal has work left: a rotation phase other than idle,
    /// or secrets still to delete. Such a journal is always finished,
    /// whatever the configuration says about future rotations.
    pub fn is_unfinished(&self) -> bool {
        !matches!(self.rotation, Rotation::Idle) || !self.retire.is_empty() || self.listing_owed
    }

    /// Whether `value` (or, when given, provider id `id`) is a secret the
    /// journal retired, is retiring, or will retire once a promoted
    /// rotation's grace period is over.
    pub fn knows_retired(&self, value: &SecretString, id: Option<&str>) -> bool {
        let digest = sha256_hex(value);
        let doomed = self.rotation.old().map(RetiredSecret::of);
        self.retire
            .iter()
            .chain(&self.retired)
            .chain(doomed.as_ref())
            .any(|r| {
                r.sha256.as_deref() == Some(digest.as_str())
                    || (id.is_some() && r.id.as_deref() == id)
            })
    }

    /// Appends to the retired history, keeping the newest entries.
    pub fn remember_retired(&mut self, entries: impl IntoIterator<Item = RetiredSecret>) {
        self.retired
            .extend(entries.into_iter().map(|r| RetiredSecret {
                missing_since: None,
                confirmed: false,
                ..r
            }));
        let excess = self.retired.len().saturating_sub(RETIRED_HISTORY);
        self.retired.drain(..excess);
    }

    /// The secret of an unfinished rotation that may already be the one the
    /// provider accepts (Created: not yet promoted).
    pub fn pending(&self) -> Option<&SecretEntry> {
        match &self.rotation {
            Rotation::Created { pending, .. } => Some(pending),
            _ => None,
        }
    }

    /// The value an unfinished create may have sent (caller-chosen, phase
    /// creating): the provider may already hold it, and where the API
    /// replaces the secret atomically it may be the only one that works,
    /// so logins try it after the current one (I1).
    pub fn chosen(&self) -> Option<&SecretString> {
        match &self.rotation {
            Rotation::Creating { chosen, .. } => chosen.as_ref(),
            _ => None,
        }
    }
}

// --- serialized form ------------------------------------------------------
// Kept apart from the domain types so that secret values are exposed only
// here, at the moment of writing, and the format can evolve with `format`.

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Document {
    pub format: u32,
    pub version: u64,
    pub current: DocSecret,
    pub rotation: DocRotation,
    pub last_rotated_at: Option<String>,
    /// Absent in records written before the fields existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retire: Vec<DocRetired>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<DocRetired>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listing_owed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<DocRegistration>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocRegistration {
    pub access_token: String,
    pub file_sha256: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocRetired {
    pub id: Option<String>,
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confirmed: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocSecret {
    pub id: Option<String>,
    pub value: String,
    pub created_at: String,
    /// Written only when known, so that records of secrets without a
    /// provider-side expiry read the same in a rekeyd that predates it;
    /// absent in older records (read as unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum DocRotation {
    Idle,
    Creating {
        rid: String,
        /// Absent in records written before attempts existed: resuming
        /// writes one (S2).
        #[serde(default)]
        attempt: String,
        /// A caller-chosen value (absent for server-generated ones).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chosen: Option<String>,
    },
    Created {
        rid: String,
        pending: DocSecret,
    },
    Promoted {
        rid: String,
        old: DocSecret,
        delete_after: String,
    },
}

fn time_to_text(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn time_from_text(field: &str, s: &str) -> Result<SystemTime, String> {
    // The value is not quoted: a hand-edited record may hold a secret here.
    humantime::parse_rfc3339(s).map_err(|e| format!("{field}: invalid timestamp ({e})"))
}

impl DocSecret {
    fn from_entry(e: &SecretEntry) -> Self {
        DocSecret {
            id: e.id.clone(),
            value: e.value.expose_secret().to_string(),
            created_at: time_to_text(e.created_at),
            expires_at: e.expires_at.map(time_to_text),
        }
    }

    fn into_entry(self, field: &str) -> Result<SecretEntry, String> {
        if self.value.is_empty() {
            return Err(format!("{field}.value is empty"));
        }
        Ok(SecretEntry {
            id: self.id,
            created_at: time_from_text(&format!("{field}.created_at"), &self.created_at)?,
            expires_at: self
                .expires_at
                .map(|t| time_from_text(&format!("{field}.expires_at"), &t))
                .transpose()?,
            value: SecretString::from(self.value),
        })
    }
}

impl Document {
    pub fn from_record(record: &CredentialRecord, version: u64) -> Self {
        Document {
            format: FORMAT_VERSION,
            version,
            current: DocSecret::from_entry(&record.current),
            rotation: match &record.rotation {
                Rotation::Idle => DocRotation::Idle,
                Rotation::Creating {
                    rid,
                    attempt,
                    chosen,
                } => DocRotation::Creating {
                    rid: rid.clone(),
                    attempt: attempt.clone(),
                    chosen: chosen.as_ref().map(|v| v.expose_secret().to_string()),
                },
                Rotation::Created { rid, pending } => DocRotation::Created {
                    rid: rid.clone(),
                    pending: DocSecret::from_entry(pending),
                },
                Rotation::Promoted {
                    rid,
                    old,
                    delete_after,
                } => DocRotation::Promoted {
                    rid: rid.clone(),
                    old: DocSecret::from_entry(old),
                    delete_after: time_to_text(*delete_after),
                },
            },
            last_rotated_at: record.last_rotated_at.map(time_to_text),
            retire: record.retire.iter().map(DocRetired::from).collect(),
            retired: record.retired.iter().map(DocRetired::from).collect(),
            listing_owed: record.listing_owed,
            registration: record.registration.as_ref().map(|r| DocRegistration {
                access_token: r.value.expose_secret().to_string(),
                file_sha256: r.file_sha256.clone(),
            }),
        }
    }

    pub fn into_record(self) -> Result<(u64, CredentialRecord), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!(
                "unsupported format {} (this rekeyd reads format {FORMAT_VERSION})",
                self.format
            ));
        }
        let rotation = match self.rotation {
            DocRotation::Idle => Rotation::Idle,
            DocRotation::Creating {
                rid,
                attempt,
                chosen,
            } => {
                if chosen.as_deref() == Some("") {
                    return Err("rotation.chosen is empty".into());
                }
                Rotation::Creating {
                    rid,
                    attempt,
                    chosen: chosen.map(SecretString::from),
                }
            }
            DocRotation::Created { rid, pending } => Rotation::Created {
                rid,
                pending: pending.into_entry("rotation.pending")?,
            },
            DocRotation::Promoted {
                rid,
                old,
                delete_after,
            } => Rotation::Promoted {
                rid,
                old: old.into_entry("rotation.old")?,
                delete_after: time_from_text("rotation.delete_after", &delete_after)?,
            },
        };
        let record = CredentialRecord {
            current: self.current.into_entry("current")?,
            rotation,
            last_rotated_at: self
                .last_rotated_at
                .map(|t| time_from_text("last_rotated_at", &t))
                .transpose()?,
            retire: retired_entries("retire", self.retire)?,
            retired: retired_entries("retired", self.retired)?,
            listing_owed: self.listing_owed,
            registration: match self.registration {
                Some(r) if r.access_token.is_empty() => {
                    return Err("registration.access_token is empty".into());
                }
                Some(r) => Some(RegistrationToken {
                    value: SecretString::from(r.access_token),
                    file_sha256: r.file_sha256,
                }),
                None => None,
            },
        };
        if record.retire.iter().any(|r| r.id.is_none()) {
            return Err("retire: an entry without an id".into());
        }
        Ok((self.version, record))
    }
}

impl From<&RetiredSecret> for DocRetired {
    fn from(r: &RetiredSecret) -> Self {
        DocRetired {
            id: r.id.clone(),
            sha256: r.sha256.clone(),
            missing_since: r.missing_since.map(time_to_text),
            confirmed: r.confirmed,
        }
    }
}

fn retired_entries(field: &str, docs: Vec<DocRetired>) -> Result<Vec<RetiredSecret>, String> {
    docs.into_iter()
        .map(|d| {
            Ok(RetiredSecret {
                missing_since: d
                    .missing_since
                    .map(|t| time_from_text(&format!("{field}.missing_since"), &t))
                    .transpose()?,
                id: d.id,
                sha256: d.sha256,
                confirmed: d.confirmed,
            })
        })
        .collect()
}

/// The bytes of `record` as every store writes them (pretty JSON, so an
/// operator can read it with `cat` or `etcdctl get`).
pub fn encode(record: &CredentialRecord, version: u64) -> Vec<u8> {
    serde_json::to_vec_pretty(&Document::from_record(record, version)).expect("record serializes")
}

/// Parses what [`encode`] wrote. The error says what is wrong and where,
/// never quoting the bytes: they may hold a secret (I7).
pub fn decode(bytes: &[u8]) -> Result<(u64, CredentialRecord), String> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| describe_json_error(&e))?;
    doc.into_record()
}

/// What is wrong with a record that does not parse, and where, without
/// serde_json's wording for type and value errors: that quotes the
/// offending value (`invalid type: string "...", expected ...`), which may
/// be a secret in the wrong place (I7).
fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "unreadable",
        Category::Syntax => "not valid JSON",
        Category::Eof => "truncated (unexpected end of the file)",
        // Names only one of our own fields: safe and helpful.
        Category::Data if e.to_string().starts_with("missing field `") => {
            return e.to_string();
        }
        Category::Data => "not a record of the expected shape",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: Some("s1".into()),
            value: SecretString::from("current-value"),
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
        })
    }

    #[test]
    fn a_caller_chosen_value_round_trips_and_is_never_in_debug() {
        let mut r = record();
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "1".into(),
            chosen: Some(SecretString::from("chosen-value")),
        };
        let (version, back) = decode(&encode(&r, 3)).unwrap();
        assert_eq!(version, 3);
        assert_eq!(back.chosen().unwrap().expose_secret(), "chosen-value");
        assert!(!format!("{back:?}").contains("chosen-value"));
        // Server-generated creates write no `chosen` at all: records stay
        // readable by a rekeyd that predates it.
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "1".into(),
            chosen: None,
        };
        let text = String::from_utf8(encode(&r, 1)).unwrap();
        assert!(!text.contains("chosen"), "{text}");
    }

    #[test]
    fn a_provider_expiry_round_trips_and_is_written_only_when_known() {
        let mut r = record();
        let text = String::from_utf8(encode(&r, 1)).unwrap();
        // A record without one reads the same in a rekeyd that predates it.
        assert!(!text.contains("expires_at"), "{text}");
        assert!(
            decode(text.as_bytes())
                .unwrap()
                .1
                .current
                .expires_at
                .is_none()
        );
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        r.current.expires_at = Some(at);
        r.rotation = Rotation::Created {
            rid: "r1".into(),
            pending: SecretEntry {
                id: Some("s2".into()),
                value: SecretString::from("pending-value"),
                created_at: SystemTime::UNIX_EPOCH,
                expires_at: Some(at + std::time::Duration::from_secs(60)),
            },
        };
        let (_, back) = decode(&encode(&r, 2)).unwrap();
        assert_eq!(back.current.expires_at, Some(at));
        assert_eq!(
            back.pending().unwrap().expires_at,
            Some(at + std::time::Duration::from_secs(60))
        );
        let bad = String::from_utf8(encode(&r, 2)).unwrap().replacen(
            "\"expires_at\": \"",
            "\"expires_at\": \"x",
            1,
        );
        let err = decode(bad.as_bytes()).unwrap_err();
        assert!(err.contains("current.expires_at"), "{err}");
    }

    #[test]
    fn a_registration_access_token_round_trips_and_is_never_in_debug() {
        let mut r = record();
        let text = String::from_utf8(encode(&r, 1)).unwrap();
        assert!(!text.contains("registration"), "absent when unused: {text}");
        r.registration = Some(RegistrationToken {
            value: SecretString::from("rat-value"),
            file_sha256: "ab".repeat(32),
        });
        let (_, back) = decode(&encode(&r, 2)).unwrap();
        let token = back.registration.as_ref().unwrap();
        assert_eq!(token.value.expose_secret(), "rat-value");
        assert_eq!(token.file_sha256, "ab".repeat(32));
        assert!(!format!("{back:?}").contains("rat-value"));
        let empty = String::from_utf8(encode(&r, 1))
            .unwrap()
            .replace("\"rat-value\"", "\"\"");
        let err = decode(empty.as_bytes()).unwrap_err();
        assert!(err.contains("registration.access_token"), "{err}");
    }

    #[test]
    fn an_empty_chosen_value_is_refused() {
        let mut r = record();
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "1".into(),
            chosen: Some(SecretString::from("x")),
        };
        let text = String::from_utf8(encode(&r, 1))
            .unwrap()
            .replace("\"chosen\": \"x\"", "\"chosen\": \"\"");
        let err = decode(text.as_bytes()).unwrap_err();
        assert!(err.contains("rotation.chosen"), "{err}");
    }
}
