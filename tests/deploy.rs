//! Deployment artefacts: the systemd unit, the container image, the
//! Kubernetes base, the Prometheus alerts and the Grafana dashboard.
//!
//! Each is checked against the daemon it deploys: its configuration parses
//! and names the paths the sandbox or the pod provides; the metric names and
//! labels the alerts and the dashboard select on are the ones a running
//! daemon exports. Where a tool exists, that tool checks it too:
//! `systemd-analyze` and `systemd-sysusers` (package systemd), `kubectl
//! kustomize` (kubectl, or Debian's kubernetes-client) and `promtool`
//! (prometheus). A test whose tool is missing says it was skipped and
//! passes, unless `REKEYD_REQUIRE_TOOLS=1` (which `.ci/run` sets after
//! installing them all) makes that a failure (tests/support/tools.rs).
//!
//! The Debian package (`.ci/package`) is checked when `REKEYD_TEST_DEB`
//! names the .deb: its files, and with `REKEYD_TEST_NSPAWN=1` (as root) it
//! is installed in a container booted by systemd-nspawn, where the unit is
//! started, reloaded and stopped. `.ci/run` sets both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;
use rekeyd::config::{Config, StoreConfig};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

#[path = "support/tools.rs"]
mod tools;

// ---------------------------------------------------------------------------
// What rekeyd exports on GET /metrics.

struct Metric {
    name: &'static str,
    labels: &'static [&'static str],
    /// The values of the `result` label, where it has one.
    results: &'static [&'static str],
    histogram: bool,
}

