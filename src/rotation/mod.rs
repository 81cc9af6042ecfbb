//! Client-secret rotation (DESIGN.md "Rotation journal").
//!
//! [`machine`] decides, as a pure function, what the next step is for a
//! journal record and an event; [`driver`] performs those steps against the
//! provider and the store; [`schedule`] decides when a rotation is due.

pub mod driver;
pub mod machine;
pub mod schedule;

/// The description every secret created by rekeyd carries (I3): it names
/// the credential and the rotation, so recovery can find a secret whose
/// value was lost, and so nothing else is ever mistaken for ours (I4).
pub fn secret_description(credential: &str, rid: &str) -> String {
    format!("rekeyd:{credential}:{rid}")
}

/// The rotation id of a description made by [`secret_description`] for
/// `credential`, if it is one.
pub fn rotation_id_of<'a>(credential: &str, description: &'a str) -> Option<&'a str> {
    description
        .strip_prefix("rekeyd:")?
        .strip_prefix(credential)?
        .strip_prefix(':')
        .filter(|rid| !rid.is_empty() && !rid.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_do_not_cross_credentials() {
        let d = secret_description("maps", "r1");
        assert_eq!(rotation_id_of("maps", &d), Some("r1"));
        assert_eq!(rotation_id_of("map", &d), None);
        assert_eq!(
            rotation_id_of("maps-2", &secret_description("maps", "r1")),
            None
        );
        assert_eq!(rotation_id_of("maps", "rekeyd:maps-2:r1"), None);
        assert_eq!(rotation_id_of("maps", "created by hand"), None);
    }
}
