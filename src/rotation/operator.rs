//! `rekeyd set-secret`: an operator installs a secret by hand, among
//! running daemons and rotations (DESIGN.md S6).
//!
//! Order matters: claim, then read, then verify, then compare-and-swap from
//! the version read under the claim. Verifying before claiming (as this
//! command once did) can prove a secret that a rotation deletes while the
//! command waits for the claim; the swap from a stale read is what stops
//! the command from installing it anyway (S1).

use std::time::SystemTime;

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::history::{self, Event, Step};
use crate::provider::{ProviderError, TokenProvider};
use crate::store::{CredentialRecord, RetiredSecret, Rotation, SecretEntry, Store, StoreError};

/// What the operator asks for.
pub struct SetSecret<'a> {
    pub name: &'a str,
    pub value: SecretString,
    /// The provider's id of the secret, so a later rotation can delete it.
    pub id: Option<String>,
    /// Log in with the value before installing it (off: `--no-verify`).
    pub verify: bool,
    /// Replace an unfinished rotation journal (`--force`); needs `verify`.
    pub force: bool,
    /// Also retire the current secret this install replaces, when the
    /// journal knows its id: for secret APIs without tags (Okta), where no
    /// sweep would ever find it, and where it would keep one of the app's
    /// two places. MapsIndoors leaves it in place (its tag lets the sweep
    /// find rekeyd's own).
    pub retire_replaced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SetSecretError {
    #[error(
        "the provider does not accept this secret: {0} (check the value; --no-verify installs it anyway)"
    )]
    Refused(ProviderError),
    #[error(
        "this secret was retired by a rotation (deleted, or about to be, at the provider); installing it would lock the credential out. Give the secret now in use (`rekeyd status` shows the rotation) or a new one"
    )]
    Retired,
    #[error(
        "a rotation of {name} is unfinished (phase {phase}{retiring}); run `rekeyd rotate {name}` to finish it first, or repeat with --force to replace the journal (the secret is verified first)"
    )]
    Unfinished {
        name: String,
        phase: &'static str,
        retiring: String,
    },
    #[error(
        "--force needs verification: a journal is only replaced by a secret proven to log in (drop --no-verify)"
    )]
    ForceWithoutVerify,
    #[error(
        "a rotation of {0} is creating a secret with a value only its journal holds; the provider may already have it, under an id no listing can tie to rekeyd (the secret carries no tag). Run `rekeyd rotate {0}` to finish the rotation first; --force cannot replace this journal"
    )]
    ChosenValueInFlight(String),
    #[error(
        "a rotation of {0} is publishing a new key whose private half only its journal holds; the server may already have its public half. Run `rekeyd rotate {0}` to finish the rotation first (it proves the new key, then withdraws the old one), or repeat with --force to replace the journal (the key is verified first; the daemon withdraws the key being published once a listing shows it)"
    )]
    KeyInFlight(String),
    #[error(
        "the journal of {0} changed while this command ran (a rotation moved on); run it again"
    )]
    Changed(String),
    #[error("stopped before anything was written")]
    Stopped,
    #[error(transparent)]
    Store(StoreError),
}

/// What was installed, and what a forced install replaced.
#[derive(Debug, Default)]
pub struct Installed {
    /// With `--force`: the phase of the rotation journal that was replaced.
    pub replaced_phase: Option<&'static str>,
    /// Provider ids now in the journal's retire list: the daemon deletes
    /// them after checking that they are this client's (S7).
    pub retiring: Vec<String>,
    /// The provider id of the replaced secret that `retire_replaced` asked
    /// to retire but that is left in place, because the new value was
    /// installed without verification: the operator removes it once the
    /// new one is known to work.
    pub left_in_place: Option<String>,
}

