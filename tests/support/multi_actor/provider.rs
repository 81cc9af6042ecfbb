//! The provider model: a MapsIndoors-like client-secret API in memory,
//! implementing rekeyd's [`TokenProvider`] and [`SecretApi`].
//!
//! Secrets are `{id, description, client, value, created_at}`; `list()`
//! returns every client's secrets of the customer, as MapsIndoors does.
//! Every call waits a seeded delay, applies its effect, runs the world's
//! checks, and waits again; the seed's faults decide whether a call fails
//! with a 5xx (no effect), loses its reply (effect, then an error), a new
//! secret is refused for a while (propagation) or missing from lists for a
//! while (lag), a deleted secret still logs in on a lagging node for a
//! short while (ghost), or a promoted secret is revoked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use rekeyd::provider::{
    Capabilities, CreateRequest, Deleted, ErrorKind, NewSecret, Overlap, ProviderError,
    RemoteSecret, Retire, SecretApi, TokenProvider, ValueOrigin,
};
use rekeyd::rotation::parse_tag;
use rekeyd::token::Token;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::{CLIENT, CRED, Call, LoginReply, Sim, Stage, TOKEN_LIFETIME, World, cover, named_ids};

/// A secret as the provider holds it. Deleted secrets are kept (marked), so
/// the checks can tell what happened to them.
#[derive(Debug, Clone)]
pub struct ProviderSecret {
    pub id: String,
    pub description: String,
    pub client: String,
    pub value: String,
    pub created_at: SystemTime,
    /// Logins are refused before this (propagation).
    pub accepted_from: Instant,
    /// Lists leave it out before this (lag).
    pub listed_from: Instant,
    pub deleted_at: Option<Instant>,
    /// After deletion, a lagging node may still accept it until then.
    pub ghost_until: Option<Instant>,
    /// Refused from now on, though not deleted.
    pub revoked: bool,
    /// Consecutive 5xx answered to logins with this secret.
    pub server_errors: u32,
    /// Okta-like: a deactivated secret no longer logs in.
    pub active: bool,
}

#[derive(Debug, Default)]
pub struct ProviderState {
    pub secrets: Vec<ProviderSecret>,
    next_id: u64,
    tokens: u64,
    /// Ids the operator gave rekeyd (bootstrap id, `set-secret --id`): the
    /// only untagged ones it may delete (I4).
    pub operator_ids: BTreeSet<String>,
    /// Ids created through the secret API (by rekeyd): ours even untagged.
    pub created_by_rekeyd: BTreeSet<String>,
    /// The secret value each token was minted with, until the engine that
    /// received the token classifies its login (see `actors::Used`); the
    /// tokens of verification logins stay (a run mints a few hundred).
    pub minted_by: BTreeMap<String, String>,
}

impl ProviderState {
    /// Adds a secret directly (the seed's initial secrets, or one an
    /// operator makes in the provider's portal). `id`: a fixed id, else the
    /// next `sN`.
    pub fn add(
        &mut self,
        id: Option<&str>,
        description: &str,
        client: &str,
        created_at: SystemTime,
    ) -> (String, String) {
        self.add_valued(id, description, client, created_at, None)
    }

    /// [`ProviderState::add`] with a value of the caller's choice.
    pub fn add_valued(
        &mut self,
        id: Option<&str>,
        description: &str,
        client: &str,
        created_at: SystemTime,
        value: Option<&str>,
    ) -> (String, String) {
        self.next_id += 1;
        let id = id.map_or_else(|| format!("s{}", self.next_id), str::to_string);
        let value = value.map_or_else(|| format!("value-of-{id}"), str::to_string);
        let now = Instant::now();
        self.secrets.push(ProviderSecret {
            id: id.clone(),
            description: description.to_string(),
            client: client.to_string(),
            value: value.clone(),
            created_at,
            accepted_from: now,
            listed_from: now,
            deleted_at: None,
            ghost_until: None,
            revoked: false,
            server_errors: 0,
            active: true,
        });
        (id, value)
    }

    pub fn get(&self, id: &str) -> Option<&ProviderSecret> {
        self.secrets.iter().find(|s| s.id == id)
    }

    /// The live secret with this value, else any (duplicates of a
    /// caller-chosen value are possible).
    fn by_value(&self, value: &str) -> Option<&ProviderSecret> {
        let mut all = self.secrets.iter().filter(|s| s.value == value);
        let first = all.clone().next();
        all.find(|s| s.deleted_at.is_none() && s.active).or(first)
    }