const fn metric(name: &'static str, labels: &'static [&'static str]) -> Metric {
    Metric {
        name,
        labels,
        results: &[],
        histogram: false,
    }
}

const METRICS: &[Metric] = &[
    metric("rekeyd_token_expiry_timestamp_seconds", &["credential"]),
    metric("rekeyd_token_valid", &["credential"]),
    Metric {
        results: &["success", "transient", "quota", "rejected", "refused"],
        ..metric("rekeyd_refresh_attempts_total", &["credential", "result"])
    },
    Metric {
        results: &["success", "aborted", "error", "refused"],
        ..metric(
            "rekeyd_rotation_attempts_total",
            &["credential", "result", "phase"],
        )
    },
    metric("rekeyd_rotation_needs_operator", &["credential"]),
    metric("rekeyd_last_rotation_timestamp_seconds", &["credential"]),
    metric(
        "rekeyd_rotation_next_due_timestamp_seconds",
        &["credential"],
    ),
    metric("rekeyd_locked_out", &["credential"]),
    Metric {
        histogram: true,
        ..metric(
            "rekeyd_provider_request_duration_seconds",
            &["operation", "status"],
        )
    },
    metric("rekeyd_sink_token_valid", &["credential", "path"]),
    metric("rekeyd_sink_current", &["credential", "path"]),
    metric("rekeyd_secret_created_timestamp_seconds", &["credential"]),
    metric("rekeyd_secret_max_age_seconds", &["credential"]),
    metric("rekeyd_secret_expiry_timestamp_seconds", &["credential"]),
    metric(
        "rekeyd_token_next_refresh_timestamp_seconds",
        &["credential"],
    ),
    metric("rekeyd_build_info", &["version", "features"]),
];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The metric family a series name belongs to, and whether it is a
/// histogram's `_bucket` series (which has the label `le`).
fn family(name: &str) -> Option<(&'static Metric, bool)> {
    for metric in METRICS {
        if name == metric.name {
            return Some((metric, false));
        }
        if metric.histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                if name.strip_suffix(suffix) == Some(metric.name) {
                    return Some((metric, suffix == "_bucket"));
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// A small PromQL scanner: every `rekeyd_*` series name outside string
// literals, with the label matchers in braces after it.

#[derive(Debug, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn read_string(chars: &[char], i: &mut usize) -> String {
    let quote = chars[*i];
    *i += 1;
    let mut out = String::new();
    while *i < chars.len() && chars[*i] != quote {
        if chars[*i] == '\\' && quote != '`' && *i + 1 < chars.len() {
            *i += 1;
        }
        out.push(chars[*i]);
        *i += 1;
    }
    *i += 1;
    out
}

fn skip_ws(chars: &[char], i: &mut usize) {
    while *i < chars.len() && chars[*i].is_whitespace() {
        *i += 1;
    }
}

fn parse_matchers(chars: &[char], i: &mut usize, expr: &str) -> Vec<Matcher> {
    assert_eq!(chars[*i], '{');
    *i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(chars, i);
        if *i >= chars.len() {
            panic!("unclosed braces in {expr:?}");
        }
        if chars[*i] == '}' {
            *i += 1;
            return out;
        }
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        let label: String = chars[start..*i].iter().collect();
        skip_ws(chars, i);
        let start = *i;
        while *i < chars.len() && matches!(chars[*i], '=' | '!' | '~') {
            *i += 1;
        }
        let op: String = chars[start..*i].iter().collect();
        skip_ws(chars, i);
        assert!(
            !label.is_empty() && ["=", "!=", "=~", "!~"].contains(&op.as_str()),
            "cannot parse matcher at {start} in {expr:?}"
        );
        assert!(
            *i < chars.len() && matches!(chars[*i], '"' | '\'' | '`'),
            "matcher {label}{op} without a string value in {expr:?}"
        );
        let value = read_string(chars, i);
        out.push(Matcher { label, op, value });
        skip_ws(chars, i);
        if *i < chars.len() && chars[*i] == ',' {
            *i += 1;
        }
    }
}

fn rekeyd_selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            read_string(&chars, &mut i);
        } else if c == '{' {
            // Matchers of a selector that is not ours (`up{...}`).
            parse_matchers(&chars, &mut i, expr);
        } else if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let mut j = i;
            skip_ws(&chars, &mut j);
            let matchers = if j < chars.len() && chars[j] == '{' {
                i = j;
                parse_matchers(&chars, &mut i, expr)
            } else {
                Vec::new()
            };
            if name.starts_with("rekeyd_") {
                out.push(Selector { name, matchers });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every problem with the rekeyd series `expr` selects: unknown names,
/// labels the metric does not have, `result` values it never takes.
fn metric_problems(expr: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for selector in rekeyd_selectors(expr) {
        let Some((metric, bucket)) = family(&selector.name) else {
            problems.push(format!("unknown metric {} in {expr:?}", selector.name));
            continue;
        };
        for m in &selector.matchers {
            let name = metric.name;
            let known = metric.labels.contains(&m.label.as_str())
                || TARGET_LABELS.contains(&m.label.as_str())
                || (bucket && m.label == "le");
            if !known {
                problems.push(format!("{name} has no label {:?} ({expr:?})", m.label));
                continue;
            }
            if m.label != "result" || m.value.contains('$') {
                continue;
            }
            let values: Vec<&str> = match m.op.as_str() {
                "=" | "!=" => vec![m.value.as_str()],
                _ if m.value.chars().all(|c| c.is_ascii_lowercase() || c == '|') => {
                    m.value.split('|').collect()
                }
                _ => continue,
            };
            for v in values {
                if !metric.results.contains(&v) {
                    problems.push(format!("{name} never has result={v:?} ({expr:?})"));
                }
            }
        }
    }
    problems
}

/// GET `path` from the API on a unix socket: (status, body).
fn get_unix(socket: &Path, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: rekeyd\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// The list above is what the daemon really exports: run against the
/// simulated MapsIndoors with a rotation every few seconds, every family
/// appears in GET /metrics (OpenMetrics names counters without `_total` in
/// `# TYPE`), and its samples carry the labels the alerts select on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exports_the_metrics_alerts_and_dashboard_use() {
    let sim = rekeyd::sim::SimProvider::start(rekeyd::sim::SimOptions::default())
        .await
        .unwrap();
    sim.add_client("c", "cust");
    let (id, value) = sim.add_secret("c", "bootstrap");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    rekeyd::fsutil::write_atomic(&d.join("secret"), value.as_bytes(), 0o600).unwrap();
    let socket = d.join("api.sock");
    let config = d.join("rekeyd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"
[api]
listen = "unix:{socket}"
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "c"
customer_id = "cust"
initial_secret_file = "{secret}"
initial_secret_id = "{id}"
[credentials.endpoints]
token_url = "{token_url}"
secrets_url = "{secrets_url}"
[credentials.rotation]
every = "2s"
grace = "1s"
max_secret_age = "1h"
[[credentials.sinks]]
path = "{sink}"
"#,
            sink = d.join("maps.token").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            secret = d.join("secret").display(),
            token_url = sim.mapsindoors_token_url(),
            secrets_url = sim.mapsindoors_secrets_url(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("REKEYD_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let families = |body: &str| -> BTreeSet<String> {
        body.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    };
    // A MapsIndoors secret has no provider-side expiry, so its family is
    // empty here (tests/provider_expiry.rs sees it for an Entra one).
    let wanted: BTreeSet<String> = METRICS
        .iter()
        .filter(|m| m.name != "rekeyd_secret_expiry_timestamp_seconds")
        .map(|m| m.name.strip_suffix("_total").unwrap_or(m.name).to_string())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = String::new();
    loop {
        let socket = socket.clone();
        let got = tokio::task::spawn_blocking(move || get_unix(&socket, "/metrics"))
            .await
            .unwrap();
        if let Some((200, body)) = got {
            let done = wanted.is_subset(&families(&body))
                && body.contains("rekeyd_last_rotation_timestamp_seconds{")
                && body.contains("rekeyd_sink_current{");
            last = body;
            if done {
                break;
            }
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    let exported = families(&last);
    // The build and the age policy, with their values.
    let build = last
        .lines()
        .find(|l| l.starts_with("rekeyd_build_info{"))
        .unwrap_or_else(|| panic!("no rekeyd_build_info in\n{last}"));
    assert!(
        build.contains(&format!("version=\"{}\"", rekeyd::build::VERSION))
            && build.contains(&format!("features=\"{}\"", rekeyd::build::features_text()))
            && build.ends_with(" 1"),
        "{build}"
    );
    assert!(
        last.lines()
            .any(|l| l.starts_with("rekeyd_secret_max_age_seconds{credential=\"maps\"} 3600")),
        "{last}"
    );
    let missing: Vec<_> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "GET /metrics lacks {missing:?}:\n{last}\ndaemon log:\n{stderr}"
    );
    let mut problems = Vec::new();
    for line in last.lines().filter(|l| l.starts_with("rekeyd_")) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        problems.extend(metric_problems(series));
    }
    assert!(problems.is_empty(), "{problems:#?}\n{last}");
    assert!(
        last.contains(r#"rekeyd_token_valid{credential="maps"} 1"#),
        "{last}"
    );
}

#[test]
fn the_promql_scanner_finds_what_it_should() {
    let found = rekeyd_selectors(
        r#"sum by (le) (rate(rekeyd_provider_request_duration_seconds_bucket{job="rekeyd", status=~"5.."}[5m])) and up{job="x"} and rekeyd_token_valid"#,
    );
    let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "rekeyd_provider_request_duration_seconds_bucket",
            "rekeyd_token_valid"
        ]
    );
    assert_eq!(found[0].matchers.len(), 2);
    assert!(rekeyd_selectors(r#"label_values(x{a="rekeyd_nope"}, b)"#).is_empty());

    assert!(metric_problems(r#"rekeyd_token_valid{credential="a"} == 0"#).is_empty());
    for (bad, why) in [
        ("rekeyd_token_validity == 0", "unknown metric"),
        ("rekeyd_locked_out_total", "unknown metric"),
        (r#"rekeyd_token_valid{result="x"}"#, "no label"),
        (
            r#"rekeyd_provider_request_duration_seconds_sum{le="1"}"#,
            "no label",
        ),
        (
            r#"rekeyd_rotation_attempts_total{result="failed"}"#,
            "never has result",
        ),
        (
            r#"rekeyd_refresh_attempts_total{result=~"success|timeout"}"#,
            "never has result",
        ),
    ] {
        let problems = metric_problems(bad);
        assert!(
            problems.iter().any(|p| p.contains(why)),
            "{bad}: {problems:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tools

/// The path of `name` on PATH; `None` (reported as a skip, or a failure
/// under REKEYD_REQUIRE_TOOLS=1) when the Debian `package` is not installed.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    tools::find(name, &format!("Debian package {package}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("SYSTEMD_PAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The `$CREDENTIALS_DIRECTORY` systemd gives rekeyd.service.
const UNIT_CREDENTIALS_DIRECTORY: &str = "/run/credentials/rekeyd.service";

/// Loads a rekeyd configuration given as text (the `config` crate wants a
/// .toml file name), in the environment systemd gives rekeyd.service.
fn load_config(toml: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rekeyd.toml");
    std::fs::write(&path, toml).unwrap();
    let env = [(
        "CREDENTIALS_DIRECTORY".to_string(),
        UNIT_CREDENTIALS_DIRECTORY.to_string(),
    )];
    Config::load_with_env(&path, env)
        .unwrap_or_else(|e| panic!("not a valid rekeyd configuration: {e}\n{toml}"))
}

// ---------------------------------------------------------------------------
// Prometheus alerts and the Grafana dashboard

fn yaml(rel: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn alert_rules() -> Vec<Yaml> {
    let doc = yaml("deploy/prometheus/alerts.yaml");
    let groups = doc["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

/// Every string under a key named `expr`, `query` or `definition`.
fn json_queries(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Json::String(s)) => out.push(s.clone()),
                    _ => json_queries(v, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| json_queries(v, out)),
        _ => {}
    }
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/rekeyd.json")).expect("dashboard JSON")
}

fn dashboard_queries() -> Vec<String> {
    let mut out = Vec::new();
    json_queries(&dashboard(), &mut out);
    out.retain(|q| q != "prometheus"); // the datasource variable's type
    out
}

#[test]
fn alerts_use_only_exported_metrics_and_cover_the_failures() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    let mut problems = Vec::new();
    for rule in &rules {
        let name = rule["alert"].as_str().expect("every rule is an alert");
        assert!(names.insert(name.to_string()), "duplicate alert {name}");
        let expr = rule["expr"].as_str().expect("expr");
        problems.extend(metric_problems(expr));
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: annotation {key}"
            );
        }
        if let Some(duration) = rule.get("for") {
            let duration = duration.as_str().expect("for: a duration");
            humantime::parse_duration(duration).unwrap_or_else(|e| panic!("{name}: for: {e}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // What each failure mode's alert must look at.
    let expr_of = |alert: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(alert))
            .and_then(|r| r["expr"].as_str())
            .unwrap_or_else(|| panic!("no alert {alert}; have {names:?}"))
            .to_string()
    };
    for (alert, needles) in [
        (
            "RekeydTokenExpiringRefreshFailing",
            &[
                "rekeyd_token_expiry_timestamp_seconds",
                "time()",
                "rekeyd_refresh_attempts_total",
            ][..],
        ),
        ("RekeydRefreshFailing", &["rekeyd_refresh_attempts_total"]),
        ("RekeydTokenInvalid", &["rekeyd_token_valid"]),
        (
            "RekeydRotationFailing",
            &["rekeyd_rotation_attempts_total", "\"error\""],
        ),
        (
            "RekeydRotationOverdue",
            &["time()", "rekeyd_rotation_next_due_timestamp_seconds", "+"],
        ),
        ("RekeydLockedOut", &["rekeyd_locked_out"]),
        ("RekeydTokenFileInvalid", &["rekeyd_sink_token_valid"]),
        (
            "RekeydRotationNeedsOperator",
            &["rekeyd_rotation_needs_operator"],
        ),
        (
            "RekeydSecretTooOld",
            &[
                "time()",
                "rekeyd_secret_created_timestamp_seconds",
                "rekeyd_secret_max_age_seconds",
            ],
        ),
        (
            "RekeydSecretExpiring",
            &[
                "time()",
                "rekeyd_secret_expiry_timestamp_seconds",
                "rekeyd_secret_created_timestamp_seconds",
            ],
        ),
        ("RekeydDown", &["up{"]),
        ("RekeydAbsent", &["absent("]),
    ] {
        let expr = expr_of(alert);
        for needle in needles {
            assert!(expr.contains(needle), "{alert}: {needle:?} not in {expr}");
        }
    }

    // The promtool unit tests feed the same series names.
    let tests = yaml("deploy/prometheus/alerts.test.yaml");
    for t in tests["tests"].as_sequence().unwrap() {
        for s in t["input_series"].as_sequence().unwrap() {
            let series = s["series"].as_str().unwrap();
            let problems = metric_problems(series);
            assert!(problems.is_empty(), "alerts.test.yaml: {problems:?}");
        }
    }
}

#[test]
fn dashboard_shows_every_metric_and_only_those() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "rekeyd");
    let queries = dashboard_queries();
    assert!(!queries.is_empty());
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for q in &queries {
        problems.extend(metric_problems(q));
        for s in rekeyd_selectors(q) {
            if let Some((metric, _)) = family(&s.name) {
                used.insert(metric.name);
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let all: BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
    let missing: Vec<_> = all.difference(&used).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");

    // Panels: unique ids, a title, Prometheus queries through the
    // dashboard's data source variable.
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(panel["gridPos"]["w"].as_u64().is_some());
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}");
        }
    }
    let variables: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "instance", "credential"]);
}

/// A dashboard query as plain PromQL: Grafana's variables replaced, the
/// selector of a `label_values(...)` query.
fn plain_promql(query: &str) -> String {
    let q = query.trim();
    let q = match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(inner) => inner.rsplit_once(',').map_or(inner, |(sel, _)| sel),
        None => q,
    };
    q.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1d")
        .replace("$instance", ".*")
        .replace("$credential", ".*")
}

#[test]
fn promtool_checks_the_alerts_and_the_dashboard_queries() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let dir = root().join("deploy/prometheus");
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "alerts.yaml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yaml"])
            .current_dir(&dir),
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // Every dashboard query parses as PromQL: as recording rules.
    let rules: Vec<Json> = dashboard_queries()
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": plain_promql(q)}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dashboard.rules.yaml");
    std::fs::write(&path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
    let out = run_ok(Command::new(&promtool).args(["check", "rules"]).arg(&path));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// CI runs the README's test command with every tool required: the skips
/// a fresh machine reports must be failures there, or a missing tool would
/// go unnoticed.
#[test]
fn ci_runs_the_readme_test_command_with_every_tool_required() {
    let readme = read("README.md");
    assert!(
        readme.contains("```sh\ncargo test --features failpoints\n```"),
        "README gives the test command"
    );
    let ci = read(".ci/run");
    let lines: Vec<&str> = ci.lines().map(str::trim).collect();
    let position = |wanted: &str| lines.iter().position(|l| *l == wanted);
    let require = position(&format!("export {}=1", tools::REQUIRE_VAR))
        .expect(".ci/run exports REKEYD_REQUIRE_TOOLS=1");
    let tests = position("cargo test --locked --features failpoints")
        .expect(".ci/run runs the README's test command");
    assert!(
        require < tests,
        "REKEYD_REQUIRE_TOOLS=1 is set before the tests run"
    );
    assert!(
        !lines[require..]
            .iter()
            .any(|l| l.contains(tools::REQUIRE_VAR) && *l != lines[require]),
        "nothing unsets it afterwards"
    );
}

// ---------------------------------------------------------------------------
// systemd

/// (section, key, value) of every assignment in a unit file.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not an assignment: {line}"));
        out.push((section.clone(), key.trim().into(), value.trim().into()));
    }
    out
}

fn service_values(entries: &[(String, String, String)], key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

#[test]
fn systemd_unit_says_what_the_daemon_needs() {
    let entries = unit_entries(&read("systemd/rekeyd.service"));
    let one = |key: &str| {
        let values = service_values(&entries, key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0].clone()
    };
    for (key, value) in [
        // systemd sends SIGHUP itself and waits for RELOADING=1/READY=1.
        ("Type", "notify-reload"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("StateDirectory", "rekeyd"),
        ("StateDirectoryMode", "0700"),
        ("RuntimeDirectory", "rekeyd"),
        ("ConfigurationDirectory", "rekeyd"),
        ("DynamicUser", "yes"),
        (
            "ExecStart",
            "/usr/bin/rekeyd run --config /etc/rekeyd/rekeyd.toml",
        ),
        // The same file, checked before the daemon starts.
        (
            "ExecStartPre",
            "/usr/bin/rekeyd check --quiet --config /etc/rekeyd/rekeyd.toml",
        ),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    // notify-reload signals the daemon itself; an ExecReload= would be run
    // instead of the signal.
    assert!(service_values(&entries, "ExecReload").is_empty());
    // The package installs the binary here (Cargo.toml assets).
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains(r#"["target/release/rekeyd", "usr/bin/", "755"]"#),
        "the package's binary is not /usr/bin/rekeyd"
    );
    assert!(
        one("RestartPreventExitStatus")
            .split_whitespace()
            .any(|s| s == "78"),
        "no restart after a configuration error"
    );
    assert!(
        service_values(&entries, "LoadCredential")
            .contains(&"maps.secret:/etc/rekeyd/maps.secret".to_string())
    );
    // Outbound HTTPS, the loopback/unix listener and sd_notify stay possible.
    let families: BTreeSet<String> = one("RestrictAddressFamilies")
        .split_whitespace()
        .map(String::from)
        .collect();
    let want: BTreeSet<String> = ["AF_INET", "AF_INET6", "AF_UNIX"].map(String::from).into();
    assert_eq!(families, want);
    assert!(service_values(&entries, "PrivateNetwork").is_empty());
    assert!(service_values(&entries, "IPAddressDeny").is_empty());
    assert!(service_values(&entries, "ReadOnlyPaths").is_empty());
}

#[test]
fn systemd_example_config_fits_the_unit() {
    let entries = unit_entries(&read("systemd/rekeyd.service"));
    let credentials: BTreeMap<String, String> = service_values(&entries, "LoadCredential")
        .iter()
        .map(|v| {
            let (id, path) = v.split_once(':').expect("LoadCredential=ID:PATH");
            (id.to_string(), path.to_string())
        })
        .collect();
    let state = service_values(&entries, "StateDirectory");
    let runtime = service_values(&entries, "RuntimeDirectory");

    let config = load_config(&read("systemd/rekeyd.toml.example"));
    // Below the StateDirectory: with DynamicUser=yes that is a symlink
    // (to /var/lib/private/rekeyd), which rekeyd refuses as its state_dir.
    let state_dir = Path::new("/var/lib").join(&state[0]);
    assert!(
        config.state_dir.starts_with(&state_dir) && config.state_dir != state_dir,
        "{}",
        config.state_dir.display()
    );
    let runtime_dir = Path::new("/run").join(&runtime[0]);
    let api = config.api.as_ref().expect("the example has an API");
    let listen = api.listen.to_string();
    assert!(
        listen.starts_with("127.0.0.1:")
            || listen.starts_with(&format!("unix:{}/", runtime_dir.display())),
        "{listen}"
    );
    assert!(api.key_file.starts_with(&config.state_dir));
    for cred in &config.credentials {
        // By credential name: no path of systemd's spelled out.
        let id = cred
            .initial_secret_credential
            .as_deref()
            .unwrap_or_else(|| panic!("{}: no initial_secret_credential", cred.name));
        assert_eq!(
            cred.initial_secret_file.as_deref(),
            Some(Path::new(UNIT_CREDENTIALS_DIRECTORY).join(id).as_path())
        );
        assert!(
            credentials.contains_key(id),
            "{} has no LoadCredential={id}:... (have {credentials:?})",
            cred.name
        );
        for sink in &cred.sinks {
            assert!(
                sink.file().unwrap().path.starts_with(&runtime_dir),
                "{}: the sandbox writes only {} and the state directory",
                sink.file().unwrap().path.display(),
                runtime_dir.display()
            );
        }
    }
}

#[test]
fn systemd_analyze_security_rates_the_unit_2_or_better() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let unit = root().join("systemd/rekeyd.service");
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for rekeyd.service:"))
        .unwrap_or_else(|| panic!("no overall score:\n{stdout}\n{}", text(&out.stderr)));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("{}", line.trim());
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{stdout}");
    // The tool's own verdict at the same threshold (in tenths).
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager", "--threshold=20"])
        .arg(&unit));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The major version of the systemd whose `systemd-analyze` this is.
fn systemd_version(analyze: &Path) -> u32 {
    let out = run_ok(Command::new(analyze).arg("--version"));
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version in {out:?}"))
}

/// The drop-in the Debian package's postinst writes where systemd is older
/// than 253 (between `<<'UNIT'` and `UNIT` in deploy/debian/postinst).
fn pre_253_dropin() -> String {
    let postinst = read("deploy/debian/postinst");
    let start = postinst
        .find("<<'UNIT'\n")
        .expect("postinst writes the drop-in")
        + 9;
    let len = postinst[start..]
        .find("\nUNIT\n")
        .expect("end of the drop-in");
    postinst[start..start + len].to_string()
}

/// `unit` with its `Type=notify-reload` replaced by the pre-253 drop-in's
/// settings: what systemd older than 253 runs once the package is
/// installed, without the (ignored) notify-reload line it warns about.
fn with_pre_253_fallback(unit: &str) -> String {
    assert!(unit.contains("Type=notify-reload\n"));
    unit.replace(
        "Type=notify-reload\n",
        &pre_253_dropin().replace("[Service]\n", ""),
    )
}

#[test]
fn pre_253_fallback_is_the_one_the_unit_documents() {
    let dropin = unit_entries(&pre_253_dropin());
    let unit = read("systemd/rekeyd.service");
    assert_eq!(
        service_values(&dropin, "Type"),
        ["notify"],
        "the fallback keeps the notify protocol"
    );
    let reload = service_values(&dropin, "ExecReload");
    assert_eq!(reload, ["/bin/kill -HUP $MAINPID"]);
    for line in ["Type=notify", &format!("ExecReload={}", reload[0])] {
        assert!(
            unit.lines()
                .any(|l| l.trim_start_matches(['#', ' ']) == line),
            "the unit's comment does not name {line}"
        );
    }
}

/// `systemd-analyze verify` on a copy of the unit whose rekeyd paths point
/// at the binary built for the tests (verify checks that they exist);
/// returns the complaints about the unit.
fn verify_unit(analyze: &Path, unit_text: &str, dropin: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("rekeyd.service");
    assert!(unit_text.contains("ExecStart=/usr/bin/rekeyd "));
    assert!(unit_text.contains("ExecStartPre=/usr/bin/rekeyd "));
    std::fs::write(
        &unit,
        unit_text.replace(
            "=/usr/bin/rekeyd ",
            &format!("={} ", env!("CARGO_BIN_EXE_rekeyd")),
        ),
    )
    .unwrap();
    if let Some(dropin) = dropin {
        let d = dir.path().join("rekeyd.service.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("10-systemd-before-253.conf"), dropin).unwrap();
    }
    let out = run(Command::new(analyze)
        .args(["verify", "--man=no", "--no-pager"])
        .arg(&unit));
    let stderr = text(&out.stderr);
    let complaints: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("rekeyd") || l.contains(&*dir.path().to_string_lossy()))
        .map(String::from)
        .collect();
    assert!(out.status.success(), "verify failed:\n{stderr}");
    complaints
}

#[test]
fn systemd_analyze_verify_is_clean() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let unit = read("systemd/rekeyd.service");
    let complaints = verify_unit(&analyze, &unit, None);
    if systemd_version(&analyze) >= 253 {
        assert!(complaints.is_empty(), "verify complains:\n{complaints:#?}");
    } else {
        // What an old systemd says about the unit as shipped, and nothing
        // else: the reason for the package's fallback drop-in.
        assert_eq!(complaints.len(), 1, "{complaints:#?}");
        assert!(complaints[0].contains("notify-reload"), "{complaints:#?}");
    }
    // The fallback is valid on any systemd. On an old one the main file's
    // Type= is still reported (and ignored) when the drop-in is read, as
    // on a machine with the package installed: verify the replacement.
    let complaints = verify_unit(&analyze, &with_pre_253_fallback(&unit), None);
    assert!(
        complaints.is_empty(),
        "verify complains about the fallback:\n{complaints:#?}"
    );
}

/// rekeyd.socket verifies cleanly next to the service, activates it, and
/// listens where the annotated configuration's socket-activation comment
/// says the API listens.
#[test]
fn systemd_socket_unit_verifies_and_matches_the_service() {
    let entries = unit_entries(&read("systemd/rekeyd.socket"));
    let socket = |key: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Socket" && k == key)
            .map(|(_, _, v)| v.clone())
            .collect()
    };
    let listen = socket("ListenStream");
    assert_eq!(listen.len(), 1, "{listen:?}");
    let path = Path::new(&listen[0]);
    assert!(path.is_absolute(), "{path:?}");
    // Not in the service's RuntimeDirectory, which is removed on stop.
    let service = unit_entries(&read("systemd/rekeyd.service"));
    for runtime in service_values(&service, "RuntimeDirectory") {
        assert!(
            !path.starts_with(Path::new("/run").join(runtime)),
            "{path:?}"
        );
    }
    for (key, value) in [
        ("Accept", "no"),
        ("SocketMode", "0660"),
        ("SocketGroup", "rekeyd"),
        ("FileDescriptorName", "api"),
    ] {
        assert_eq!(socket(key), [value], "{key}");
    }
    let listen_line = format!("listen = \"unix:{}\"", path.display());
    assert!(
        read("systemd/rekeyd.socket").contains(&listen_line),
        "the unit's comment shows the matching {listen_line}"
    );
    // The example configuration, listening there, is valid.
    let example = read("systemd/rekeyd.toml.example");
    let api_listen = example
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("the example's [api] listen line");
    let config = load_config(&example.replacen(api_listen, &listen_line, 1));
    assert_eq!(
        config.api.unwrap().listen.to_string(),
        format!("unix:{}", path.display())
    );

    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut service_text = read("systemd/rekeyd.service").replace(
        "=/usr/bin/rekeyd ",
        &format!("={} ", env!("CARGO_BIN_EXE_rekeyd")),
    );
    if systemd_version(&analyze) < 253 {
        // The service as the package sets it up there (its own complaint
        // is systemd_analyze_verify_is_clean's business).
        service_text = with_pre_253_fallback(&service_text);
    }
    std::fs::write(dir.path().join("rekeyd.service"), service_text).unwrap();
    let unit = dir.path().join("rekeyd.socket");
    std::fs::write(&unit, read("systemd/rekeyd.socket")).unwrap();
    let out = run(Command::new(&analyze)
        .args(["verify", "--man=no", "--no-pager"])
        .arg(&unit));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("rekeyd") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(complaints.is_empty(), "verify complains:\n{stderr}");
}

#[test]
fn sysusers_file_creates_the_rekeyd_user() {
    let Some(sysusers) = tool("systemd-sysusers", "systemd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    run_ok(
        Command::new(sysusers)
            .arg(format!("--root={}", dir.path().display()))
            .arg(root().join("systemd/rekeyd.sysusers")),
    );
    let passwd = std::fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(dir.path().join("etc/group")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("rekeyd:")), "{passwd}");
    assert!(group.lines().any(|l| l.starts_with("rekeyd:")), "{group}");
}

// ---------------------------------------------------------------------------
// The container image

/// Instructions of a Containerfile: (INSTRUCTION, arguments), continuation
/// lines joined, comments dropped.
fn containerfile(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn container_image_runs_rekeyd_unprivileged_from_scratch() {
    let file = containerfile(&read("deploy/Containerfile"));
    let last_from = file.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let final_stage = &file[last_from..];
    assert_eq!(final_stage[0].1, "scratch");
    let get = |op: &str| -> Vec<&str> {
        final_stage
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };

    let user = get("USER");
    assert_eq!(user.len(), 1);
    for id in user[0].split(':') {
        let id: u32 = id.parse().expect("numeric USER");
        assert_ne!(id, 0, "USER must not be root");
    }
    let entrypoint: Vec<String> = serde_json::from_str(get("ENTRYPOINT")[0]).unwrap();
    assert_eq!(
        entrypoint,
        ["/rekeyd", "run", "--config", "/etc/rekeyd/rekeyd.toml"]
    );
    let volumes: Vec<String> = serde_json::from_str(get("VOLUME")[0]).unwrap();
    assert_eq!(volumes, ["/var/lib/rekeyd", "/run/tokens"]);
    // The diagnostics listener; the token API stays on loopback.
    assert_eq!(get("EXPOSE"), ["9861"]);
    assert!(
        get("COPY").contains(&"deploy/container/rekeyd.toml /etc/rekeyd/rekeyd.toml"),
        "{:?}",
        get("COPY")
    );

    // The baked-in configuration uses what the image provides.
    let config = load_config(&read("deploy/container/rekeyd.toml"));
    assert!(config.state_dir.starts_with(&volumes[0]));
    let api = config.api.as_ref().expect("API for probes");
    assert!(api.key_file.starts_with(&config.state_dir));
    assert!(api.listen.to_string().ends_with(":9860"));
    for cred in &config.credentials {
        assert!(
            cred.initial_secret_file
                .as_ref()
                .unwrap()
                .starts_with("/etc/rekeyd/secrets")
        );
        assert!(
            cred.rotation.is_none() || config.store != StoreConfig::File,
            "rotation only with a store that outlives the pod's emptyDir"
        );
        for sink in &cred.sinks {
            assert!(
                sink.file().unwrap().path.starts_with(&volumes[1]),
                "{}",
                sink.file().unwrap().path.display()
            );
        }
    }

    // Whatever the build copies from the context is in the repository and
    // let through by the ignore file.
    let mut copied = Vec::new();
    let ignore = read("deploy/Containerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .collect();
    for (op, args) in &file {
        if op != "COPY" || args.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            assert!(
                root().join(src).exists(),
                "COPY {src}: not in the repository"
            );
            let src = src.trim_end_matches('/');
            assert!(
                allowed.iter().any(|a| a.trim_end_matches('/') == src),
                "COPY {src}: excluded by Containerfile.dockerignore"
            );
            copied.push(src.to_string());
        }
    }

    // ... and makes a valid, locked Cargo project: the build context as the
    // image's build stage sees it (minus node_modules), checked by cargo.
    let manifest = read("Cargo.toml");
    for (section, dir) in [
        ("[[test]]", "tests"),
        ("[[bench]]", "benches"),
        ("[[example]]", "examples"),
    ] {
        if manifest.lines().any(|l| l.trim() == section) {
            assert!(
                copied.contains(&dir.to_string()),
                "Cargo.toml has {section}: COPY {dir}"
            );
        }
    }
    if root().join("build.rs").exists() {
        assert!(copied.contains(&"build.rs".to_string()), "COPY build.rs");
    }
    let context = tempfile::tempdir().unwrap();
    for src in &copied {
        copy_tree(&root().join(src), &context.path().join(src));
    }
    let rustc = run_ok(Command::new("rustc").arg("-vV"));
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The image builds `rekeyd` with the default features: resolving what
    // that build needs (normal and build dependencies, default features,
    // this host) proves the lock file is current and every declared target
    // is in the context. Building the tests already needed all of those
    // packages, so cargo finds them in its cache; `cargo fetch` would want
    // every optional dependency too (etcd-client, without the feature),
    // which nothing here has downloaded. Not `--offline`: where the cache
    // lacks a package (another CARGO_HOME built the tests), cargo gets it
    // from the registry instead of failing.
    let out = run_ok(
        Command::new(cargo)
            .args([
                "tree",
                "--locked",
                "--edges",
                "normal,build",
                "--prefix",
                "none",
            ])
            .args(["--target", host])
            .arg("--manifest-path")
            .arg(context.path().join("Cargo.toml")),
    );
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.starts_with("rekeyd v")),
        "cargo tree shows the rekeyd package first:\n{out}"
    );
}

