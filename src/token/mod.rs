//! Bearer tokens: the value type, the pure rules for a reply's lifetime and
//! for when to refresh, and the engine task that keeps one credential's
//! token current.

pub mod engine;
pub mod lifetime;
pub mod policy;

use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::time::Instant;

/// A bearer token as received from a provider.
///
/// Expiry is tracked on the monotonic clock from the moment the reply
/// arrived, because wall clocks skew and jump; the wall-clock time is kept
/// only to show `expires_at` to people and programs.
#[derive(Debug, Clone)]
pub struct Token {
    /// Redacted by `SecretString`'s `Debug`.
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: Option<String>,
    pub lifetime: Duration,
    pub received_at: Instant,
    pub received_at_wall: SystemTime,
}

impl Token {
    /// A token received now.
    pub fn new(
        access_token: SecretString,
        token_type: String,
        scope: Option<String>,
        lifetime: Duration,
    ) -> Self {
        Token {
            access_token,
            token_type,
            scope,
            lifetime,
            received_at: Instant::now(),
            received_at_wall: SystemTime::now(),
        }
    }

    pub fn expires_at(&self) -> Instant {
        self.received_at + self.lifetime
    }

    pub fn expires_at_wall(&self) -> SystemTime {
        self.received_at_wall + self.lifetime
    }

    /// Time left before expiry; zero once expired.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at().saturating_duration_since(now)
    }

    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.expires_at()
    }
}
