//! Prometheus/OpenMetrics metrics, served at `GET /metrics`.
//!
//! One process-wide registry, like the default registry of most Prometheus
//! clients: the HTTP layer records request latency without every provider
//! having to carry a handle. Labels carry credential names, operations and
//! outcomes, never a secret or token.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabel {
    pub credential: String,
}

/// `rekeyd_build_info`: the version and compiled cargo features
/// ([`crate::build`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    /// Comma-separated, alphabetical; `none` for a default build.
    pub features: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub credential: String,
    /// success | transient | quota | rejected | refused
    pub result: &'static str,
}

/// A forced refresh (`POST /v1/token/{name}/refresh`) by what it answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForcedLabels {
    pub credential: String,
    /// refreshed | served_current | rate_limited | failed | pending
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub credential: String,
    /// success | aborted | error | refused (a permanent refusal: needs an
    /// operator)
    pub result: &'static str,
    /// The journal phase the attempt ended in.
    pub phase: &'static str,
}

/// A token file: its credential and its path (a path names a file, never
/// holds a secret).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub credential: String,
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    /// HTTP status, or "error" when no response arrived.
    pub status: String,
}

/// Every `outcome` of [`ForcedLabels`].
const FORCED_OUTCOMES: [&str; 5] = [
    "refreshed",
    "served_current",
    "rate_limited",
    "failed",
    "pending",
];

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub token_expiry: Family<CredentialLabel, FloatGauge>,
    pub token_valid: Family<CredentialLabel, Gauge>,
    pub refresh_attempts: Family<RefreshLabels, Counter>,
    pub forced_refreshes: Family<ForcedLabels, Counter>,
    pub rotation_attempts: Family<RotationLabels, Counter>,
    pub last_rotation: Family<CredentialLabel, FloatGauge>,
    pub rotation_next_due: Family<CredentialLabel, FloatGauge>,
    /// When the credential's current secret was created (or installed).
    pub secret_created: Family<CredentialLabel, FloatGauge>,
    /// When the token engine logs in next (success or retry).
    pub token_next_refresh: Family<CredentialLabel, FloatGauge>,
    /// `max_secret_age` in seconds, for credentials that set it.
    pub secret_max_age: Family<CredentialLabel, FloatGauge>,
    /// When the provider expires the current secret (Entra `endDateTime`),
    /// for credentials whose secret has a known provider-side expiry.
    pub secret_expiry: Family<CredentialLabel, FloatGauge>,
    pub build_info: Family<BuildLabels, Gauge>,
    pub locked_out: Family<CredentialLabel, Gauge>,
    pub rotation_needs_operator: Family<CredentialLabel, Gauge>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub sink_token_valid: Family<SinkLabels, Gauge>,
    pub sink_current: Family<SinkLabels, Gauge>,
    /// Token file series are rebuilt at each scrape; one scrape at a time.
    sink_scrape: Mutex<()>,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("rekeyd"),
            token_expiry: Family::default(),
            token_valid: Family::default(),
            refresh_attempts: Family::default(),
            forced_refreshes: Family::default(),
            rotation_attempts: Family::default(),
            last_rotation: Family::default(),
            rotation_next_due: Family::default(),
            secret_created: Family::default(),
            token_next_refresh: Family::default(),
            secret_max_age: Family::default(),
            secret_expiry: Family::default(),
            build_info: Family::default(),
            locked_out: Family::default(),
            rotation_needs_operator: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            sink_token_valid: Family::default(),
            sink_current: Family::default(),
            sink_scrape: Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "token_expiry_timestamp_seconds",
            "Unix time at which the served token expires",
            m.token_expiry.clone(),
        );
        r.register(
            "token_valid",
            "1 while a valid token is being served",
            m.token_valid.clone(),
        );
        r.register(
            "refresh_attempts",
            "Token refresh attempts by result",
            m.refresh_attempts.clone(),
        );
        r.register(
            "forced_refreshes",
            "Refreshes applications asked for (POST /v1/token/{name}/refresh) by outcome",
            m.forced_refreshes.clone(),
        );
        r.register(
            "rotation_attempts",
            "Secret rotation attempts by result and the phase they ended in",
            m.rotation_attempts.clone(),
        );
        r.register(
            "last_rotation_timestamp_seconds",
            "Unix time of the last completed rotation",
            m.last_rotation.clone(),
        );
        r.register(
            "rotation_next_due_timestamp_seconds",
            "Unix time at which the next scheduled rotation is due",
            m.rotation_next_due.clone(),
        );
        r.register(
            "secret_created_timestamp_seconds",
            "Unix time at which the credential's current secret was created (or installed by rekeyd or an operator)",
            m.secret_created.clone(),
        );
        r.register(
            "token_next_refresh_timestamp_seconds",
            "Unix time of the token engine's next scheduled login (a refresh, or a retry after a failure)",
            m.token_next_refresh.clone(),
        );
        r.register(
            "secret_max_age_seconds",
            "The credential's max_secret_age: a rotation is forced once the current secret is older",
            m.secret_max_age.clone(),
        );
        r.register(
            "secret_expiry_timestamp_seconds",
            "Unix time at which the provider expires the credential's current secret (Entra endDateTime); absent when it does not expire or is not known",
            m.secret_expiry.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: crate::build::VERSION,
                features: crate::build::features_text(),
            })
            .set(1);
        r.register(
            "build_info",
            "Always 1; the labels name this binary's version and compiled cargo features",
            m.build_info.clone(),
        );
        r.register(
            "locked_out",
            "1 while the provider rejects every secret rekeyd holds",
            m.locked_out.clone(),
        );
        r.register(
            "rotation_needs_operator",
            "1 while the provider refuses the credential's rotation in a way only an operator can fix (its last attempt ended so)",
            m.rotation_needs_operator.clone(),
        );
        r.register(
            "provider_request_duration_seconds",
            "Provider request latency by operation and HTTP status",
            m.request_duration.clone(),
        );
        r.register(
            "sink_token_valid",
            "1 while the token file holds a token that has not expired",
            m.sink_token_valid.clone(),
        );
        r.register(
            "sink_current",
            "1 while the token file holds the token being served (0: an older or expired one, or none)",
            m.sink_current.clone(),
        );
        m
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// [`Metrics::encode`], with the token file series set from `sinks`:
    /// (credential, path, holds a valid token, holds the token being
    /// served) for every file now. They are rebuilt from scratch, so a file
    /// or credential that a reload removed leaves no series behind.
    pub fn encode_with_sinks(
        &self,
        sinks: impl IntoIterator<Item = (String, String, bool, bool)>,
    ) -> String {
        let _one_scrape = self.sink_scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.sink_token_valid.clear();
        self.sink_current.clear();
        for (credential, path, valid, current) in sinks {
            let labels = SinkLabels { credential, path };
            self.sink_token_valid
                .get_or_create(&labels)
                .set(i64::from(valid));
            self.sink_current
                .get_or_create(&labels)
                .set(i64::from(current));
        }
        self.encode()
    }

    /// Drops every series of a credential that is no longer configured
    /// (removed by a reload), so its last values do not linger, go stale
    /// and alert. `Family` cannot be filtered, so the label values are
    /// listed: keep them in step with `RefreshLabels` and `RotationLabels`.
    pub fn forget_credential(&self, name: &str) {
        let label = credential(name);
        for family in [
            &self.token_expiry,
            &self.last_rotation,
            &self.rotation_next_due,
            &self.secret_created,
            &self.token_next_refresh,
            &self.secret_max_age,
            &self.secret_expiry,
        ] {
            family.remove(&label);
        }
        self.token_valid.remove(&label);
        self.locked_out.remove(&label);
        self.rotation_needs_operator.remove(&label);
        for result in ["success", "transient", "quota", "rejected", "refused"] {
            self.refresh_attempts.remove(&RefreshLabels {
                credential: name.to_string(),
                result,
            });
        }
        for outcome in FORCED_OUTCOMES {
            self.forced_refreshes.remove(&ForcedLabels {
                credential: name.to_string(),
                outcome,
            });
        }
        for result in ["success", "aborted", "error", "refused"] {
            // The journal phases, and what the driver reports when it
            // cannot read the journal.
            for phase in [
                "idle", "creating", "created", "promoted", "retiring", "unknown",
            ] {
                self.rotation_attempts.remove(&RotationLabels {
                    credential: name.to_string(),
                    result,
                    phase,
                });
            }
        }
    }

    pub fn observe_request(&self, operation: &'static str, status: Option<u16>, took: Duration) {
        let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.request_duration
            .get_or_create(&RequestLabels { operation, status })
            .observe(took.as_secs_f64());
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

pub fn credential(name: &str) -> CredentialLabel {
    CredentialLabel {
        credential: name.to_string(),
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_the_metrics() {
        let m = Metrics::new();
        m.refresh_attempts
            .get_or_create(&RefreshLabels {
                credential: "maps".into(),
                result: "success",
            })
            .inc();
        m.observe_request("mapsindoors login", Some(200), Duration::from_millis(12));
        let text = m.encode();
        assert!(
            text.contains(
                "rekeyd_refresh_attempts_total{credential=\"maps\",result=\"success\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("rekeyd_provider_request_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_forgotten_credential_leaves_no_series() {
        let m = Metrics::new();
        for name in ["gone", "kept"] {
            let label = credential(name);
            m.token_expiry.get_or_create(&label).set(1.0);
            m.token_valid.get_or_create(&label).set(1);
            m.locked_out.get_or_create(&label).set(0);
            m.rotation_needs_operator.get_or_create(&label).set(1);
            m.last_rotation.get_or_create(&label).set(1.0);
            m.rotation_next_due.get_or_create(&label).set(2.0);
            m.refresh_attempts
                .get_or_create(&RefreshLabels {
                    credential: name.into(),
                    result: "quota",
                })
                .inc();
            m.rotation_attempts
                .get_or_create(&RotationLabels {
                    credential: name.into(),
                    result: "error",
                    phase: "created",
                })
                .inc();
            m.rotation_attempts
                .get_or_create(&RotationLabels {
                    credential: name.into(),
                    result: "refused",
                    phase: "creating",
                })
                .inc();
            for outcome in FORCED_OUTCOMES {
                m.forced_refreshes
                    .get_or_create(&ForcedLabels {
                        credential: name.into(),
                        outcome,
                    })
                    .inc();
            }
        }
        m.forget_credential("gone");
        let text = m.encode();
        assert!(!text.contains("\"gone\""), "{text}");
        assert_eq!(
            text.matches("credential=\"kept\"").count(),
            9 + FORCED_OUTCOMES.len(),
            "{text}"
        );
    }
}
