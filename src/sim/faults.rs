//! The fault plan: what goes wrong, where and how often.
//!
//! Real provider endpoints sit behind load balancers and WAFs that fail in
//! ways the provider's documentation never mentions: HTML error pages, lost
//! replies after the work was done, endless bodies, hung connections. The
//! daemon's invariants (never locked out, no orphans, serve continuously)
//! only mean something if they hold under those failures, so tests script
//! them here. [`Faults::decide`] is a pure function of the plan and a random
//! source; `routes.rs` carries out its verdict.

use std::time::Duration;

use rand::Rng;

/// The simulated endpoints, for fault scoping and request counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `POST /connect/token`
    MapsIndoorsToken,
    /// `GET /api/clientcredentials`
    SecretsList,
    /// `POST /api/clientcredentials`
    SecretsCreate,
    /// `DELETE /api/clientcredentials`
    SecretsDelete,
    /// `POST /api/security/oauth/token`
    MapplsToken,
    /// `POST /oauth2/token`
    OAuth2Token,
    /// `POST /oauth2/introspect`
    OAuth2Introspect,
    /// Okta: `POST /oauth2/v1/token`
    OktaToken,
    /// Okta: `GET /api/v1/apps/{app}/credentials/secrets`
    OktaSecretsList,
    /// Okta: `POST /api/v1/apps/{app}/credentials/secrets`
    OktaSecretsCreate,
    /// Okta: `POST …/secrets/{id}/lifecycle/deactivate`
    OktaSecretsDeactivate,
    /// Okta: `DELETE …/secrets/{id}`
    OktaSecretsDelete,
    /// Okta: `GET /api/v1/apps/{app}/credentials/jwks`
    OktaKeysList,
    /// Okta: `POST /api/v1/apps/{app}/credentials/jwks`
    OktaKeysAdd,
    /// Okta: `POST …/jwks/{id}/lifecycle/deactivate`
    OktaKeysDeactivate,
    /// Okta: `DELETE …/jwks/{id}`
    OktaKeysDelete,
    /// Auth0: `POST /oauth/token`
    Auth0Token,
    /// Auth0: `PATCH /api/v2/clients/{client_id}`
    Auth0ClientUpdate,
    /// Keycloak: `POST /realms/{realm}/protocol/openid-connect/token`
    KeycloakToken,
    /// Keycloak: `PUT /admin/realms/{realm}/clients/{id}`
    KeycloakClientUpdate,
    /// Entra: `POST /{tenant}/oauth2/v2.0/token`
    EntraToken,
    /// Entra (Graph): `GET /v1.0/applications/{id}`
    EntraList,
    /// Entra (Graph): `POST /v1.0/applications/{id}/addPassword`
    EntraAddPassword,
    /// Entra (Graph): `POST /v1.0/applications/{id}/removePassword`
    EntraRemovePassword,
    /// `GET /healthz` (counted, never faulted)
    Health,
}

impl Endpoint {
    /// Classifies a request; `None` for paths and methods the sim does not
    /// serve (they get axum's 404/405 and no faults).
    pub fn classify(method: &axum::http::Method, path: &str) -> Option<Endpoint> {
        use axum::http::Method;
        Some(match path {
            "/connect/token" => Endpoint::MapsIndoorsToken,
            "/api/security/oauth/token" => Endpoint::MapplsToken,
            "/oauth2/token" => Endpoint::OAuth2Token,
            "/oauth2/introspect" => Endpoint::OAuth2Introspect,
            "/healthz" => Endpoint::Health,
            "/api/clientcredentials" => match *method {
                Method::GET => Endpoint::SecretsList,
                Method::POST => Endpoint::SecretsCreate,
                Method::DELETE => Endpoint::SecretsDelete,
                _ => return None,
            },
            "/oauth2/v1/token" => Endpoint::OktaToken,
            "/oauth/token" => Endpoint::Auth0Token,
            _ => return Self::classify_management(method, path),
        })
    }