    /// Live secrets of our client.
    pub fn live_of_client(&self) -> usize {
        self.secrets
            .iter()
            .filter(|s| s.client == CLIENT && s.deleted_at.is_none())
            .count()
    }

    /// Whether the provider accepts `value` now, on its up-to-date nodes:
    /// our client's, not deleted, not revoked, propagated.
    pub fn accepts(&self, value: &str) -> bool {
        self.by_value(value).is_some_and(|s| {
            s.client == CLIENT
                && s.deleted_at.is_none()
                && !s.revoked
                && s.active
                && Instant::now() >= s.accepted_from
        })
    }

    /// Whether the provider holds `value` for our client and will accept
    /// it once it has propagated.
    pub fn holds(&self, value: &str) -> bool {
        self.by_value(value)
            .is_some_and(|s| s.client == CLIENT && s.deleted_at.is_none() && !s.revoked && s.active)
    }

    /// A secret value as traces show it: its id and state, never the value.
    pub fn describe_value(&self, value: &str) -> String {
        match self.by_value(value) {
            None => "?unknown".into(),
            Some(s) => {
                let mut d = s.id.clone();
                if s.deleted_at.is_some() {
                    d.push_str("(deleted)");
                } else if s.revoked {
                    d.push_str("(revoked)");
                } else if Instant::now() < s.accepted_from {
                    d.push_str("(propagating)");
                }
                d
            }
        }
    }

    pub fn value_of(&self, id: &str) -> Option<String> {
        self.get(id).map(|s| s.value.clone())
    }

    fn mint(&mut self, value: &str) -> Token {
        self.tokens += 1;
        let access_token = format!("token-{}", self.tokens);
        self.minted_by
            .insert(access_token.clone(), value.to_string());
        Token::new(
            SecretString::from(access_token),
            "Bearer".into(),
            None,
            TOKEN_LIFETIME,
        )
    }
}

fn server_error(operation: &'static str) -> ProviderError {
    ProviderError {
        kind: ErrorKind::Transient,
        operation,
        status: Some(503),
        code: None,
        detail: "simulated outage".into(),
        retry_after: None,
    }
}

fn refused(operation: &'static str, detail: &str) -> ProviderError {
    ProviderError {
        kind: ErrorKind::Refused,
        operation,
        status: Some(400),
        code: Some("E0000001".into()),
        detail: detail.into(),
        retry_after: None,
    }
}

fn lost_reply(operation: &'static str) -> ProviderError {
    ProviderError::transient(operation, "connection reset after the request was sent")
}

fn invalid_client() -> ProviderError {
    ProviderError {
        kind: ErrorKind::Rejected,
        operation: "login",
        status: Some(400),
        code: Some("invalid_client".into()),
        detail: String::new(),
        retry_after: None,
    }
}

impl World {
    /// A provider call fails with a 5xx (more often during an outage).
    fn provider_fails(&mut self) -> bool {
        if !self.faults.enabled {
            return false;
        }
        let at = self.elapsed();
        let p = if self.faults.outages.iter().any(|&(a, b)| a <= at && at < b) {
            0.9
        } else {
            self.faults.p_5xx
        };
        self.rng.chance(p)
    }

    fn login(&mut self, value: &str) -> Result<Token, ProviderError> {
        let now = Instant::now();
        let actor = super::current_actor();
        let index = self
            .provider
            .by_value(value)
            .and_then(|found| self.provider.secrets.iter().position(|s| s.id == found.id));
        let id = index.map(|i| self.provider.secrets[i].id.clone());
        let hooked = match (&id, self.hooks.login.as_mut()) {
            (Some(id), Some(hook)) => hook(id, actor),
            _ => None,
        };
        let reply = match hooked {
            Some(reply) => reply,
            None if self.provider_fails() => LoginReply::ServerError,
            None => {
                let flap = self.faults.enabled && {
                    let p = self.faults.p_flap;
                    self.rng.chance(p)
                };
                match index.map(|i| &self.provider.secrets[i]) {
                    _ if flap => LoginReply::Rejected,
                    Some(s) if s.client != CLIENT => LoginReply::Rejected,
                    Some(s) if s.deleted_at.is_some() => {
                        if s.ghost_until.is_some_and(|t| now < t) {
                            self.cover(cover::GHOST_LOGIN);
                            LoginReply::Ok
                        } else {
                            LoginReply::Rejected
                        }
                    }
                    Some(s) if s.revoked || !s.active || now < s.accepted_from => {
                        LoginReply::Rejected
                    }
                    Some(_) => LoginReply::Ok,
                    None => LoginReply::Rejected,
                }
            }
        };
        // (7): many 5xx for the pending secret, then a rejection.
        if let Some(i) = index {
            let is_pending = self.store.record.as_ref().is_some_and(|(_, r)| {
                r.pending()
                    .is_some_and(|p| p.value.expose_secret() == value)
            });
            let s = &mut self.provider.secrets[i];
            let streak = s.server_errors;
            s.server_errors = match reply {
                LoginReply::ServerError => streak + 1,
                _ => 0,
            };
            if reply == LoginReply::Rejected && streak >= 3 && is_pending {
                self.cover(cover::LATE_REJECTION);
            }
        }
        let shown = self.provider.describe_value(value);
        self.note(Call::Login, |_| format!("{shown} -> {reply:?}"));
        match reply {
            LoginReply::Ok => Ok(self.provider.mint(value)),
            LoginReply::Rejected => Err(invalid_client()),
            LoginReply::ServerError => Err(server_error("login")),
        }
    }

