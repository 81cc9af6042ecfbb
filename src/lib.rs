//! rekeyd keeps OAuth2 machine credentials alive for the programs beside it.
//!
//! Module map:
//! - [`config`]: TOML + environment → validated [`config::Config`].
//! - [`provider`]: one [`provider::TokenProvider`] per provider dialect.
//! - [`proxy`]: which proxy each HTTP request goes through (never for
//!   plain http).
//! - [`token`]: the token value, the pure refresh policy, the engine task
//!   and the rules for refreshes applications force.
//! - [`store`]: durable per-credential record (secret + rotation journal).
//! - [`credential`]: watch channels through which tokens and status flow.
//! - [`clock`]: the boot-time clock token lifetimes are measured on.
//! - [`format`]: the bytes of a token in each sink format (pure).
//! - [`serve`]: token files, Kubernetes Secret sinks and the local HTTP API.
//! - [`daemon`]: wires credentials, serving, signals and shutdown together.
//! - [`once`]: `rekeyd run --once`, every credential once with the
//!   daemon's pieces, then exit.
//! - [`sim`]: simulated providers for `rekeyd demo` and the tests.
//! - [`fsutil`]: atomic, durable file writes.
//! - [`history`]: the hash-chained rotation history in the store.
//! - [`journal`]: rotation events to the systemd journal.

pub mod build;
pub mod cli;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod demo;
pub mod format;
pub mod fsutil;
pub mod history;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod once;
pub mod provider;
pub mod proxy;
pub mod rotation;
pub mod serve;
pub mod sim;
pub mod store;
pub mod token;
