//! Handing tokens to applications: files ([`sink`]) and the local HTTP API
//! ([`api`]).

pub mod api;
pub mod hooks;
pub mod sink;