    fn list(&mut self) -> Result<Vec<RemoteSecret>, ProviderError> {
        if self.provider_fails() {
            self.note(Call::List, |_| "-> 503".into());
            return Err(server_error("list secrets"));
        }
        let now = Instant::now();
        let mut hidden = Vec::new();
        let mut listed = Vec::new();
        for s in self
            .provider
            .secrets
            .iter()
            .filter(|s| s.deleted_at.is_none())
        {
            if now < s.listed_from {
                hidden.push(s.id.clone());
                continue;
            }
            listed.push(RemoteSecret {
                id: s.id.clone(),
                description: s.description.clone(),
                client_id: Some(s.client.clone()),
                created_at: Some(s.created_at),
                expires_at: None,
            });
        }
        if !hidden.is_empty() {
            self.cover(cover::LIST_HID_SECRET);
        }
        self.note(Call::List, |_| {
            let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
            format!("-> {ids:?} (lagging, not shown: {hidden:?})")
        });
        Ok(listed)
    }

    fn create(&mut self, request: CreateRequest<'_>) -> Result<NewSecret, ProviderError> {
        let description = if self.caps.tags {
            request.description
        } else {
            ""
        };
        if self.provider_fails() {
            self.note(Call::Create, |_| format!("{description} -> 503"));
            return Err(server_error("create secret"));
        }
        let chosen = request.value.map(|v| v.expose_secret().to_string());
        if matches!(
            self.caps.value,
            ValueOrigin::Caller { .. } | ValueOrigin::Key
        ) && chosen.is_none()
        {
            self.note(Call::Create, |_| "without a value -> 400".into());
            return Err(refused("create secret", "a value is required"));
        }
        if let Overlap::Many { max: Some(max) } = self.caps.overlap
            && self.provider.live_of_client() >= max as usize
        {
            self.note(Call::Create, |_| format!("-> 400 (already {max} secrets)"));
            return Err(refused("create secret", "too many secrets"));
        }
        let wall = self.wall();
        let unchanged = chosen.as_deref().and_then(|v| {
            self.provider
                .secrets
                .iter()
                .find(|s| s.client == CLIENT && s.deleted_at.is_none() && s.value == v)
                .map(|s| (s.id.clone(), s.value.clone()))
        });
        // An RFC 7592 server that keeps the secret on an update (as
        // oidc-provider does): the client's live secret comes back. (One
        // that replaces it server-side cannot be covered by any journal
        // when the reply is lost: the documented limit, not simulated.)
        let kept = (self.caps == rekeyd::provider::registration::CAPABILITIES)
            .then(|| {
                self.provider
                    .secrets
                    .iter()
                    .find(|s| s.client == CLIENT && s.deleted_at.is_none())
                    .map(|s| (s.id.clone(), s.value.clone()))
            })
            .flatten();
        if self.caps.value == ValueOrigin::Key
            && let Some((id, _)) = &unchanged
        {
            // A key publisher adds a key once: publishing the key the set
            // holds writes nothing (registration jwks, a JWKS file).
            self.note(Call::Create, |_| format!("-> {id} (key already published)"));
            return Ok(NewSecret {
                id: Some(id.clone()),
                value: SecretString::from(chosen.clone().unwrap_or_default()),
                expires_at: None,
                registration_access_token: None,
            });
        }
        if let Some((id, value)) = unchanged.filter(|_| self.caps.replaces()).or(kept) {
            // Setting the value the client already has changes nothing.
            self.note(Call::Create, |_| format!("-> {id} (same value, unchanged)"));
            return Ok(NewSecret {
                id: None,
                value: SecretString::from(value),
                expires_at: None,
                registration_access_token: None,
            });
        }
        if self.caps.replaces() {
            // The provider replaces the client's secret: the old ones stop
            // working now.
            let now = Instant::now();
            for s in self
                .provider
                .secrets
                .iter_mut()
                .filter(|s| s.client == CLIENT && s.deleted_at.is_none())
            {
                s.deleted_at = Some(now);
            }
        }
        // A key is published under its kid (a registration's jwks, a JWKS
        // file), which follows from the key.
        let kid = chosen
            .as_deref()
            .filter(|_| self.caps.value == ValueOrigin::Key)
            .and_then(|v| rekeyd::provider::key::from_secret(&SecretString::from(v)).ok())
            .map(|k| k.kid().to_string());
        let (id, value) =
            self.provider
                .add_valued(kid.as_deref(), description, CLIENT, wall, chosen.as_deref());
        self.provider.created_by_rekeyd.insert(id.clone());
        let (accepted_in, listed_in) = self.new_secret_lags();
        let now = Instant::now();
        let s = self.provider.secrets.last_mut().expect("just added");
        s.accepted_from = now + accepted_in;
        s.listed_from = now + listed_in;
        let lost = self.faults.enabled && {
            let p = self.faults.p_lost_create;
            self.rng.chance(p)
        };
        if lost {
            self.cover(cover::LOST_CREATE);
        }
        self.note(Call::Create, |_| {
            format!(
                "{description} -> {id} (refused for {accepted_in:?}, unlisted for {listed_in:?}){}",
                if lost { ", REPLY LOST" } else { "" }
            )
        });
        if lost {
            return Err(lost_reply("create secret"));
        }
        Ok(NewSecret {
            id: (!self.caps.replaces()).then_some(id),
            value: SecretString::from(value),
            expires_at: None,
            registration_access_token: None,
        })
    }

