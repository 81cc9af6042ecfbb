//! The simulated providers' registry: clients, their secrets and the tokens
//! issued to them.
//!
//! Everything here is plain data and synchronous logic with the current time
//! passed in, so the rules that matter to the daemon (propagation delay,
//! expiry, customer scoping) are unit-tested without HTTP or a runtime. The
//! HTTP layer in `routes.rs` only translates these results into each
//! provider's wire quirks.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

/// Characters of generated secret values: base64url, as the real portals
/// hand out URL-safe strings.
const VALUE_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const VALUE_LEN: usize = 43;

/// Which token endpoint minted a token. The MapsIndoors secret API only
/// honours tokens from its own IdentityServer, as the real one would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Issuer {
    MapsIndoors,
    Mappls,
    /// `/oauth2/token` and Okta's `/oauth2/v1/token`.
    OAuth2,
    /// Auth0's `/oauth/token`.
    Auth0,
}

#[derive(Clone, Debug)]
struct Client {
    customer_id: String,
}

/// A secret as the registry keeps it. No `Debug`: the value must not end up
/// in a log line by accident.
#[derive(Clone)]
pub(crate) struct Secret {
    pub id: String,
    pub client_id: String,
    pub customer_id: String,
    pub description: String,
    pub created_at: SystemTime,
    /// Logins with this secret fail before this instant (eventual
    /// consistency between the secret API and the token endpoint).
    pub usable_from: Instant,
    pub value: String,
    /// Okta: a deactivated secret no longer logs in and may be deleted.
    pub active: bool,
    /// Logins with this secret fail from this (wall-clock) time on: Entra's
    /// `endDateTime`. `None`: it never expires.
    pub expires_at: Option<SystemTime>,
}

/// An issued access token. No `Debug` for the same reason as [`Secret`].
#[derive(Clone)]
pub(crate) struct Token {
    pub client_id: String,
    pub issuer: Issuer,
    pub scope: Option<String>,
    pub expires_at: Instant,
}

/// A freshly issued token, as the token endpoints report it.
pub(crate) struct Issued {
    pub access_token: String,
    pub expires_in: u64,
}

/// Why a login was refused. The endpoints all answer `invalid_client` for
/// each of these (real providers do not tell an attacker which part was
/// wrong), but the distinction helps debug-level tracing and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthError {
    UnknownClient,
    WrongSecret,
    NotYetPropagated,
    /// The secret's `expires_at` has passed (Entra `AADSTS7000222`).
    Expired,
}

impl AuthError {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthError::UnknownClient => "unknown client",
            AuthError::WrongSecret => "wrong secret",
            AuthError::NotYetPropagated => "secret not yet propagated",
            AuthError::Expired => "secret expired",
        }
    }
}

pub(crate) struct Registry {
    clients: HashMap<String, Client>,
    /// Kept in creation order so that listings are stable, like the portal's.
    secrets: Vec<Secret>,
    tokens: HashMap<String, Token>,
    pub token_lifetime: Duration,
    pub propagation_delay: Duration,
    /// Secrets created from now on expire this long after their creation
    /// ([`Secret::expires_at`]); `None`: they never do.
    pub secret_lifetime: Option<Duration>,
}

impl Registry {
    pub fn new(token_lifetime: Duration, propagation_delay: Duration) -> Self {
        Registry {
            clients: HashMap::new(),
            secrets: Vec::new(),
            tokens: HashMap::new(),
            token_lifetime,
            propagation_delay,
            secret_lifetime: None,
        }
    }

    /// Registers `client_id` under `customer_id`; registering again moves the
    /// client to the given customer (last write wins).
    pub fn add_client(&mut self, client_id: &str, customer_id: &str) {
        self.clients.insert(
            client_id.to_owned(),
            Client {
                customer_id: customer_id.to_owned(),
            },
        );
        for s in self.secrets.iter_mut().filter(|s| s.client_id == client_id) {
            s.customer_id = customer_id.to_owned();
        }
    }

    pub fn customer_of(&self, client_id: &str) -> Option<&str> {
        self.clients.get(client_id).map(|c| c.customer_id.as_str())
    }

    /// Creates a secret. `propagate` applies the propagation delay (secrets
    /// made through the API); operator-seeded secrets are usable at once so
    /// that test setup does not have to wait. `None` if the client is unknown.
    pub fn create_secret(
        &mut self,
        client_id: &str,
        description: &str,
        now: Instant,
        propagate: bool,
        rng: &mut impl Rng,
    ) -> Option<Secret> {
        let customer_id = self.customer_of(client_id)?.to_owned();
        let usable_from = if propagate {
            now + self.propagation_delay
        } else {
            now
        };
        let created_at = SystemTime::now();
        let secret = Secret {
            id: random_hex(rng, 16),
            client_id: client_id.to_owned(),
            customer_id,
            description: description.to_owned(),
            created_at,
            usable_from,
            value: random_value(rng),
            active: true,
            expires_at: self.secret_lifetime.map(|l| created_at + l),
        };
        self.secrets.push(secret.clone());
        Some(secret)
    }

