//! Handing tokens to applications: files and Kubernetes Secrets ([`sink`],
//! [`secret_sink`]) and the local HTTP API ([`api`]), served with limits by
//! [`http`].

pub mod api;
pub mod hooks;
pub mod http;
pub mod secret_sink;
pub mod sink;
