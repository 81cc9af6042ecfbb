//! Client-secret rotation (DESIGN.md "Rotation journal").
//!
//! [`machine`] decides, as a pure function, what the next step is for a
//! journal record and an event; [`driver`] performs those steps against the
//! provider and the store; [`schedule`] decides when a rotation is due;
//! [`verify`] decides when a new secret counts as refused; [`operator`]
//! installs a secret by hand among running rotations.

pub mod driver;
pub mod expiry;
pub mod machine;
pub mod operator;
pub mod schedule;
pub mod verify;

use crate::store::{CredentialRecord, Rotation};

/// The description every secret created by rekeyd carries (I3): it names
/// the credential, the rotation and the attempt (S2), so recovery can find a
/// secret whose value was lost, and so nothing else is ever mistaken for ours
/// (I4). Shape: `rekeyd:<credential>:<rid>.<attempt>`.
pub fn secret_description(credential: &str, rid: &str, attempt: &str) -> String {
    format!("rekeyd:{credential}:{rid}.{attempt}")
}

/// What a tag made by [`secret_description`] for `credential` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag<'a> {
    pub rid: &'a str,
    /// `None` for tags written before attempts existed (`rekeyd:<c>:<rid>`).
    pub attempt: Option<&'a str>,
}

/// Parses a description made by [`secret_description`] for `credential`.
pub fn parse_tag<'a>(credential: &str, description: &'a str) -> Option<Tag<'a>> {
    let rest = description
        .strip_prefix("rekeyd:")?
        .strip_prefix(credential)?
        .strip_prefix(':')
        .filter(|r| !r.is_empty() && !r.contains(':'))?;
    Some(match rest.split_once('.') {
        Some((rid, attempt)) if !rid.is_empty() && !attempt.is_empty() => Tag {
            rid,
            attempt: Some(attempt),
        },
        Some(_) => return None,
        None => Tag {
            rid: rest,
            attempt: None,
        },
    })
}

/// The rotation id of a description made by [`secret_description`] for
/// `credential`, if it is one.
pub fn rotation_id_of<'a>(credential: &str, description: &'a str) -> Option<&'a str> {
    parse_tag(credential, description).map(|t| t.rid)
}

/// For an unfinished journal: what rekeyd is waiting for, and the command
/// that gets the operator out of it if it stays stuck. `None` when idle.
/// Shown by `rekeyd status` (text and JSON) and `GET /v1/status`.
pub fn waiting_for(record: &CredentialRecord, name: &str) -> Option<String> {
    let rotate = format!("`rekeyd rotate {name}` retries it now");
    let force = format!(
        "`rekeyd set-secret {name} --force` (a working secret on stdin) replaces the journal"
    );
    Some(match &record.rotation {
        Rotation::Idle if !record.is_unfinished() => return None,
        Rotation::Idle if record.retire.is_empty() => format!(
            "the listing after the rotation (to delete secrets of ours it does not track); {rotate}"
        ),
        Rotation::Idle => format!(
            "deleting {} retired secret(s) at the provider once a listing shows they are this client's (an id no listing shows is given up after {}); {rotate}",
            record.retire.len(),
            humantime::format_duration(machine::SWEEP_MIN_AGE)
        ),
        Rotation::Creating {
            chosen: Some(_), ..
        } => format!(
            "the provider to take the replacement secret, whose value is stored (a retry sends the same value; logins try it too); {rotate}"
        ),
        Rotation::Creating { .. } => format!(
            "the provider to create the replacement secret (earlier attempts are cleaned up first); {rotate}"
        ),
        Rotation::Created { .. } => format!(
            "the provider to accept the new secret (verification; the current secret stays in use); {rotate}; if the provider never accepts it, {force}"
        ),
        Rotation::Promoted { delete_after, .. } => format!(
            "the grace period (until {}); then the new secret is verified once more and the old one deleted. If the new secret is refused, the old one becomes current again; {rotate}",
            humantime::format_rfc3339_seconds(*delete_after)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_journal_says_what_it_waits_for_and_how_out() {
        use crate::store::SecretEntry;
        use secrecy::SecretString;
        let mut r = CredentialRecord::new(SecretEntry {
            id: None,
            value: SecretString::from("v"),
            created_at: std::time::SystemTime::UNIX_EPOCH,
            expires_at: None,
        });
        assert_eq!(waiting_for(&r, "maps"), None);
        r.rotation = Rotation::Created {
            rid: "r".into(),
            pending: r.current.clone(),
        };
        let text = waiting_for(&r, "maps").unwrap();
        assert!(text.contains("rekeyd rotate maps"), "{text}");
        assert!(text.contains("rekeyd set-secret maps --force"), "{text}");
    }

    #[test]
    fn tags_round_trip_and_do_not_cross_credentials() {
        let d = secret_description("maps", "r1", "a1");
        assert_eq!(
            parse_tag("maps", &d),
            Some(Tag {
                rid: "r1",
                attempt: Some("a1")
            })
        );
        assert_eq!(rotation_id_of("maps", &d), Some("r1"));
        assert_eq!(rotation_id_of("map", &d), None);
        assert_eq!(
            rotation_id_of("maps-2", &secret_description("maps", "r1", "a1")),
            None
        );
        assert_eq!(rotation_id_of("maps", "rekeyd:maps-2:r1.a1"), None);
        assert_eq!(rotation_id_of("maps", "created by hand"), None);
        assert_eq!(rotation_id_of("maps", "rekeyd:maps:r1.a1:x"), None);
        assert_eq!(rotation_id_of("maps", "rekeyd:maps:.a1"), None);
        // Tags from before attempts existed still count as ours.
        assert_eq!(
            parse_tag("maps", "rekeyd:maps:r1"),
            Some(Tag {
                rid: "r1",
                attempt: None
            })
        );
    }
}
