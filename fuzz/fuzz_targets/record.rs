//! Store record decoding: never a panic; errors never quote the bytes (a
//! secret in the wrong place would be printed); secret values never show
//! in `Debug`; what decodes re-encodes to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rekeyd::store::record::{decode, encode};
use rekeyd_fuzz::{SECRET, assert_hidden, plant, split};
use secrecy::ExposeSecret;

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
                let values = [
                    Some(&record.current),
                    record.pending(),
                    record.rotation.old(),
                ];
                for entry in values.into_iter().flatten() {
                    let value = entry.value.expose_secret();
                    if value.len() >= 8 {
                        assert_hidden(&shown, value, "a record's Debug");
                    }
                }
                let again = decode(&encode(&record, version)).expect("an encoded record decodes");
                assert_eq!(format!("{again:?}"), format!("{:?}", (version, record)));
            }
            Err(e) => assert_hidden(&e, SECRET, "a record error"),
        }
    }
});