/// Copies a file or a directory tree, without node_modules (the ignore
/// file keeps them out of the build context).
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "node_modules" {
                copy_tree(&entry.path(), &to.join(entry.file_name()));
            }
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn kubernetes_config_is_the_container_config() {
    assert_eq!(
        read("deploy/kubernetes/rekeyd.toml"),
        read("deploy/container/rekeyd.toml"),
        "deploy/kubernetes/rekeyd.toml (the ConfigMap) and deploy/container/rekeyd.toml (the image's) differ"
    );
}

// ---------------------------------------------------------------------------
// Kubernetes

fn kustomize(dir: &Path) -> Option<Vec<Yaml>> {
    let kubectl = tool("kubectl", "kubernetes-client")?;
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(dir));
    let docs = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|d: &Yaml| !d.is_null())
        .collect();
    Some(docs)
}

fn find<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn one<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

/// The generated bootstrap Secret (the other one is the store's).
fn bootstrap_secret(docs: &[Yaml]) -> &Yaml {
    let found: Vec<_> = find(docs, "Secret")
        .into_iter()
        .filter(|s| name(s).starts_with("rekeyd-bootstrap"))
        .collect();
    assert_eq!(found.len(), 1, "exactly one bootstrap Secret");
    found[0]
}

fn strs(v: &Yaml) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