    /// Creates a secret with a value of the caller's choice (Okta's create
    /// with `client_secret`), propagating like any API-made secret.
    pub fn create_secret_with_value(
        &mut self,
        client_id: &str,
        value: &str,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Secret> {
        let mut secret = self.create_secret(client_id, "", now, true, rng)?;
        secret.value = value.to_owned();
        self.secrets.last_mut().expect("just pushed").value = value.to_owned();
        Some(secret)
    }

    /// Replaces every secret of the client with one of the given value
    /// (Auth0's client update): the old ones stop working at once, the new
    /// one after the propagation delay.
    pub fn replace_secrets(
        &mut self,
        client_id: &str,
        value: &str,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<Secret> {
        self.customer_of(client_id)?;
        self.secrets.retain(|s| s.client_id != client_id);
        self.create_secret_with_value(client_id, value, now, rng)
    }

    /// Deactivates secret `id` of the client; `None` if there is none.
    pub fn deactivate_secret(&mut self, client_id: &str, id: &str) -> Option<Secret> {
        let secret = self
            .secrets
            .iter_mut()
            .find(|s| s.client_id == client_id && s.id == id)?;
        secret.active = false;
        Some(secret.clone())
    }

    /// Sets when secret `id` expires (`None`: never); `false` if there is
    /// no such secret.
    pub fn set_secret_expiry(&mut self, id: &str, at: Option<SystemTime>) -> bool {
        match self.secrets.iter_mut().find(|s| s.id == id) {
            Some(secret) => {
                secret.expires_at = at;
                true
            }
            None => false,
        }
    }

    /// The client's secret `id`, if it has one.
    pub fn secret_of_client(&self, client_id: &str, id: &str) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.client_id == client_id && s.id == id)
    }