    /// Okta's and Auth0's management paths, which carry ids.
    fn classify_management(method: &axum::http::Method, path: &str) -> Option<Endpoint> {
        use axum::http::Method;
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match (method, segments.as_slice()) {
            (&Method::GET, ["api", "v1", "apps", _, "credentials", "secrets"]) => {
                Endpoint::OktaSecretsList
            }
            (&Method::POST, ["api", "v1", "apps", _, "credentials", "secrets"]) => {
                Endpoint::OktaSecretsCreate
            }
            (
                &Method::POST,
                [
                    "api",
                    "v1",
                    "apps",
                    _,
                    "credentials",
                    "secrets",
                    _,
                    "lifecycle",
                    "deactivate",
                ],
            ) => Endpoint::OktaSecretsDeactivate,
            (&Method::DELETE, ["api", "v1", "apps", _, "credentials", "secrets", _]) => {
                Endpoint::OktaSecretsDelete
            }
            (&Method::GET, ["api", "v1", "apps", _, "credentials", "jwks"]) => {
                Endpoint::OktaKeysList
            }
            (&Method::POST, ["api", "v1", "apps", _, "credentials", "jwks"]) => {
                Endpoint::OktaKeysAdd
            }
            (
                &Method::POST,
                [
                    "api",
                    "v1",
                    "apps",
                    _,
                    "credentials",
                    "jwks",
                    _,
                    "lifecycle",
                    "deactivate",
                ],
            ) => Endpoint::OktaKeysDeactivate,
            (&Method::DELETE, ["api", "v1", "apps", _, "credentials", "jwks", _]) => {
                Endpoint::OktaKeysDelete
            }
            (&Method::PATCH, ["api", "v2", "clients", _]) => Endpoint::Auth0ClientUpdate,
            (&Method::POST, ["realms", _, "protocol", "openid-connect", "token"]) => {
                Endpoint::KeycloakToken
            }
            (&Method::PUT, ["admin", "realms", _, "clients", _]) => Endpoint::KeycloakClientUpdate,
            (&Method::POST, [_, "oauth2", "v2.0", "token"]) => Endpoint::EntraToken,
            (&Method::GET, ["v1.0", "applications", _]) => Endpoint::EntraList,
            (&Method::POST, ["v1.0", "applications", _, "addPassword"]) => {
                Endpoint::EntraAddPassword
            }
            (&Method::POST, ["v1.0", "applications", _, "removePassword"]) => {
                Endpoint::EntraRemovePassword
            }
            _ => return None,
        })
    }

    pub fn is_token(self) -> bool {
        matches!(
            self,
            Endpoint::MapsIndoorsToken
                | Endpoint::MapplsToken
                | Endpoint::OAuth2Token
                | Endpoint::OktaToken
                | Endpoint::Auth0Token
                | Endpoint::KeycloakToken
                | Endpoint::EntraToken
        )
    }

    /// Every secret API: MapsIndoors', Okta's (secrets and keys), Auth0's,
    /// Keycloak's and Entra's.
    pub fn is_secrets(self) -> bool {
        matches!(
            self,
            Endpoint::SecretsList
                | Endpoint::SecretsCreate
                | Endpoint::SecretsDelete
                | Endpoint::OktaSecretsList
                | Endpoint::OktaSecretsCreate
                | Endpoint::OktaSecretsDeactivate
                | Endpoint::OktaSecretsDelete
                | Endpoint::OktaKeysList
                | Endpoint::OktaKeysAdd
                | Endpoint::OktaKeysDeactivate
                | Endpoint::OktaKeysDelete
                | Endpoint::Auth0ClientUpdate
                | Endpoint::KeycloakClientUpdate
                | Endpoint::EntraList
                | Endpoint::EntraAddPassword
                | Endpoint::EntraRemovePassword
        )
    }
}

/// Which endpoints a fault plan applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultScope {
    /// Every provider endpoint (all but `/healthz`).
    #[default]
    All,
    /// Every token endpoint.
    Token,
    /// Every secret API ([`Endpoint::is_secrets`]).
    Secrets,
    /// Exactly one endpoint, e.g. only the `DELETE` of the secret API.
    Only(Endpoint),
}

impl FaultScope {
    pub fn contains(self, endpoint: Endpoint) -> bool {
        if endpoint == Endpoint::Health {
            return false;
        }
        match self {
            FaultScope::All => true,
            FaultScope::Token => endpoint.is_token(),
            FaultScope::Secrets => endpoint.is_secrets(),
            FaultScope::Only(e) => e == endpoint,
        }
    }
}