fn name(v: &Yaml) -> &str {
    v["metadata"]["name"].as_str().unwrap()
}

/// The container port a probe's `port` means.
fn probe_port(container: &Yaml, probe: &Yaml) -> u64 {
    container_port(container, &probe["httpGet"]["port"])
}

/// The container port `port` (a number or the name of one of the
/// container's ports) means.
fn container_port(container: &Yaml, port: &Yaml) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let wanted = port.as_str().expect("port");
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(wanted))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port named {wanted}"))
}

fn hardened(container: &Yaml, pod: &Yaml) {
    let name = container["name"].as_str().unwrap();
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{name}"
    );
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
    assert!(sc["capabilities"]["add"].is_null(), "{name}");
    let non_root = sc["runAsNonRoot"]
        .as_bool()
        .or(pod["securityContext"]["runAsNonRoot"].as_bool());
    assert_eq!(non_root, Some(true), "{name}");
    assert_ne!(sc["runAsUser"].as_u64(), Some(0), "{name}");
    let seccomp = sc["seccompProfile"]["type"]
        .as_str()
        .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"), "{name}");
    assert_eq!(
        container["terminationMessagePolicy"].as_str(),
        Some("FallbackToLogsOnError"),
        "{name}"
    );
}

/// (mountPath, volume) of a container's mounts.
fn mounts<'a>(container: &'a Yaml, pod: &'a Yaml) -> Vec<(&'a str, &'a Yaml, bool)> {
    container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            let volume = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("no volume {:?}", m["name"]));
            (
                m["mountPath"].as_str().unwrap(),
                volume,
                m["readOnly"].as_bool() == Some(true),
            )
        })
        .collect()
}

