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
}

/// The rotation journal (DESIGN.md): written before every external effect so
/// that a restart knows what may have happened at the provider.
#[derive(Debug, Clone, Default)]
pub enum Rotation {
    #[default]
    Idle,
    /// Intent recorded; the create call may or may not have reached the provider.
    Creating { rid: String },
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

#[derive(Debug, Clone)]
pub struct CredentialRecord {
    pub current: SecretEntry,
    pub rotation: Rotation,
    pub last_rotated_at: Option<SystemTime>,
}

impl CredentialRecord {
    pub fn new(current: SecretEntry) -> Self {
        CredentialRecord {
            current,
            rotation: Rotation::Idle,
            last_rotated_at: None,
        }
    }

    /// The secret of an unfinished rotation that may already be the one the
    /// provider accepts (Created: not yet promoted).
    pub fn pending(&self) -> Option<&SecretEntry> {
        match &self.rotation {
            Rotation::Created { pending, .. } => Some(pending),
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
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocSecret {
    pub id: Option<String>,
    pub value: String,
    pub created_at: String,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum DocRotation {
    Idle,
    Creating {
        rid: String,
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

/// The JSON document of `record` at `version`, as every store writes it.
pub(crate) fn encode(record: &CredentialRecord, version: u64) -> Vec<u8> {
    serde_json::to_vec_pretty(&Document::from_record(record, version)).expect("record serializes")
}

/// Reads a document written by [`encode`]: its version and record, or why it
/// cannot be understood (never quoting a value: it may be a secret).
pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, CredentialRecord), String> {
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
        }
    }

    fn into_entry(self, field: &str) -> Result<SecretEntry, String> {
        if self.value.is_empty() {
            return Err(format!("{field}.value is empty"));
        }
        Ok(SecretEntry {
            id: self.id,
            created_at: time_from_text(&format!("{field}.created_at"), &self.created_at)?,
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
                Rotation::Creating { rid } => DocRotation::Creating { rid: rid.clone() },
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
            DocRotation::Creating { rid } => Rotation::Creating { rid },
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
        };
        Ok((self.version, record))
    }
}
