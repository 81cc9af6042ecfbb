//! What a listing of the provider's secrets says about the expiry of the
//! secrets the journal holds: pure, so that the driver only decides when to
//! list and writes what this returns through the journal's
//! compare-and-swap (S1).
//!
//! The expiry of a secret rekeyd creates comes with the create reply
//! ([`crate::provider::NewSecret::expires_at`]); the bootstrap secret's is
//! learnt here, from a listing, when the journal knows its id
//! (`initial_secret_id`) and the API lists expiries (Entra `endDateTime`).

use crate::provider::RemoteSecret;
use crate::store::{CredentialRecord, Rotation, SecretEntry};

/// The record with each of its secrets' expiries (current, pending, old)
/// taken from `listed` where a listed secret of the same id states one
/// that the record does not hold; `None` when there is nothing to learn.
/// A listing never clears a known expiry: one that omits it says nothing.
pub fn learn(record: &CredentialRecord, listed: &[RemoteSecret]) -> Option<CredentialRecord> {
    let mut next = record.clone();
    let mut changed = learn_entry(&mut next.current, listed);
    match &mut next.rotation {
        Rotation::Created { pending: entry, .. } | Rotation::Promoted { old: entry, .. } => {
            changed |= learn_entry(entry, listed);
        }
        Rotation::Idle | Rotation::Creating { .. } => {}
    }
    changed.then_some(next)
}

fn learn_entry(entry: &mut SecretEntry, listed: &[RemoteSecret]) -> bool {
    let Some(id) = entry.id.as_deref() else {
        return false;
    };
    let stated = listed
        .iter()
        .find(|s| s.id == id)
        .and_then(|s| s.expires_at);
    match stated {
        Some(at) if entry.expires_at != Some(at) => {
            entry.expires_at = Some(at);
            true
        }
        _ => false,
    }
}

/// Whether rekeyd should list once to learn when the current secret
/// expires: the API states expiries, the journal knows the secret's id,
/// and not yet its expiry.
pub fn worth_listing(record: &CredentialRecord, lists_expiry: bool) -> bool {
    lists_expiry && record.current.id.is_some() && record.current.expires_at.is_none()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use secrecy::SecretString;

    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn listed(id: &str, expires_at: Option<SystemTime>) -> RemoteSecret {
        RemoteSecret {
            id: id.into(),
            description: String::new(),
            client_id: None,
            created_at: None,
            expires_at,
        }
    }

    fn record(id: Option<&str>) -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: id.map(Into::into),
            value: SecretString::from("v"),
            created_at: t(0),
            expires_at: None,
        })
    }

    #[test]
    fn learns_the_bootstrap_secrets_expiry_by_its_id() {
        let r = record(Some("boot"));
        assert!(worth_listing(&r, true));
        assert!(!worth_listing(&r, false), "an API without expiries");
        assert!(!worth_listing(&record(None), true), "no id to look for");
        let listing = [listed("other", Some(t(5))), listed("boot", Some(t(9)))];
        let learnt = learn(&r, &listing).unwrap();
        assert_eq!(learnt.current.expires_at, Some(t(9)));
        assert!(!worth_listing(&learnt, true));
        // Nothing new: no write.
        assert!(learn(&learnt, &listing).is_none());
        // A listing without it, or without an expiry, changes nothing.
        assert!(learn(&learnt, &[listed("boot", None)]).is_none());
        assert!(learn(&r, &[listed("other", Some(t(5)))]).is_none());
        assert!(learn(&record(None), &listing).is_none());
    }

    #[test]
    fn learns_the_old_secrets_expiry_while_promoted() {
        let mut r = record(Some("new"));
        r.rotation = Rotation::Promoted {
            rid: "r1".into(),
            old: SecretEntry {
                expires_at: None,
                ..record(Some("old")).current
            },
            delete_after: t(1),
        };
        let learnt = learn(&r, &[listed("old", Some(t(7)))]).unwrap();
        assert_eq!(learnt.rotation.old().unwrap().expires_at, Some(t(7)));
        assert_eq!(learnt.current.expires_at, None);
    }
}