/// Installs `req.value` as the current secret of `req.name` (S6).
pub async fn set_secret(
    store: &dyn Store,
    provider: &dyn TokenProvider,
    req: SetSecret<'_>,
    stop: &CancellationToken,
) -> Result<Installed, SetSecretError> {
    if req.force && !req.verify {
        return Err(SetSecretError::ForceWithoutVerify);
    }
    // S6: the claim first, so no rotation of ours moves while we decide.
    let _claim = tokio::select! {
        c = store.claim(req.name, true) => c.map_err(SetSecretError::Store)?,
        _ = stop.cancelled() => return Err(SetSecretError::Stopped),
    };
    let existing = store
        .load_settled(req.name)
        .await
        .map_err(SetSecretError::Store)?;
    if let Some(r) = &existing {
        if r.value.knows_retired(&req.value, req.id.as_deref()) {
            return Err(SetSecretError::Retired);
        }
        // A caller-chosen create that may have landed: only its journal's
        // value can find that secret (a login), so replacing the journal
        // would leave an untagged orphan, which at Okta also takes one of
        // the app's two places (I3).
        if let Some(chosen) = r.value.chosen() {
            let name = req.name.to_string();
            match crate::provider::key::from_secret(chosen) {
                // A key is listed by its thumbprint, which the journal's
                // value gives: forced, it is retired by that id like any
                // unconfirmed secret (S7, [`discarded`]), never orphaned.
                Ok(_) if req.force => {}
                Ok(_) => return Err(SetSecretError::KeyInFlight(name)),
                Err(_) => return Err(SetSecretError::ChosenValueInFlight(name)),
            }
        }
        if r.value.is_unfinished() && !req.force {
            return Err(SetSecretError::Unfinished {
                name: req.name.to_string(),
                phase: r.value.phase(),
                retiring: match r.value.retire.len() {
                    0 => String::new(),
                    n => format!(", {n} secret(s) still to delete"),
                },
            });
        }
    }
    if req.verify {
        let login = tokio::select! {
            l = provider.login(&req.value) => l,
            _ = stop.cancelled() => return Err(SetSecretError::Stopped),
        };
        login.map_err(SetSecretError::Refused)?;
    }
    let new = SecretEntry {
        id: req.id,
        value: req.value,
        created_at: SystemTime::now(),
        expires_at: None,
    };
    let mut installed = Installed::default();
    let record = match &existing {
        None => CredentialRecord::new(new),
        Some(r) => {
            let mut next = r.value.clone();
            if r.value.is_unfinished() {
                installed.replaced_phase = Some(r.value.phase());
                // The replaced journal's secrets are retired, not forgotten:
                // the daemon deletes them once a listing shows they are this
                // client's (S7), so none is left untracked (I3).
                let new_digest = RetiredSecret::of(&new).sha256;
                for (entry, created_here) in discarded(&r.value) {
                    let entry = &entry;
                    // A secret the rotation created is ours without a
                    // listing (S7).
                    let retired = RetiredSecret {
                        confirmed: created_here,
                        ..RetiredSecret::of(entry)
                    };
                    let same = retired.id.is_some() && retired.id == new.id
                        || retired.sha256 == new_digest;
                    let known = next.retire.iter().any(|x| x.id == retired.id);
                    if retired.id.is_some() && !same && !known {
                        next.retire.push(retired);
                    }
                }
                next.rotation = Rotation::Idle;
            }
            let replaced = RetiredSecret::of(&r.value.current);
            let same = replaced.id == new.id || replaced.sha256 == RetiredSecret::of(&new).sha256;
            let known = next.retire.iter().any(|x| x.id == replaced.id);
            if req.retire_replaced && replaced.id.is_some() && !same && !known {
                if req.verify {
                    // Unconfirmed: a listing shows it is this client's
                    // before it is deleted (S7).
                    next.retire.push(replaced);
                } else {
                    // I1: nothing proved the new value (--no-verify), and
                    // the replaced one may be the only one that works: it
                    // is left in place, and in the journal's hands never
                    // counted retired, so it can be installed again.
                    installed.left_in_place = replaced.id;
                }
            }
            next.current = new;
            next
        }
    };
    installed.retiring = record.retire.iter().filter_map(|r| r.id.clone()).collect();
    let expected = existing.as_ref().map(|r| r.version);
    let mut detail = if req.verify {
        "verified by a login".to_string()
    } else {
        "installed without verification (--no-verify)".to_string()
    };
    if let Some(phase) = installed.replaced_phase {
        detail.push_str(&format!(
            "; replaced an unfinished rotation journal (phase {phase})"
        ));
    }
    let set = Event::new(Step::Set)
        .secret(record.current.id.as_deref())
        .detail(detail);
    match store.compare_and_swap(req.name, expected, &record).await {
        Ok(_) => {
            // After the write that commits it (see crate::history).
            history::record(store, req.name, &[set], SystemTime::now()).await;
            Ok(installed)
        }
        Err(StoreError::Conflict { .. }) => Err(SetSecretError::Changed(req.name.to_string())),
        Err(e) => Err(SetSecretError::Store(e)),
    }
}

/// The secrets an unfinished rotation created or had committed to deleting,
/// each with whether the rotation created it: the pending one (created), or
/// the promoted one and the old one (promoted), or a key being published
/// (creating; a secret being created there is refused earlier, no listing
/// could find it). The secret that was current before the rotation began
/// is left in place, as an install on an idle journal leaves it.
fn discarded(record: &CredentialRecord) -> Vec<(SecretEntry, bool)> {
    match &record.rotation {
        Rotation::Created { pending, .. } => vec![(pending.clone(), true)],
        Rotation::Promoted { old, .. } => {
            vec![(record.current.clone(), true), (old.clone(), false)]
        }
        // A key being published may be at the server or not: its
        // thumbprint names it in a listing, which shows whether it is this
        // client's before it is withdrawn (S7).
        Rotation::Creating {
            chosen: Some(chosen),
            ..
        } => match crate::provider::key::from_secret(chosen) {
            Ok(key) => vec![(
                SecretEntry {
                    id: Some(key.thumbprint()),
                    value: chosen.clone(),
                    created_at: SystemTime::now(),
                    expires_at: None,
                },
                false,
            )],
            Err(_) => Vec::new(),
        },
        Rotation::Idle | Rotation::Creating { .. } => Vec::new(),
    }
}