/// A fault plan. Counters (`*_next`) are consumed one per matching request,
/// in the order hang, fail, quota, drop, garbage, huge, echo; only when none
/// is left do the random faults get a chance. Latency is added to every
/// matching request, faulted or not. `too_many_secrets` is a standing
/// condition of the provider, not a counter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    pub scope: FaultScope,
    /// Uniformly random extra delay `(min, max)` per matching request.
    pub latency: Option<(Duration, Duration)>,
    /// Next N matching requests answer 503 with an HTML page.
    pub fail_next: u32,
    /// Next N answer a quota error: 403 for Mappls, 429 elsewhere.
    pub quota_next: u32,
    /// `Retry-After` seconds sent with quota errors (no header if `None`).
    pub quota_retry_after: Option<u64>,
    /// Next N are performed (state changes) but the response is lost midway.
    pub drop_next: u32,
    /// Next N answer 200 `text/html`.
    pub garbage_next: u32,
    /// Next N answer 200 `application/json` with an endless (50 MB) body.
    pub huge_next: u32,
    /// Next N never answer.
    pub hang_next: u32,
    /// Next N are refused (400) with a body and headers that echo every
    /// secret value the request carried and the sim knows for its client:
    /// the client secret (as sent, and the Basic credentials), every other
    /// form value (assertions), the bearer token, and all of the client's
    /// secrets, in `error`, `error_description`, `error_uri`, `message`,
    /// `detail`, unknown fields, `WWW-Authenticate` and `X-Echo`. What a
    /// careless provider (or a debugging proxy) sends back.
    pub echo_next: u32,
    /// While set, creating a secret (`POST /api/clientcredentials`) is
    /// refused like a client that already has its maximum number of
    /// secrets: `400 {"error": "too_many_secrets", "error_description":
    /// ...}`, after the bearer token is checked. A permanent refusal: it
    /// lasts until the test (the "operator") clears it.
    pub too_many_secrets: bool,
    /// Probability per matching request of a 500/502/503.
    pub random_5xx: f64,
    /// Probability per matching request of a performed-but-lost response.
    pub random_drop: f64,
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Hang,
    /// 503 HTML page from a "load balancer".
    Fail,
    Quota {
        retry_after: Option<u64>,
    },
    /// Perform the request, then lose the response.
    Drop,
    Garbage,
    Huge,
    /// A 400 echoing the request's secrets back.
    Echo,
    /// A 5xx chosen at random (500, 502 or 503); the request is not performed.
    Random5xx(u16),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Decision {
    pub latency: Option<Duration>,
    pub fault: Option<Fault>,
}

impl Faults {
    /// Whether a secret creation is refused as one too many (see
    /// [`Faults::too_many_secrets`]).
    pub(crate) fn refuses_create(&self) -> bool {
        self.too_many_secrets && self.scope.contains(Endpoint::SecretsCreate)
    }

    /// Decides the fate of one request to `endpoint`, consuming a counter if
    /// one applies.
    pub(crate) fn decide(&mut self, endpoint: Endpoint, rng: &mut impl Rng) -> Decision {
        if !self.scope.contains(endpoint) {
            return Decision::default();
        }
        let latency = self.latency.map(|(a, b)| {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            rng.random_range(lo..=hi)
        });
        let retry_after = self.quota_retry_after;
        let fault = if take(&mut self.hang_next) {
            Some(Fault::Hang)
        } else if take(&mut self.fail_next) {
            Some(Fault::Fail)
        } else if take(&mut self.quota_next) {
            Some(Fault::Quota { retry_after })
        } else if take(&mut self.drop_next) {
            Some(Fault::Drop)
        } else if take(&mut self.garbage_next) {
            Some(Fault::Garbage)
        } else if take(&mut self.huge_next) {
            Some(Fault::Huge)
        } else if take(&mut self.echo_next) {
            Some(Fault::Echo)
        } else if chance(rng, self.random_5xx) {
            Some(Fault::Random5xx([500, 502, 503][rng.random_range(0..3)]))
        } else if chance(rng, self.random_drop) {
            Some(Fault::Drop)
        } else {
            None
        };
        Decision { latency, fault }
    }
}