    /// Okta-like deactivation: the secret stops logging in; I4 and S1 hold
    /// as for a delete.
    fn deactivate(&mut self, id: &str) -> Result<Deleted, ProviderError> {
        if self.provider_fails() {
            self.note(Call::Delete, |_| format!("deactivate {id} -> 503"));
            return Err(server_error("deactivate secret"));
        }
        let Some(i) = self
            .provider
            .secrets
            .iter()
            .position(|s| s.id == id && s.deleted_at.is_none())
        else {
            self.note(Call::Delete, |_| format!("deactivate {id} -> 404"));
            return Ok(Deleted::NotFound);
        };
        self.check_delete(i);
        self.provider.secrets[i].active = false;
        self.note(Call::Delete, |_| format!("deactivate {id} -> inactive"));
        Ok(Deleted::Deleted)
    }

    /// Propagation and list lag of a secret created now.
    pub fn new_secret_lags(&mut self) -> (Duration, Duration) {
        if !self.faults.enabled {
            return (Duration::ZERO, Duration::ZERO);
        }
        let f = self.faults.clone();
        let accepted = if self.rng.chance(f.p_dud) {
            self.rng
                .between(Duration::from_secs(60), Duration::from_secs(120))
        } else if self.rng.chance(f.p_propagation) {
            self.rng.between(Duration::ZERO, f.propagation_max)
        } else {
            Duration::ZERO
        };
        let listed = if self.rng.chance(f.p_list_lag) {
            self.rng.between(Duration::ZERO, f.list_lag_max)
        } else {
            Duration::ZERO
        };
        (accepted, listed)
    }

