//! What this binary was built with: its version and the cargo features
//! compiled in (`rekeyd --version`, the `rekeyd_build_info` metric, the
//! warning a `failpoints` build logs at start).

/// The crate version from `Cargo.toml`, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The optional cargo features compiled in, in alphabetical order; empty for
/// a default build.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "etcd")]
    "etcd",
    #[cfg(feature = "failpoints")]
    "failpoints",
];

/// [`FEATURES`] as one comma-separated word (`etcd,failpoints`), or `none`.
pub fn features_text() -> String {
    if FEATURES.is_empty() {
        "none".to_string()
    } else {
        FEATURES.join(",")
    }
}