#[test]
fn kustomize_renders_rekeyd_as_a_hardened_native_sidecar() {
    let Some(docs) = kustomize(&root().join("deploy/kubernetes")) else {
        return;
    };
    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"].as_str(), Some(name(sa)));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));

    // rekeyd: a restartable init container, i.e. a native sidecar.
    let inits = pod["initContainers"].as_sequence().expect("initContainers");
    let rekeyd = inits
        .iter()
        .find(|c| c["name"] == "rekeyd")
        .expect("rekeyd init container");
    assert_eq!(rekeyd["restartPolicy"].as_str(), Some("Always"));
    assert!(
        rekeyd["command"].is_null() && rekeyd["args"].is_null(),
        "the image's entrypoint"
    );
    // Probes go to the diagnostics listener ([diag] in rekeyd.toml, checked
    // below), the one port the container declares.
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
    ] {
        let p = &rekeyd[probe];
        assert_eq!(p["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(probe_port(rekeyd, p), 9861, "{probe}");
    }
    let declared: Vec<u64> = rekeyd["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(declared, [9861], "only the diagnostics port is declared");
    hardened(rekeyd, pod);
    let containers = pod["containers"].as_sequence().unwrap();
    assert!(!containers.is_empty());
    for c in containers {
        hardened(c, pod);
    }

    // The configuration the sidecar reads, and the paths it names.
    let config_map = one(&docs, "ConfigMap");
    let toml = config_map["data"]["rekeyd.toml"].as_str().unwrap();
    assert_eq!(toml, read("deploy/kubernetes/rekeyd.toml"));
    let config = load_config(toml);
    let rekeyd_mounts = mounts(rekeyd, pod);
    let mount_of = |path: &Path| {
        rekeyd_mounts
            .iter()
            .filter(|(m, _, _)| path.starts_with(m))
            .max_by_key(|(m, _, _)| m.len())
            .copied()
            .unwrap_or_else(|| panic!("{} is on no volume of the sidecar", path.display()))
    };
    // The config file and the bootstrap secrets: items of the projected volume.
    let projected_file = |path: &Path| -> (String, String) {
        let (mount, volume, read_only) = mount_of(path);
        assert!(read_only);
        let rel = path.strip_prefix(mount).unwrap().to_str().unwrap();
        for source in volume["projected"]["sources"].as_sequence().unwrap() {
            for (kind, obj) in source.as_mapping().unwrap() {
                for item in obj["items"].as_sequence().unwrap() {
                    if item["path"].as_str() == Some(rel) {
                        let object = obj["name"].as_str().unwrap().to_string();
                        return (
                            kind.as_str().unwrap().to_string(),
                            format!("{object}/{}", item["key"].as_str().unwrap()),
                        );
                    }
                }
            }
        }
        panic!("{} is not provided by volume {volume:?}", path.display())
    };
    let (kind, key) = projected_file(Path::new("/etc/rekeyd/rekeyd.toml"));
    assert_eq!(
        (kind.as_str(), key),
        ("configMap", format!("{}/rekeyd.toml", name(config_map)))
    );
    let secret = bootstrap_secret(&docs);
    for cred in &config.credentials {
        let file = cred.initial_secret_file.as_ref().unwrap();
        let (kind, key) = projected_file(file);
        assert_eq!(kind, "secret");
        let (secret_name, secret_key) = key.split_once('/').unwrap();
        assert_eq!(secret_name, name(secret));
        assert!(
            secret["data"][secret_key].is_string(),
            "{secret_key} not in the Secret"
        );
        for sink in &cred.sinks {
            let (mount, volume, read_only) = mount_of(&sink.file().unwrap().path);
            assert!(!read_only);
            assert_eq!(mount, "/run/tokens");
            assert_eq!(volume["emptyDir"]["medium"].as_str(), Some("Memory"));
        }
    }
    // The base shows the product's point: its secret rotates, kept in the
    // shared store (checked below) so the rotated secret outlives the pod.
    for cred in &config.credentials {
        assert!(cred.rotation.is_some(), "{} rotates", cred.name);
    }
    let (_, state_volume, read_only) = mount_of(&config.state_dir);
    assert!(!read_only && state_volume["emptyDir"].is_mapping());
    // Tokens stay inside the pod: the token API on loopback, the pod
    // address for the diagnostics only.
    let api = config.api.as_ref().unwrap();
    assert_eq!(api.listen.to_string(), "127.0.0.1:9860");
    mount_of(&api.key_file);
    let diag = config.diag.as_ref().expect("a [diag] listener");
    assert_eq!(diag.listen.to_string(), "0.0.0.0:9861");

    // The NetworkPolicy selects this pod and admits the diagnostics port
    // alone (from wherever the probes and the scrape come).
    let policy = one(&docs, "NetworkPolicy");
    let spec = &policy["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = spec["podSelector"]["matchLabels"].as_mapping().unwrap();
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the policy selects the pod by {key:?}");
    }
    assert_eq!(strs(&spec["policyTypes"]), ["Ingress"]);
    let rules = spec["ingress"].as_sequence().expect("ingress rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let ports = rules[0]["ports"].as_sequence().expect("a port list");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["protocol"].as_str(), Some("TCP"));
    // By number: a named port of an init container (the native sidecar) is
    // not resolved in a NetworkPolicy by every network plugin.
    assert_eq!(ports[0]["port"].as_u64(), Some(9861), "{ports:?}");
    assert!(ports[0]["endPort"].is_null());

    // The PodMonitor scrapes that port.
    let podmonitor = yaml("deploy/prometheus/podmonitor.yaml");
    let endpoints = podmonitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .unwrap();
    for endpoint in endpoints {
        let port = &endpoint["port"];
        assert_eq!(
            container_port(rekeyd, port),
            9861,
            "PodMonitor port {port:?}"
        );
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    }
    for (key, value) in podmonitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            &labels[key], value,
            "the PodMonitor selects the pod by {key:?}"
        );
    }

    // The application reads the tokens from the same in-memory volume.
    let app_mounts = mounts(&containers[0], pod);
    assert!(
        app_mounts
            .iter()
            .any(|(m, v, ro)| *m == "/run/tokens" && v["emptyDir"]["medium"] == "Memory" && *ro),
        "the application mounts /run/tokens read-only"
    );
    // ... and the sink's group is the application's too.
    assert!(pod["securityContext"]["fsGroup"].as_u64().is_some());

    // The placeholder bootstrap secret is no real secret.
    for (_, value) in secret["data"].as_mapping().unwrap() {
        let decoded = base64_decode(value.as_str().unwrap());
        assert!(
            String::from_utf8_lossy(&decoded).contains("PLACEHOLDER"),
            "the base must not carry a real secret"
        );
    }

    // The shared store: the Secret and the Lease rekeyd.toml names exist
    // beforehand (rekeyd may not create them), empty.
    let StoreConfig::Kubernetes(store) = &config.store else {
        panic!("the sidecar uses the Kubernetes store")
    };
    assert!(store.namespace.is_none(), "the pod's own namespace");
    assert!(store.kubeconfig.is_none(), "in-cluster configuration");
    let state = find(&docs, "Secret")
        .into_iter()
        .find(|s| name(s) == store.secret)
        .expect("the state Secret");
    assert_eq!(state["type"].as_str(), Some("Opaque"));
    assert!(state["data"].is_null() && state["stringData"].is_null());
    let lease = one(&docs, "Lease");
    assert_eq!(name(lease), store.lease);
    assert_eq!(lease["apiVersion"].as_str(), Some("coordination.k8s.io/v1"));
    assert!(lease["spec"]["holderIdentity"].is_null());
    // Its API credentials reach the sidecar only, as an in-cluster client
    // expects them: token, CA and namespace.
    let (_, api_access, read_only) = mount_of(Path::new(
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
    ));
    assert!(read_only);
    let sources = api_access["projected"]["sources"].as_sequence().unwrap();
    let paths: BTreeSet<&str> = sources
        .iter()
        .flat_map(|s| {
            let (_, obj) = s.as_mapping().unwrap().iter().next().unwrap();
            match obj["path"].as_str() {
                Some(p) => vec![p],
                None => obj["items"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|i| i["path"].as_str().unwrap())
                    .collect(),
            }
        })
        .collect();
    assert_eq!(paths, BTreeSet::from(["token", "ca.crt", "namespace"]));
    assert!(
        sources
            .iter()
            .any(|s| s["serviceAccountToken"]["expirationSeconds"].as_u64() == Some(3600))
    );
    for c in containers {
        assert!(
            mounts(c, pod)
                .iter()
                .all(|(m, _, _)| !m.starts_with("/var/run/secrets")),
            "the application gets no Kubernetes credentials"
        );
    }

    // RBAC: get, update and patch on that one Secret, its history Secret
    // and that one Lease; nothing else, no create (which Kubernetes cannot
    // limit by name).
    let role = one(&docs, "Role");
    let mut named: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let resources = strs(&rule["resources"]);
        let verbs = strs(&rule["verbs"]);
        assert!(
            !resources.contains(&"*") && !verbs.contains(&"*"),
            "{rule:?}"
        );
        let names = strs(&rule["resourceNames"]);
        assert!(!names.is_empty(), "unnamed rule: {rule:?}");
        for r in resources {
            for n in &names {
                named
                    .entry(format!("{r}/{n}"))
                    .or_default()
                    .extend(verbs.iter().map(|v| v.to_string()));
            }
        }
    }
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(named.len(), 3, "{named:?}");
    let verbs = set(&["get", "update", "patch"]);
    assert_eq!(named[&format!("secrets/{}", store.secret)], verbs);
    assert_eq!(named[&format!("secrets/{}-history", store.secret)], verbs);
    assert_eq!(named[&format!("leases/{}", store.lease)], verbs);
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["roleRef"]["name"].as_str(), Some(name(role)));
    let subjects = binding["subjects"].as_sequence().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"].as_str(), Some(name(sa)));
}

