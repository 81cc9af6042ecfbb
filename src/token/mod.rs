//! Bearer tokens: the value type, the pure rules for a reply's lifetime and
//! for when to refresh, the engine task that keeps one credential's token
//! current, and the rules for refreshes an application asks for.

pub mod engine;
pub mod forced;
pub mod lifetime;
pub mod policy;

use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::clock::{self, BootInstant, Clock};

/// A bearer token as received from a provider.
///
/// Expiry is tracked from the moment the reply arrived on the boot-time
/// clock ([`crate::clock`]), which keeps counting while the machine is
/// suspended, because wall clocks skew and jump and the monotonic clock
/// stops during a suspension; the wall-clock time is kept only to show
/// `expires_at` to people and programs.
#[derive(Debug, Clone)]
pub struct Token {
    /// Redacted by `SecretString`'s `Debug`.
    pub access_token: SecretString,
    pub token_type: String,
    pub scope: Option<String>,
    pub lifetime: Duration,
    /// On the clock of the credential that received it (the token engine
    /// stamps it again on its own clock, see [`crate::clock`]).
    pub received_at: BootInstant,
    pub received_at_wall: SystemTime,
}

impl Token {
    /// A token received now (on the system clock).
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
            received_at: clock::system().now(),
            received_at_wall: SystemTime::now(),
        }
    }

    pub fn expires_at(&self) -> BootInstant {
        self.received_at + self.lifetime
    }

    pub fn expires_at_wall(&self) -> SystemTime {
        self.received_at_wall + self.lifetime
    }

    /// Time left before expiry; zero once expired.
    /// `now` comes from the same clock as `received_at`.
    pub fn remaining(&self, now: BootInstant) -> Duration {
        self.expires_at().saturating_duration_since(now)
    }

    /// Whether the token is still valid at `now` (same clock as
    /// `received_at`).
    pub fn is_valid(&self, now: BootInstant) -> bool {
        now < self.expires_at()
    }
}