    fn delete(&mut self, id: &str) -> Result<Deleted, ProviderError> {
        if self.provider_fails() {
            self.note(Call::Delete, |_| format!("{id} -> 503"));
            return Err(server_error("delete secret"));
        }
        let Some(i) = self
            .provider
            .secrets
            .iter()
            .position(|s| s.id == id && s.deleted_at.is_none())
        else {
            self.note(Call::Delete, |_| format!("{id} -> 404"));
            return Ok(Deleted::NotFound);
        };
        if self.caps.retire == Retire::DeactivateThenDelete && self.provider.secrets[i].active {
            self.note(Call::Delete, |_| format!("{id} -> 400 (still active)"));
            return Err(refused("delete secret", "cannot delete an active secret"));
        }
        self.check_delete(i);
        let ghost = if self.faults.enabled && {
            let p = self.faults.p_ghost;
            self.rng.chance(p)
        } {
            let max = self.faults.ghost_max;
            Some(Instant::now() + self.rng.between(Duration::ZERO, max))
        } else {
            None
        };
        let s = &mut self.provider.secrets[i];
        s.deleted_at = Some(Instant::now());
        s.ghost_until = ghost;
        let lost = self.faults.enabled && {
            let p = self.faults.p_lost_delete;
            self.rng.chance(p)
        };
        if lost {
            self.cover(cover::LOST_DELETE);
        }
        self.note(Call::Delete, |_| {
            format!("{id} -> deleted{}", if lost { ", REPLY LOST" } else { "" })
        });
        if lost {
            return Err(lost_reply("delete secret"));
        }
        Ok(Deleted::Deleted)
    }

    /// I4 and S1 at the moment of a delete: only our client's secrets that
    /// are tagged for this credential or whose id the operator gave; never
    /// one that the journal names (the licence of a delete is a swap that
    /// stopped naming it, S1).
    fn check_delete(&mut self, index: usize) {
        let s = &self.provider.secrets[index];
        let tagged = parse_tag(CRED, &s.description).is_some();
        let given = self.provider.operator_ids.contains(&s.id);
        let created = self.provider.created_by_rekeyd.contains(&s.id);
        let mut problems = Vec::new();
        if s.client != CLIENT || !(tagged || given || created) {
            problems.push(format!(
                "I4: deleting {} ({:?}, client {}), neither tagged by us nor given by the operator",
                s.id, s.description, s.client
            ));
        }
        if let Some((version, record)) = &self.store.record {
            let named = named_ids(record);
            if named.contains(&s.id.as_str()) {
                problems.push(format!(
                    "S1: deleting {} which journal v{version} names ({})",
                    s.id,
                    super::show_record(record, &self.provider)
                ));
            }
            if tagged
                && !named.contains(&s.id.as_str())
                && s.created_at + Duration::from_secs(600) <= self.wall()
            {
                self.cover(cover::SWEPT_ORPHAN);
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// The provider revokes secret `id` (it refuses it from now on).
    pub fn revoke(&mut self, id: &str) {
        if let Some(s) = self.provider.secrets.iter_mut().find(|s| s.id == id) {
            s.revoked = true;
        }
        self.note(Call::Harness, |_| format!("provider REVOKES {id}"));
        self.check();
    }
}

/// The provider model as rekeyd sees it.
#[derive(Clone)]
pub struct ProviderModel {
    pub sim: Arc<Sim>,
}

impl ProviderModel {
    async fn call<T>(&self, call: Call, effect: impl FnOnce(&mut World) -> T) -> T {
        self.sim.enter().await;
        let _flight = self.sim.in_flight(call);
        self.sim.pause(call, Stage::Before).await;
        let out = {
            let mut w = self.sim.lock();
            let out = effect(&mut w);
            w.check();
            out
        };
        self.sim.pause(call, Stage::After).await;
        out
    }
}

impl TokenProvider for ProviderModel {
    fn login<'a>(
        &'a self,
        secret: &'a SecretString,
    ) -> BoxFuture<'a, Result<Token, ProviderError>> {
        Box::pin(self.call(Call::Login, move |w| w.login(secret.expose_secret())))
    }
}

impl SecretApi for ProviderModel {
    fn capabilities(&self) -> Capabilities {
        self.sim.lock().caps
    }

    fn list<'a>(
        &'a self,
        _bearer: &'a Token,
    ) -> BoxFuture<'a, Result<Vec<RemoteSecret>, ProviderError>> {
        Box::pin(self.call(Call::List, World::list))
    }

    fn create<'a>(
        &'a self,
        _bearer: &'a Token,
        request: CreateRequest<'a>,
    ) -> BoxFuture<'a, Result<NewSecret, ProviderError>> {
        Box::pin(self.call(Call::Create, move |w| w.create(request)))
    }

    fn deactivate<'a>(
        &'a self,
        _bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(self.call(Call::Delete, move |w| w.deactivate(id)))
    }

    fn delete<'a>(
        &'a self,
        _bearer: &'a Token,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Deleted, ProviderError>> {
        Box::pin(self.call(Call::Delete, move |w| w.delete(id)))
    }
}