/// Path of `to` relative to `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

#[test]
fn kustomize_overlay_sets_namespace_and_replaces_the_bootstrap_secret() {
    if tool("kubectl", "kubernetes-client").is_none() {
        return;
    }
    // The overlay the kustomization's comment describes. kustomize reads
    // bases by relative path.
    let tmp = tempfile::Builder::new()
        .prefix("overlay")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let overlay = tmp.path().canonicalize().unwrap();
    let base = relative(
        &overlay,
        &root().join("deploy/kubernetes").canonicalize().unwrap(),
    );
    let docs = ["resources", "bases"].iter().find_map(|key| {
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "{key}:\n  - {}\nnamespace: payments\nsecretGenerator:\n  - name: rekeyd-bootstrap\n    behavior: replace\n    literals:\n      - maps.secret=from-the-overlay\n",
                base.display()
            ),
        )
        .unwrap();
        // Old kustomize (kubectl < 1.21) takes directories only under `bases`.
        let kubectl = tool("kubectl", "kubernetes-client")?;
        let out = run(Command::new(kubectl).arg("kustomize").arg(&overlay));
        out.status.success().then(|| {
            serde_yaml_ng::Deserializer::from_str(&text(&out.stdout))
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .filter(|d: &Yaml| !d.is_null())
                .collect::<Vec<Yaml>>()
        })
    });
    let docs = docs.expect("the overlay renders");
    for doc in &docs {
        assert_eq!(
            doc["metadata"]["namespace"].as_str(),
            Some("payments"),
            "{doc:?}"
        );
    }
    let binding = one(&docs, "RoleBinding");
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some("payments")
    );
    let secret = bootstrap_secret(&docs);
    let value = base64_decode(secret["data"]["maps.secret"].as_str().unwrap());
    assert_eq!(value, b"from-the-overlay");
    let deployment = one(&docs, "Deployment");
    let rendered = serde_yaml_ng::to_string(deployment).unwrap();
    assert!(
        rendered.contains(&format!("name: {}", name(secret))),
        "the Deployment mounts the replaced Secret {}",
        name(secret)
    );
}

#[test]
fn secret_sink_component_adds_the_sink_its_secret_exact_rbac_and_a_consumer() {
    let Some(kubectl) = tool("kubectl", "kubernetes-client") else {
        return;
    };
    if !tools::kubectl_at_least(&kubectl, 21, "kustomize components") {
        return;
    }
    // Its configuration is the base's with the Secret sink appended.
    let base_toml = read("deploy/kubernetes/rekeyd.toml");
    let toml = read("deploy/kubernetes/secret-sink/rekeyd.toml");
    assert!(
        toml.starts_with(&base_toml),
        "deploy/kubernetes/secret-sink/rekeyd.toml must begin with the base's rekeyd.toml"
    );
    let config = load_config(&toml);
    let base = load_config(&base_toml);
    assert_eq!(config.store, base.store);
    let cred = &config.credentials[0];
    assert_eq!(
        cred.sinks[..cred.sinks.len() - 1],
        base.credentials[0].sinks[..]
    );
    let rekeyd::config::SinkTarget::KubernetesSecret(sink) = &cred.sinks.last().unwrap().target
    else {
        panic!("the last sink is a Kubernetes Secret")
    };
    assert_eq!(sink.namespace, None, "the pod's own namespace");
    assert_eq!(sink.kubeconfig, None, "in-cluster configuration");

    // An overlay with the base and the component, in a namespace.
    let tmp = tempfile::Builder::new()
        .prefix("overlay")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let overlay = tmp.path().canonicalize().unwrap();
    let dir = |rel: &str| relative(&overlay, &root().join(rel).canonicalize().unwrap());
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\ncomponents:\n  - {}\nnamespace: payments\n",
            dir("deploy/kubernetes").display(),
            dir("deploy/kubernetes/secret-sink").display()
        ),
    )
    .unwrap();
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(&overlay));
    let docs: Vec<Yaml> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Yaml| !d.is_null())
        .collect();

    // The sidecar reads the component's configuration.
    let config_map = one(&docs, "ConfigMap");
    assert_eq!(
        config_map["data"]["rekeyd.toml"].as_str(),
        Some(toml.as_str())
    );

    // The Secret exists beforehand, empty: rekeyd may not create it.
    let secret = find(&docs, "Secret")
        .into_iter()
        .find(|s| name(s) == sink.secret)
        .expect("the token Secret");
    assert_eq!(secret["type"].as_str(), Some("Opaque"));
    assert!(secret["data"].is_null() && secret["stringData"].is_null());
    assert_eq!(secret["metadata"]["namespace"].as_str(), Some("payments"));

    // RBAC: get, update and patch on that Secret alone, for rekeyd's
    // service account; the base's Role unchanged.
    let roles = find(&docs, "Role");
    assert_eq!(roles.len(), 2);
    let role = roles
        .iter()
        .find(|r| name(r) == "rekeyd-token-sink")
        .expect("the sink's Role");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(strs(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strs(&rules[0]["resources"]), ["secrets"]);
    assert_eq!(strs(&rules[0]["resourceNames"]), [sink.secret.as_str()]);
    assert_eq!(strs(&rules[0]["verbs"]), ["get", "update", "patch"]);
    let binding = find(&docs, "RoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"].as_str() == Some(name(role)))
        .expect("the sink's RoleBinding");
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some(name(sa)));
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some("payments")
    );

    // The example consumer: another pod, the Secret's key mounted
    // read-only, no API credentials, hardened.
    let consumer = find(&docs, "Deployment")
        .into_iter()
        .find(|d| name(d) == "token-consumer")
        .expect("the consumer");
    let pod = &consumer["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let container = &pod["containers"][0];
    hardened(container, pod);
    let mounted = mounts(container, pod);
    let (_, volume, read_only) = mounted
        .iter()
        .find(|(_, v, _)| v["secret"]["secretName"].as_str() == Some(sink.secret.as_str()))
        .expect("the token Secret is mounted");
    assert!(*read_only);
    assert_eq!(
        volume["secret"]["items"][0]["key"].as_str(),
        Some(sink.key.as_str())
    );
    assert_eq!(volume["secret"]["defaultMode"].as_u64(), Some(0o440));
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for b in s.bytes().filter(|b| *b != b'=' && !b.is_ascii_whitespace()) {
        let v = ALPHABET.iter().position(|a| *a == b).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The Debian package (.ci/package)

/// The package to check: `REKEYD_TEST_DEB=$(.ci/package)`. Not set: the
/// calling test was not asked to run (building the package takes a release
/// build).
fn built_deb() -> Option<PathBuf> {
    match std::env::var_os("REKEYD_TEST_DEB") {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "REKEYD_TEST_DEB={}: no such file",
                path.display()
            );
            Some(path)
        }
        _ => {
            tools::not_requested("set REKEYD_TEST_DEB=$(.ci/package) to check the Debian package");
            None
        }
    }
}

/// What the package must install (`dpkg-deb --contents`, without "./").
const PACKAGE_FILES: &[&str] = &[
    "usr/bin/rekeyd",
    "usr/lib/systemd/system/rekeyd.service",
    "usr/lib/systemd/system/rekeyd.socket",
    "usr/lib/sysusers.d/rekeyd.conf",
    "etc/rekeyd/rekeyd.toml",
    "usr/share/man/man1/rekeyd.1.gz",
    "usr/share/bash-completion/completions/rekeyd",
    "usr/share/zsh/vendor-completions/_rekeyd",
    "usr/share/fish/vendor_completions.d/rekeyd.fish",
    "usr/share/doc/rekeyd/README.md",
    "usr/share/doc/rekeyd/CHANGELOG.md",
    "usr/share/doc/rekeyd/SECURITY.md",
    "usr/share/doc/rekeyd/copyright",
];

