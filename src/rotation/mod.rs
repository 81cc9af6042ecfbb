//! Client-secret rotation (DESIGN.md "Rotation journal").
//!
//! [`machine`] decides, as a pure function, what the next step is for a
//! journal record and an event; [`driver`] performs those steps against the
//! provider and the store; [`schedule`] decides when a rotation is due;
//! [`verify`] decides when a new secret counts as refused; [`operator`]
//! installs a secret by hand among running rotations.

pub mod driver;
pub mod machine;
pub mod operator;
pub mod schedule;
pub mod verify;

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

#[cfg(test)]
mod tests {
    use super::*;

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