    /// Checks a client id and secret value as a token endpoint would.
    pub fn authenticate(
        &self,
        client_id: &str,
        secret: &str,
        now: Instant,
    ) -> Result<(), AuthError> {
        if !self.clients.contains_key(client_id) {
            return Err(AuthError::UnknownClient);
        }
        let matching = self
            .secrets
            .iter()
            .find(|s| s.client_id == client_id && s.value == secret && s.active)
            .ok_or(AuthError::WrongSecret)?;
        if now < matching.usable_from {
            return Err(AuthError::NotYetPropagated);
        }
        if matching
            .expires_at
            .is_some_and(|at| SystemTime::now() >= at)
        {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    pub fn issue_token(
        &mut self,
        client_id: &str,
        issuer: Issuer,
        scope: Option<String>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Issued {
        // Expired tokens can never be valid again; dropping them here keeps a
        // long-running demo from growing without bound.
        self.tokens.retain(|_, t| t.expires_at > now);
        let access_token = format!("sim_{}", random_hex(rng, 20));
        self.tokens.insert(
            access_token.clone(),
            Token {
                client_id: client_id.to_owned(),
                issuer,
                scope,
                expires_at: now + self.token_lifetime,
            },
        );
        Issued {
            access_token,
            expires_in: self.token_lifetime.as_secs(),
        }
    }

    /// The token if it is known and has not expired at `now`. A JWT the
    /// sim issued (see `TokenReply::jwt_exp_in`) carries the opaque token
    /// as its signature, which is all the sim checks.
    pub fn token(&self, access_token: &str, now: Instant) -> Option<&Token> {
        let opaque = access_token.rsplit('.').next().unwrap_or(access_token);
        self.tokens.get(opaque).filter(|t| now < t.expires_at)
    }

    pub fn secrets_of_client(&self, client_id: &str) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.client_id == client_id)
    }

    pub fn secrets_of_customer(&self, customer_id: &str) -> impl Iterator<Item = &Secret> {
        self.secrets
            .iter()
            .filter(move |s| s.customer_id == customer_id)
    }

    /// Deletes secret `id` if it belongs to `customer_id`; `false` if there is
    /// no such secret in that customer (the API answers 404).
    pub fn delete_secret(&mut self, customer_id: &str, id: &str) -> bool {
        let before = self.secrets.len();
        self.secrets
            .retain(|s| !(s.id == id && s.customer_id == customer_id));
        self.secrets.len() != before
    }

    /// Gives secret `id` the id `new_id`. `false` if there was none.
    pub fn rename_secret(&mut self, id: &str, new_id: &str) -> bool {
        match self.secrets.iter_mut().find(|s| s.id == id) {
            Some(secret) => {
                secret.id = new_id.to_owned();
                true
            }
            None => false,
        }
    }

    /// Deletes secret `id` whatever its customer (operator action).
    pub fn remove_secret(&mut self, id: &str) -> bool {
        let before = self.secrets.len();
        self.secrets.retain(|s| s.id != id);
        self.secrets.len() != before
    }
}

fn random_hex(rng: &mut impl Rng, bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
    hex::encode(raw)
}

fn random_value(rng: &mut impl Rng) -> String {
    (0..VALUE_LEN)
        .map(|_| char::from(VALUE_ALPHABET[rng.random_range(0..VALUE_ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn registry() -> (Registry, StdRng, Instant) {
        let mut r = Registry::new(Duration::from_secs(60), Duration::from_secs(10));
        r.add_client("a", "cust1");
        r.add_client("b", "cust1");
        r.add_client("c", "cust2");
        (r, StdRng::seed_from_u64(7), Instant::now())
    }

    #[test]
    fn generated_identifiers_have_the_documented_shape() {
        let (mut r, mut rng, now) = registry();
        let s = r.create_secret("a", "d", now, false, &mut rng).unwrap();
        assert_eq!(s.id.len(), 32);
        assert!(s.id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(s.value.len(), 43);
        assert!(s.value.bytes().all(|b| VALUE_ALPHABET.contains(&b)));
        let t = r.issue_token("a", Issuer::MapsIndoors, None, now, &mut rng);
        assert!(t.access_token.starts_with("sim_"));
        assert_eq!(t.access_token.len(), 44);
        assert_eq!(t.expires_in, 60);
    }

    #[test]
    fn authentication_checks_client_secret_and_propagation() {
        let (mut r, mut rng, now) = registry();
        let seeded = r.create_secret("a", "seed", now, false, &mut rng).unwrap();
        let fresh = r.create_secret("a", "new", now, true, &mut rng).unwrap();
        let other = r.create_secret("b", "b's", now, false, &mut rng).unwrap();

        assert_eq!(r.authenticate("a", &seeded.value, now), Ok(()));
        assert_eq!(
            r.authenticate("nobody", &seeded.value, now),
            Err(AuthError::UnknownClient)
        );
        assert_eq!(
            r.authenticate("a", &other.value, now),
            Err(AuthError::WrongSecret),
            "another client's secret must not work"
        );
        assert_eq!(
            r.authenticate("a", &fresh.value, now + Duration::from_secs(9)),
            Err(AuthError::NotYetPropagated)
        );
        assert_eq!(
            r.authenticate("a", &fresh.value, now + Duration::from_secs(10)),
            Ok(())
        );
    }

    #[test]
    fn tokens_expire_and_unknown_tokens_are_rejected() {
        let (mut r, mut rng, now) = registry();
        let t = r.issue_token("a", Issuer::Mappls, Some("READ".into()), now, &mut rng);
        let tok = r.token(&t.access_token, now).unwrap();
        assert_eq!(tok.client_id, "a");
        assert_eq!(tok.issuer, Issuer::Mappls);
        assert!(
            r.token(&t.access_token, now + Duration::from_secs(59))
                .is_some()
        );
        assert!(
            r.token(&t.access_token, now + Duration::from_secs(60))
                .is_none()
        );
        assert!(r.token("sim_unknown", now).is_none());
        // A JWT wrapping the opaque token is the same token.
        let jwt = format!("eyJhbGciOiJub25lIn0.e30.{}", t.access_token);
        assert_eq!(r.token(&jwt, now).unwrap().client_id, "a");
    }

    #[test]
    fn expired_tokens_are_purged_on_issue() {
        let (mut r, mut rng, now) = registry();
        r.issue_token("a", Issuer::OAuth2, None, now, &mut rng);
        r.issue_token(
            "a",
            Issuer::OAuth2,
            None,
            now + Duration::from_secs(61),
            &mut rng,
        );
        assert_eq!(r.tokens.len(), 1);
    }

    #[test]
    fn deletion_is_scoped_to_the_customer() {
        let (mut r, mut rng, now) = registry();
        let sa = r.create_secret("a", "x", now, false, &mut rng).unwrap();
        let sb = r.create_secret("b", "y", now, false, &mut rng).unwrap();
        let sc = r.create_secret("c", "z", now, false, &mut rng).unwrap();

        let listed: Vec<_> = r
            .secrets_of_customer("cust1")
            .map(|s| s.id.clone())
            .collect();
        assert_eq!(listed, vec![sa.id.clone(), sb.id.clone()]);

        assert!(!r.delete_secret("cust1", &sc.id), "other customer's secret");
        assert!(
            r.delete_secret("cust1", &sb.id),
            "same customer, other client"
        );
        assert!(!r.delete_secret("cust1", &sb.id), "second delete is a 404");
        assert_eq!(r.secrets_of_client("b").count(), 0);
        assert!(r.remove_secret(&sc.id));
    }

    #[test]
    fn unknown_client_gets_no_secret_and_moving_a_client_moves_its_secrets() {
        let (mut r, mut rng, now) = registry();
        assert!(r.create_secret("zz", "x", now, false, &mut rng).is_none());
        r.create_secret("a", "x", now, false, &mut rng).unwrap();
        r.add_client("a", "cust2");
        assert_eq!(r.customer_of("a"), Some("cust2"));
        assert_eq!(r.secrets_of_customer("cust2").count(), 1);
        assert_eq!(r.secrets_of_customer("cust1").count(), 0);
    }
}