#[test]
fn debian_package_holds_the_daemon_and_its_files_and_not_the_benchmark() {
    let Some(deb) = built_deb() else {
        return;
    };
    let Some(dpkg_deb) = tool("dpkg-deb", "dpkg") else {
        return;
    };
    let listing = run_ok(Command::new(&dpkg_deb).arg("--contents").arg(&deb));
    // "-rwxr-xr-x root/root 123 2026-01-01 00:00 ./usr/bin/rekeyd"
    let entries: BTreeMap<String, String> = listing
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let path = fields[5].trim_start_matches("./").trim_end_matches('/');
            (path.to_string(), fields[0].to_string())
        })
        .collect();
    for want in PACKAGE_FILES {
        assert!(
            entries.contains_key(*want),
            "the package lacks {want}:\n{listing}"
        );
    }
    assert_eq!(entries["usr/bin/rekeyd"], "-rwxr-xr-x", "{listing}");
    for (path, mode) in &entries {
        assert!(
            !path.contains("rekeyd-bench"),
            "the benchmark is packaged: {path}"
        );
        // Nothing writable but by root, nothing setuid.
        if !mode.starts_with('d') {
            assert!(
                mode == "-rw-r--r--" || mode == "-rwxr-xr-x",
                "{path}: mode {mode}"
            );
        }
    }
    // A page per subcommand, as rekeyd(1) refers to them.
    for sub in rekeyd::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
    {
        let page = format!("usr/share/man/man1/rekeyd-{sub}.1.gz");
        assert!(entries.contains_key(&page), "the package lacks {page}");
    }

    let field = |name: &str| run_ok(Command::new(&dpkg_deb).arg("--field").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "rekeyd");
    assert!(
        field("Version").starts_with(env!("CARGO_PKG_VERSION")),
        "{}",
        field("Version")
    );

    // The control files: the example configuration is the one conffile;
    // no maintainer script starts or enables the service.
    let control = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(&dpkg_deb)
            .arg("-e")
            .arg(&deb)
            .arg(control.path()),
    );
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/rekeyd/rekeyd.toml"]
    );
    for script in ["postinst", "prerm", "postrm"] {
        let packaged = std::fs::read_to_string(control.path().join(script))
            .unwrap_or_else(|e| panic!("no {script}: {e}"));
        assert_eq!(
            packaged,
            read(&format!("deploy/debian/{script}")),
            "{script}"
        );
        for line in packaged
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            for verb in [
                "systemctl start",
                "systemctl enable",
                "systemctl restart",
                "deb-systemd-invoke",
                "deb-systemd-helper",
            ] {
                assert!(!line.contains(verb), "{script}: {line}");
            }
        }
    }

    // The files are the repository's, and the packaged binary's own
    // completions and version.
    let root_dir = tempfile::tempdir().unwrap();
    let r = root_dir.path();
    run_ok(Command::new(&dpkg_deb).arg("-x").arg(&deb).arg(r));
    for (packaged, source) in [
        (
            "usr/lib/systemd/system/rekeyd.service",
            "systemd/rekeyd.service",
        ),
        ("usr/lib/sysusers.d/rekeyd.conf", "systemd/rekeyd.sysusers"),
        ("etc/rekeyd/rekeyd.toml", "systemd/rekeyd.toml.example"),
        ("usr/share/doc/rekeyd/README.md", "README.md"),
    ] {
        assert_eq!(
            std::fs::read_to_string(r.join(packaged)).unwrap(),
            read(source),
            "{packaged} is not {source}"
        );
    }
    let copyright = std::fs::read_to_string(r.join("usr/share/doc/rekeyd/copyright")).unwrap();
    assert!(copyright.contains("Apache"), "{copyright}");
    let bin = r.join("usr/bin/rekeyd");
    let version = run_ok(Command::new(&bin).arg("--version"));
    // A release build: no test features.
    assert_eq!(
        version.trim(),
        format!("rekeyd {} (features: none)", env!("CARGO_PKG_VERSION"))
    );
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/rekeyd"),
        ("zsh", "usr/share/zsh/vendor-completions/_rekeyd"),
        ("fish", "usr/share/fish/vendor_completions.d/rekeyd.fish"),
    ] {
        assert_eq!(
            std::fs::read_to_string(r.join(path)).unwrap(),
            run_ok(Command::new(&bin).args(["completions", shell])),
            "{path}"
        );
    }
}

// ---------------------------------------------------------------------------
// The package for real: systemd boots in a container, the package is
// installed there, and the unit is started, reloaded and stopped.

/// A writable view of the host's root filesystem for a container: an
/// overlay whose upper layer is a tmpfs, so the container may install
/// packages and the host sees none of it. (systemd-nspawn refuses
/// `--volatile=overlay` on the host's own root; `--volatile=yes` keeps
/// /usr read-only, where the package installs.) Unmounted on drop.
struct RootOverlay {
    base: tempfile::TempDir,
}

impl RootOverlay {
    fn new() -> RootOverlay {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(b));
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(b.join(d)).unwrap();
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir=/,upperdir={},workdir={}",
                    b.join("upper").display(),
                    b.join("work").display()
                ))
                .arg(b.join("merged")),
        );
        RootOverlay { base }
    }

    fn root(&self) -> PathBuf {
        self.base.path().join("merged")
    }
}

impl Drop for RootOverlay {
    fn drop(&mut self) {
        let b = self.base.path();
        let _ = Command::new("umount").arg(b.join("merged")).status();
        let _ = Command::new("umount").arg(b).status();
    }
}

