//! Handing tokens to applications: files ([`sink`]) and the local HTTP API
//! ([`api`]), served with limits by [`http`].

pub mod api;
pub mod hooks;
pub mod http;
pub mod sink;
