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
use crate::store::{CredentialRecord, SecretEntry};

/// The record with the current secret's expiry taken from `listed` where
/// a listed secret of its id states one the record does not hold; `None`
/// when there is nothing to learn. Only the current secret's matters (the
/// schedule and the warning look at it; a pending one's came with its
/// create reply, an old one is about to go), so a listing during a
/// rotation costs no extra journal write. A listing never clears a known
/// expiry: one that omits it says nothing.
pub fn learn(record: &CredentialRecord, listed: &[RemoteSecret]) -> Option<CredentialRecord> {
    let mut next = record.clone();
    learn_entry(&mut next.current, listed).then_some(next)
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
    use crate::store::Rotation;

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
    fn only_the_current_secrets_expiry_is_learnt() {
        let mut r = record(Some("new"));
        r.rotation = Rotation::Promoted {
            rid: "r1".into(),
            old: record(Some("old")).current,
            delete_after: t(1),
        };
        assert!(learn(&r, &[listed("old", Some(t(7)))]).is_none());
        let learnt = learn(&r, &[listed("old", Some(t(7))), listed("new", Some(t(9)))]).unwrap();
        assert_eq!(learnt.current.expires_at, Some(t(9)));
        assert_eq!(learnt.rotation.old().unwrap().expires_at, None);
    }
}