fn take(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

/// `p` outside `[0, 1]` (or NaN) is clamped rather than panicking, so a
/// typo in a test's plan does not take the server task down.
fn chance(rng: &mut impl Rng, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(1)
    }

    #[test]
    fn counters_are_consumed_in_precedence_order() {
        let mut f = Faults {
            hang_next: 1,
            fail_next: 1,
            quota_next: 1,
            quota_retry_after: Some(30),
            drop_next: 1,
            garbage_next: 1,
            huge_next: 1,
            echo_next: 1,
            ..Faults::default()
        };
        let mut rng = rng();
        let seen: Vec<_> = (0..8)
            .map(|_| f.decide(Endpoint::MapplsToken, &mut rng).fault)
            .collect();
        assert_eq!(
            seen,
            vec![
                Some(Fault::Hang),
                Some(Fault::Fail),
                Some(Fault::Quota {
                    retry_after: Some(30)
                }),
                Some(Fault::Drop),
                Some(Fault::Garbage),
                Some(Fault::Huge),
                Some(Fault::Echo),
                None,
            ]
        );
        assert_eq!(
            f,
            Faults {
                quota_retry_after: Some(30),
                ..Faults::default()
            }
        );
    }

    #[test]
    fn out_of_scope_requests_consume_nothing() {
        let mut f = Faults {
            scope: FaultScope::Secrets,
            fail_next: 1,
            latency: Some((Duration::from_secs(1), Duration::from_secs(1))),
            ..Faults::default()
        };
        let mut rng = rng();
        assert_eq!(
            f.decide(Endpoint::MapsIndoorsToken, &mut rng),
            Decision::default()
        );
        assert_eq!(
            f.decide(Endpoint::SecretsDelete, &mut rng),
            Decision {
                latency: Some(Duration::from_secs(1)),
                fault: Some(Fault::Fail)
            }
        );
    }

    #[test]
    fn too_many_secrets_stands_and_follows_the_scope() {
        let mut f = Faults {
            too_many_secrets: true,
            ..Faults::default()
        };
        assert!(f.refuses_create());
        assert_eq!(f.decide(Endpoint::SecretsCreate, &mut rng()).fault, None);
        assert!(f.refuses_create(), "not consumed");
        f.scope = FaultScope::Token;
        assert!(!f.refuses_create());
    }

    #[test]
    fn health_is_never_faulted() {
        let mut f = Faults {
            fail_next: 1,
            random_5xx: 1.0,
            ..Faults::default()
        };
        assert_eq!(f.decide(Endpoint::Health, &mut rng()).fault, None);
        assert_eq!(f.fail_next, 1);
    }

    #[test]
    fn scopes_select_the_right_endpoints() {
        assert!(FaultScope::Token.contains(Endpoint::OAuth2Token));
        assert!(!FaultScope::Token.contains(Endpoint::OAuth2Introspect));
        assert!(!FaultScope::Token.contains(Endpoint::SecretsCreate));
        assert!(FaultScope::Secrets.contains(Endpoint::SecretsList));
        assert!(!FaultScope::Secrets.contains(Endpoint::MapsIndoorsToken));
        assert!(FaultScope::Only(Endpoint::SecretsDelete).contains(Endpoint::SecretsDelete));
        assert!(!FaultScope::Only(Endpoint::SecretsDelete).contains(Endpoint::SecretsCreate));
    }

    #[test]
    fn random_faults_follow_their_probability() {
        let mut rng = rng();
        let mut always = Faults {
            random_5xx: 1.0,
            ..Faults::default()
        };
        for _ in 0..20 {
            match always.decide(Endpoint::OAuth2Token, &mut rng).fault {
                Some(Fault::Random5xx(500 | 502 | 503)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut drops = Faults {
            random_drop: 1.0,
            ..Faults::default()
        };
        assert_eq!(
            drops.decide(Endpoint::SecretsCreate, &mut rng).fault,
            Some(Fault::Drop)
        );
        let mut never = Faults {
            random_5xx: f64::NAN,
            random_drop: -1.0,
            ..Faults::default()
        };
        assert_eq!(never.decide(Endpoint::OAuth2Token, &mut rng).fault, None);
    }

    #[test]
    fn latency_bounds_may_be_given_in_either_order() {
        let mut f = Faults {
            latency: Some((Duration::from_millis(20), Duration::from_millis(10))),
            ..Faults::default()
        };
        let mut rng = rng();
        for _ in 0..20 {
            let d = f.decide(Endpoint::SecretsList, &mut rng).latency.unwrap();
            assert!((Duration::from_millis(10)..=Duration::from_millis(20)).contains(&d));
        }
    }

    #[test]
    fn classify_maps_paths_and_methods() {
        use axum::http::Method;
        assert_eq!(
            Endpoint::classify(&Method::DELETE, "/api/clientcredentials"),
            Some(Endpoint::SecretsDelete)
        );
        assert_eq!(
            Endpoint::classify(&Method::PUT, "/api/clientcredentials"),
            None
        );
        assert_eq!(
            Endpoint::classify(&Method::POST, "/connect/token"),
            Some(Endpoint::MapsIndoorsToken)
        );
        assert_eq!(Endpoint::classify(&Method::GET, "/nope"), None);
    }
}
