//! What the fuzz targets share: the secret values they plant in inputs and
//! the check that none of them comes back out (I7).

/// A client secret planted in configuration files, token endpoint bodies and
/// store records. Long and random-looking, so no input meets it by chance.
pub const SECRET: &str = "fzS3cr3t-Qm9vN2xhYmVsLXJvdGF0ZQ-7e41c";
/// An access token served by the local API in the router target.
pub const TOKEN: &str = "fzT0k3n-eyJhbGciOiJub25lIn0.c2VydmVk.4b9d";
/// The local API key in the router target.
pub const API_KEY: &str = "fzK3y-bG9jYWwtYXBpLWtleQ-0c2a";

/// Content types a reply may come with; the first input byte picks one.
pub const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("application/problem+json"),
    Some("text/plain; charset=utf-8"),
    Some("text/html"),
    None,
];

/// Panics (a finding) when `text` holds `value`; `what` names the output.
pub fn assert_hidden(text: &str, value: &str, what: &str) {
    assert!(
        !text.contains(value),
        "a planted secret reached {what}: {text:?}"
    );
}

/// Puts `value` into `text` at the char boundary nearest `at` (modulo the
/// length), so the fuzzer moves the secret around the input.
pub fn plant(text: &str, value: &str, at: usize) -> String {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}{value}{}", &text[..at], &text[at..])
}

/// Splits a raw input into a little-endian `u16` (where to plant a secret)
/// and the rest as text, so seed files are a two-byte prefix and a readable
/// file.
pub fn split(data: &[u8]) -> Option<(usize, &str)> {
    let (head, rest) = data.split_first_chunk::<2>()?;
    let text = std::str::from_utf8(rest).ok()?;
    Some((u16::from_le_bytes(*head) as usize, text))
}
