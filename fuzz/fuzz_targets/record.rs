//! Store record decoding: never a panic; errors never quote the bytes (a
//! secret in the wrong place would be printed); `Debug` does not depend on
//! the secret values (the same record with other values prints the same);
//! what decodes re-encodes to the same record.
//!
//! Searching `Debug` for each value is not the property: a value may equal
//! a public field (an id, a timestamp) and show through it legitimately.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekeyd::store::record::{decode, encode};
use rekeyd_fuzz::{SECRET, assert_hidden, plant, split};

fuzz_target!(|data: &[u8]| {
    let Some((at, text)) = split(data) else {
        return;
    };
    if text.contains(SECRET) {
        return;
    }
    for text in [text.to_string(), plant(text, SECRET, at)] {
        match decode(text.as_bytes()) {
            Ok((version, record)) => {
                let shown = format!("{record:?}");
                let encoded = encode(&record, version);
                let again = decode(&encoded).expect("an encoded record decodes");
                assert_eq!(format!("{again:?}"), format!("{:?}", (version, &record)));

                let mut other: serde_json::Value =
                    serde_json::from_slice(&encoded).expect("an encoded record is JSON");
                swap_values(&mut other);
                let (_, swapped) = decode(other.to_string().as_bytes())
                    .expect("a record with other secret values decodes");
                assert_eq!(
                    format!("{swapped:?}"),
                    shown,
                    "a record's Debug shows its values"
                );
            }
            Err(e) => assert_hidden(&e, SECRET, "a record error"),
        }
    }
});

/// Replaces every secret value (`current`, `pending`, `old`: the objects'
/// `value` fields) with another valid one.
fn swap_values(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                if key == "value" && field.is_string() {
                    *field = serde_json::Value::from("fuzz-other-value");
                } else {
                    swap_values(field);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(swap_values),
        _ => {}
    }
}
