//! Handing tokens to applications: files and Kubernetes Secrets ([`sink`],
//! [`secret_sink`]) and the local HTTP API ([`api`]), served with limits by
//! [`http`] on sockets rekeyd binds or systemd passes ([`activation`]).

pub mod activation;
pub mod api;
pub mod hooks;
pub mod http;
pub mod secret_sink;
pub mod sink;