/// Opt-in (root, systemd-nspawn from systemd-container):
/// `REKEYD_TEST_NSPAWN=1 REKEYD_TEST_DEB=$(.ci/package) cargo test --test
/// deploy nspawn`; `.ci/run` runs it.
///
/// systemd-nspawn boots a writable overlay of the host's root with a
/// private network and a loopback token endpoint. Inside, the test installs
/// the package with `dpkg -i` (its postinst runs against the booted
/// systemd) and checks that the installation neither started nor enabled
/// rekeyd, writes a configuration with the example's paths and the
/// bootstrap secret, then: `systemctl start` returns once rekeyd reported
/// READY=1 (the service is active and serves a token, wrote its token file
/// and its state), the watchdog keeps being fed (no restart across several
/// WatchdogSec periods, the ping timestamp advancing), `systemctl reload`
/// keeps the same process and is answered by the daemon, a broken
/// configuration is refused by reload (the daemon stays) and by
/// ExecStartPre= on a start, and `systemctl stop` ends it cleanly.
#[test]
fn nspawn_boots_the_unit_and_rekeyd_serves_tokens() {
    if std::env::var("REKEYD_TEST_NSPAWN").as_deref() != Ok("1") {
        tools::not_requested(
            "set REKEYD_TEST_NSPAWN=1 and REKEYD_TEST_DEB=$(.ci/package) to boot the package in systemd-nspawn",
        );
        return;
    }
    let Some(deb) = built_deb() else {
        return;
    };
    let Some(nspawn) = tool("systemd-nspawn", "systemd-container") else {
        return;
    };
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    // The container runs the host's systemd.
    let notify_reload = systemd_version(&analyze) >= 253;
    let example = load_config(&read("systemd/rekeyd.toml.example"));
    let api = example.api.as_ref().unwrap();
    let cred = &example.credentials[0];
    // The bootstrap secret by systemd credential name, as the example has it.
    let secret_name = cred.initial_secret_credential.as_deref().unwrap();
    let sink = &cred.sinks[0].file().unwrap().path;
    let listen = api.listen.to_string();
    let curl = match listen.strip_prefix("unix:") {
        Some(sock) => format!("curl -s --unix-socket {sock} http://rekeyd"),
        None => format!("curl -s http://{listen}"),
    };

    let overlay = RootOverlay::new();
    let root = overlay.root();
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    };
    let config = format!(
        r#"state_dir = "{state}"
[api]
listen = "{listen}"
key_file = "{key}"
[[credentials]]
name = "{name}"
provider = "oauth2"
client_id = "c"
initial_secret_credential = "{secret_name}"
[credentials.endpoints]
token_url = "http://127.0.0.1:18080/token"
[[credentials.sinks]]
path = "{sink}"
mode = "0640"
"#,
        state = example.state_dir.display(),
        key = api.key_file.display(),
        name = cred.name,
        sink = sink.display(),
    );
    write("opt/ns/rekeyd.toml", &config);
    // Valid TOML, invalid configuration: an unknown key.
    write(
        "opt/ns/broken.toml",
        &config.replace("[api]\n", "[api]\nlisten_address = \"x\"\n"),
    );
    std::fs::copy(&deb, root.join("opt/ns/rekeyd.deb")).unwrap();
    write(
        "opt/ns/tokensrv.py",
        r#"import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "t0k3n", "token_type": "Bearer", "expires_in": 20}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", 18080), H).serve_forever()
"#,
    );
    // Each step prints key=value lines. systemctl start, reload and stop
    // return when systemd saw the state change (READY=1, the reload's
    // READY=1, the exit), so only the watchdog check waits, for time to
    // pass.
    write(
        "opt/ns/check.sh",
        &format!(
            r#"#!/bin/bash
exec > /opt/out/result.txt 2>&1
show() {{ echo "$1=$(systemctl show -p "$1" --value rekeyd.service)"; }}
prop() {{ systemctl show -p "$1" --value rekeyd.service; }}
echo "preinstalled=$(dpkg-query -W -f='${{Status}}' rekeyd 2>/dev/null)"
dpkg -i /opt/ns/rekeyd.deb > /opt/out/dpkg.txt 2>&1; echo "dpkg=$?"
echo "installed=$(dpkg-query -W -f='${{Status}}' rekeyd)"
echo "user=$(getent passwd rekeyd | cut -d: -f1)"
echo "after_install=$(prop ActiveState)"
echo "enabled=$(systemctl is-enabled rekeyd.service)"
show Type
echo "dropin=$(ls /etc/systemd/system/rekeyd.service.d/ 2>/dev/null | tr '\n' ' ')"
# Configured as README "Install" says.
install -m 0644 /opt/ns/rekeyd.toml /etc/rekeyd/rekeyd.toml
(umask 077; echo test-secret > /etc/rekeyd/{secret_name})
# The watchdog for real, at a period the test can wait through several times.
mkdir -p /etc/systemd/system/rekeyd.service.d
printf '[Service]\nWatchdogSec=3s\n' > /etc/systemd/system/rekeyd.service.d/50-test.conf
systemctl daemon-reload
systemctl start rekeyd.service; echo "start=$?"
echo "started=$(prop ActiveState)"; show StatusText; show MainPID
echo "readyz=$({curl}/readyz -o /dev/null -w '%{{http_code}}')"
echo "sink=$(stat -c %a {sink})"
echo "state=$(ls /var/lib/private/rekeyd/*/credentials/{name}.json 2>/dev/null | wc -l)"
pid=$(prop MainPID); ping1=$(prop WatchdogTimestampMonotonic)
# Three watchdog periods: a daemon that stopped pinging would be killed.
sleep 10
echo "watchdog_usec=$(prop WatchdogUSec)"
echo "watchdog_advanced=$([ "$(prop WatchdogTimestampMonotonic)" != "$ping1" ] && echo yes)"
echo "restarts=$(prop NRestarts)"
echo "pid_after_watchdog=$(prop MainPID)"
systemctl reload rekeyd.service; echo "reload=$?"
echo "after_reload=$(prop ActiveState)"
echo "pid_after_reload=$(prop MainPID)"
echo "reloaded=$(journalctl -u rekeyd.service --no-pager -o cat | grep -c 'configuration reloaded')"
install -m 0644 /opt/ns/broken.toml /etc/rekeyd/rekeyd.toml
systemctl reload rekeyd.service; echo "reload_broken=$?"
echo "after_reload_broken=$(prop ActiveState)"
echo "pid_after_reload_broken=$(prop MainPID)"
echo "rejected=$(journalctl -u rekeyd.service --no-pager -o cat | grep -c 'new configuration rejected')"
systemctl stop rekeyd.service; echo "stop=$?"
echo "stopped=$(prop ActiveState)"; show Result; show ExecMainStatus
systemctl start rekeyd.service; echo "start_broken=$?"
echo "broken_result=$(prop Result)"
echo "start_broken_main_pid=$(prop ExecMainPID)"
echo "check_refused=$(journalctl -u rekeyd.service --no-pager -o cat | grep -c 'configuration error: .*listen_address')"
echo "== dpkg"; cat /opt/out/dpkg.txt
echo "== journal"; journalctl -u rekeyd.service --no-pager | tail -60
echo "== end"
systemctl poweroff
"#,
            curl = curl,
            sink = sink.display(),
            name = cred.name,
        ),
    );
    run_ok(
        Command::new("chmod")
            .arg("0755")
            .arg(root.join("opt/ns/check.sh")),
    );
    let unit_dir = "etc/systemd/system";
    write(
        &format!("{unit_dir}/tokensrv.service"),
        "[Service]\nExecStart=/usr/bin/python3 /opt/ns/tokensrv.py\n",
    );
    write(
        &format!("{unit_dir}/check.service"),
        "[Unit]\nAfter=tokensrv.service\n[Service]\nType=oneshot\nExecStart=/opt/ns/check.sh\n",
    );
    write(
        &format!("{unit_dir}/ns-test.target"),
        "[Unit]\nRequires=tokensrv.service check.service\nAfter=tokensrv.service check.service\n",
    );
    // network-online.target would wait two minutes for a link that the
    // private network never configures: masked.
    std::os::unix::fs::symlink(
        "/dev/null",
        root.join(format!("{unit_dir}/systemd-networkd-wait-online.service")),
    )
    .ok();
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("timeout")
        .arg("300")
        .arg(nspawn)
        .arg("-q")
        .arg("-D")
        .arg(&root)
        .args(["--private-network", "--register=no", "--keep-unit"])
        .arg(format!("--machine=rekeyd-test-{}", std::process::id()))
        .arg(format!("--bind={}:/opt/out", out_dir.path().display()))
        .args([
            "-b",
            "--",
            "systemd.unit=ns-test.target",
            "systemd.firstboot=off",
        ]));
    let result = std::fs::read_to_string(out_dir.path().join("result.txt")).unwrap_or_else(|_| {
        panic!(
            "the container wrote no result ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    eprintln!("{result}");
    let values: BTreeMap<&str, &str> = result
        .lines()
        .take_while(|l| !l.starts_with("== "))
        .filter_map(|l| l.split_once('='))
        .collect();
    let v = |key: &str| {
        *values
            .get(key)
            .unwrap_or_else(|| panic!("no {key}: {result}"))
    };
    assert_eq!(
        v("preinstalled"),
        "",
        "the host has rekeyd installed; the test installs it in the container: {result}"
    );
    // The installation: the user exists, nothing runs yet.
    assert_eq!(v("dpkg"), "0", "{result}");
    assert_eq!(v("installed"), "install ok installed", "{result}");
    assert_eq!(v("user"), "rekeyd", "{result}");
    assert_eq!(v("after_install"), "inactive", "{result}");
    assert_eq!(v("enabled"), "disabled", "{result}");
    if notify_reload {
        assert_eq!(v("Type"), "notify-reload", "{result}");
        assert!(!v("dropin").contains("before-253"), "{result}");
    } else {
        assert_eq!(v("Type"), "notify", "{result}");
        assert!(
            v("dropin").contains("10-systemd-before-253.conf"),
            "{result}"
        );
    }
    // systemctl start returned after READY=1.
    assert_eq!(v("start"), "0", "{result}");
    assert_eq!(v("started"), "active", "{result}");
    assert!(!v("StatusText").is_empty(), "no STATUS=: {result}");
    assert_eq!(v("readyz"), "200", "{result}");
    assert_eq!(v("sink"), "640", "{result}");
    assert_eq!(v("state"), "1", "{result}");
    // The watchdog.
    assert_eq!(v("watchdog_usec"), "3s", "{result}");
    assert_eq!(v("watchdog_advanced"), "yes", "{result}");
    assert_eq!(v("restarts"), "0", "{result}");
    assert_eq!(v("pid_after_watchdog"), v("MainPID"), "{result}");
    // Reload: the same process, answered by the daemon.
    assert_eq!(v("reload"), "0", "{result}");
    assert_eq!(v("after_reload"), "active", "{result}");
    assert_eq!(v("pid_after_reload"), v("MainPID"), "{result}");
    assert_eq!(v("reloaded"), "1", "{result}");
    // A broken configuration: reload keeps the daemon and its configuration.
    assert_eq!(v("reload_broken"), "0", "{result}");
    assert_eq!(v("after_reload_broken"), "active", "{result}");
    assert_eq!(v("pid_after_reload_broken"), v("MainPID"), "{result}");
    assert_eq!(v("rejected"), "1", "{result}");
    // Stop.
    assert_eq!(v("stop"), "0", "{result}");
    assert_eq!(v("stopped"), "inactive", "{result}");
    assert_eq!(v("Result"), "success", "{result}");
    assert_eq!(v("ExecMainStatus"), "0", "{result}");
    // ... and a start with the broken configuration fails in ExecStartPre=,
    // before the daemon ran.
    assert_ne!(v("start_broken"), "0", "{result}");
    assert_eq!(v("broken_result"), "exit-code", "{result}");
    assert_eq!(v("start_broken_main_pid"), "0", "{result}");
    assert!(v("check_refused") != "0", "{result}");
}

#[test]
fn workload_identity_component_projects_the_entra_token_for_rekeyd_alone() {
    let Some(kubectl) = tool("kubectl", "kubernetes-client") else {
        return;
    };
    if !tools::kubectl_at_least(&kubectl, 21, "kustomize components") {
        return;
    }
    // Its configuration: an Entra client that logs in with the projected
    // token as its assertion, nothing stored, nothing rotated.
    let toml = read("deploy/kubernetes/workload-identity/rekeyd.toml");
    let config = load_config(&toml);
    let base = load_config(&read("deploy/kubernetes/rekeyd.toml"));
    assert_eq!(config.store, base.store);
    let cred = &config.credentials[0];
    assert_eq!(
        cred.auth_method,
        rekeyd::config::AuthMethod::ClientAssertionFile
    );
    assert!(cred.rotation.is_none() && cred.initial_secret_file.is_none());
    assert!(
        cred.endpoints
            .token_url
            .as_str()
            .starts_with("https://login.microsoftonline.com/")
            && cred
                .endpoints
                .token_url
                .as_str()
                .ends_with("/oauth2/v2.0/token")
    );
    let token_file = cred.assertion.as_ref().unwrap().file.clone().unwrap();

    let tmp = tempfile::Builder::new()
        .prefix("overlay")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let overlay = tmp.path().canonicalize().unwrap();
    let dir = |rel: &str| relative(&overlay, &root().join(rel).canonicalize().unwrap());
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\ncomponents:\n  - {}\nnamespace: payments\n",
            dir("deploy/kubernetes").display(),
            dir("deploy/kubernetes/workload-identity").display()
        ),
    )
    .unwrap();
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(&overlay));
    let docs: Vec<Yaml> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|d: &Yaml| !d.is_null())
        .collect();
    assert_eq!(
        one(&docs, "ConfigMap")["data"]["rekeyd.toml"].as_str(),
        Some(toml.as_str())
    );
    // No bootstrap secret, and nothing refers to one.
    assert!(
        find(&docs, "Secret")
            .iter()
            .all(|s| !name(s).starts_with("rekeyd-bootstrap")),
        "{out}"
    );
    assert!(!out.contains("rekeyd-bootstrap"), "{out}");

    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let rekeyd_container = &pod["initContainers"][0];
    assert_eq!(rekeyd_container["name"].as_str(), Some("rekeyd"));
    hardened(rekeyd_container, pod);
    // The token file rekeyd.toml names is the projected token, with the
    // audience Entra's token exchange expects, read-only, for rekeyd only.
    let mounted = mounts(rekeyd_container, pod);
    let (mount_path, volume, read_only) = mounted
        .iter()
        .find(|(_, v, _)| v["name"].as_str() == Some("azure-identity-token"))
        .expect("the Entra token is mounted into rekeyd");
    assert!(*read_only);
    let source = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        source["audience"].as_str(),
        Some("api://AzureADTokenExchange")
    );
    assert_eq!(
        Path::new(mount_path).join(source["path"].as_str().unwrap()),
        token_file
    );
    for container in pod["containers"].as_sequence().unwrap() {
        assert!(
            mounts(container, pod)
                .iter()
                .all(|(_, v, _)| v["name"].as_str() != Some("azure-identity-token")),
            "only rekeyd gets the token"
        );
    }
    // The configuration volume still holds rekeyd.toml.
    let config_volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("rekeyd-config"))
        .unwrap();
    let sources = config_volume["projected"]["sources"].as_sequence().unwrap();
    assert_eq!(sources.len(), 1);
    assert!(
        sources[0]["configMap"]["name"]
            .as_str()
            .unwrap()
            .starts_with("rekeyd-config")
    );
}
