//! The sink formats and the Kubernetes Secret sink, end to end: an
//! in-process daemon against the simulated provider writes token files in
//! every format (exact bytes), `rekeyd token NAME --format FORMAT` prints
//! the same bytes, kubectl takes `--format exec-credential` as its exec
//! credential plugin against a fake API server, and a Secret sink creates
//! and updates one key of a Secret on the in-process fake Kubernetes API
//! server (other keys kept, 409 retried, 403 shown in the sink's status).

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/kube_fake.rs"]
mod kube_fake;
#[path = "support/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::Method;
use daemon::{EVENT_TIMEOUT, TestDaemon, wait_token, write_secret};
use kube_fake::{FailRule, Kind, KubeFake, Stall};
use rekeyd::credential::{CredentialHandle, SinkFreshness, SinkReport, SinkState};
use rekeyd::sim::{SimOptions, SimProvider};
use rekeyd::token::Token;
use secrecy::ExposeSecret;
use tokio::time::Instant;

const CLIENT: &str = "client-maps";
const NS: &str = "apps";
const BIN: &str = env!("CARGO_BIN_EXE_rekeyd");

async fn sim() -> SimProvider {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.add_client(CLIENT, "cust");
    sim
}

/// A configuration for credential "maps" at `sim` with the API on a unix
/// socket in `{dir}` (which the CLI reaches too) and `sinks`.
fn config(sim: &SimProvider, dir: &Path, sinks: &str) -> String {
    let (_, secret) = sim.add_secret(CLIENT, "bootstrap");
    write_secret(dir, "maps.secret", &secret);
    format!(
        r#"state_dir = "{{dir}}/state"
[api]
listen = "unix:{{dir}}/api.sock"
key_file = "{{dir}}/api.key"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "{CLIENT}"
initial_secret_file = "{{dir}}/maps.secret"
[credentials.endpoints]
token_url = "{token}"
secrets_url = "{secrets}"
{sinks}"#,
        token = sim.mapsindoors_token_url(),
        secrets = sim.mapsindoors_secrets_url(),
    )
}

/// Starts the daemon on `text` and writes the same configuration to
/// `config_file`, for the CLI.
async fn start(dir: tempfile::TempDir, text: &str, config_file: &Path) -> TestDaemon {
    std::fs::write(
        config_file,
        text.replace("{dir}", &dir.path().display().to_string()),
    )
    .unwrap();
    TestDaemon::start_in(dir, text).await
}

fn value(t: &Token) -> String {
    t.access_token.expose_secret().to_string()
}

fn rfc3339(t: &Token) -> String {
    humantime::format_rfc3339_seconds(t.expires_at_wall()).to_string()
}

/// Waits until every sink holds a token and no write is failing.
async fn wait_written(handle: &CredentialHandle, accept: impl Fn(&[SinkState]) -> bool) {
    tokio::time::timeout(EVENT_TIMEOUT, handle.sinks.wait_for(accept))
        .await
        .unwrap_or_else(|_| panic!("sinks not written: {:?}", handle.sink_reports()));
}

/// Polls sink `i`'s report until `accept` holds.
async fn wait_report(
    handle: &CredentialHandle,
    i: usize,
    what: &str,
    accept: impl Fn(&SinkReport) -> bool,
) -> SinkReport {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let report = handle.sink_reports().remove(i);
        if accept(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cli(args: &[&str], config_file: &Path) -> std::process::Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .arg("--config")
        .arg(config_file)
        .env_remove("REKEYD_CONFIG");
    tokio::time::timeout(EVENT_TIMEOUT, command.output())
        .await
        .expect("rekeyd token answers in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_files_and_the_cli_have_each_formats_exact_bytes() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path();
    let template = o.join("app.conf.tmpl");
    std::fs::write(
        &template,
        "[auth]\ntoken = {{ token | tojson }}\ntype = {{ token_type }}\nexpires = {{ expires_at }}\n",
    )
    .unwrap();
    let file = |name: &str, extra: &str| {
        format!(
            "[[credentials.sinks]]\npath = \"{}\"\n{extra}\n",
            o.join(name).display()
        )
    };
    let sinks = [
        file("t.raw", "format = \"raw\""),
        file("t.json", "format = \"json\""),
        file("t.header", "format = \"header\""),
        file("t.env", "format = \"env\""),
        file("app.env", "format = \"env\"\nvariable = \"APP_TOKEN\""),
        file("kube.json", "format = \"exec-credential\""),
        file(
            "app.conf",
            &format!(
                "format = \"template\"\ntemplate = \"{}\"\nmode = \"0640\"",
                template.display()
            ),
        ),
    ]
    .concat();
    let text = config(&sim, dir.path(), &sinks);
    let config_file = o.join("rekeyd.toml");
    let d = start(dir, &text, &config_file).await;
    let handle = d.handle("maps");
    let token = wait_token(&handle, |_| true).await;
    wait_written(&handle, |s| {
        s.iter()
            .all(|s| s.token.as_ref().is_some_and(|t| value(t) == value(&token)))
    })
    .await;
    let (t, ty, exp) = (value(&token), token.token_type.clone(), rfc3339(&token));
    let expected = [
        ("t.raw", t.clone()),
        (
            "t.json",
            format!(
                "{{\"access_token\":\"{t}\",\"expires_at\":\"{exp}\",\"token_type\":\"{ty}\"}}\n"
            ),
        ),
        ("t.header", format!("Authorization: Bearer {t}\n")),
        ("t.env", format!("REKEYD_MAPS_TOKEN={t}\n")),
        ("app.env", format!("APP_TOKEN={t}\n")),
        (
            "kube.json",
            format!(
                "{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{t}\",\"expirationTimestamp\":\"{exp}\"}}}}\n"
            ),
        ),
        (
            "app.conf",
            format!("[auth]\ntoken = \"{t}\"\ntype = {ty}\nexpires = {exp}\n"),
        ),
    ];
    for (name, bytes) in &expected {
        assert_eq!(
            std::fs::read_to_string(o.join(name)).unwrap(),
            *bytes,
            "{name}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |name: &str| {
        std::fs::metadata(o.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("app.conf"), 0o640);
    assert_eq!(mode("t.env"), 0o600, "the owner-only default");

    // The CLI prints what the sink of that format writes (raw with a
    // newline, for terminals), from the daemon's API.
    for (format, file) in [
        ("raw", "t.raw"),
        ("json", "t.json"),
        ("header", "t.header"),
        ("env", "t.env"),
        ("exec-credential", "kube.json"),
    ] {
        let output = cli(&["token", "maps", "--format", format], &config_file).await;
        assert!(output.status.success(), "{format}: {output:?}");
        let mut want = std::fs::read(o.join(file)).unwrap();
        if format == "raw" {
            want.push(b'\n');
        }
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(want).unwrap(),
            "{format}"
        );
    }
    let template_arg = template.display().to_string();
    let output = cli(
        &[
            "token",
            "maps",
            "--format",
            "template",
            "--template",
            &template_arg,
        ],
        &config_file,
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, std::fs::read(o.join("app.conf")).unwrap());
    // Without --format: the bare token and a newline, as before.
    let output = cli(&["token", "maps"], &config_file).await;
    assert_eq!(String::from_utf8(output.stdout).unwrap(), format!("{t}\n"));
    // A template that does not check out is a usage error (exit 2), before
    // the daemon is asked.
    let bad = o.join("bad.tmpl");
    std::fs::write(&bad, "{{ tokn }}").unwrap();
    let bad_arg = bad.display().to_string();
    let output = cli(&["token", "maps", "--template", &bad_arg], &config_file).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("undefined"));
    let output = cli(&["token", "maps", "--format", "template"], &config_file).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--template FILE"));

    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_takes_the_exec_credential_as_its_plugin() {
    let Some(kubectl) = tools::find("kubectl", "apt-get install kubectl") else {
        return;
    };
    if !tools::kubectl_at_least(&kubectl, 22, "client.authentication.k8s.io/v1 exec plugins") {
        return;
    }
    let sim = sim().await;
    let fake = KubeFake::start().await;
    fake.set_secret_entry(NS, "probe", "k", b"v");
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), "");
    let config_file = out.path().join("rekeyd.toml");
    let d = start(dir, &text, &config_file).await;
    let token = value(&*wait_token(&d.handle("maps"), |_| true).await);

    // A kubeconfig whose user is `rekeyd token maps --format
    // exec-credential` (client-go's v1 exec plugin protocol), for the fake
    // behind TLS: client-go runs exec plugins for TLS connections only.
    let (server, ca) = tls_front(&fake).await;
    let kubeconfig = out.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n- name: rekeyd\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      \
             command: {BIN}\n      args: [token, maps, --format, exec-credential, --config, {config}]\n      \
             interactiveMode: Never\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: rekeyd\n    namespace: {NS}\n\
             current-context: fake\n",
            config = config_file.display(),
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(kubectl);
    command
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{NS}/secrets/probe"),
        ])
        // kubectl caches discovery and, with an expiry, nothing else; keep
        // its cache out of $HOME.
        .env("HOME", out.path())
        .env_remove("KUBECONFIG");
    let output = tokio::time::timeout(EVENT_TIMEOUT, command.output())
        .await
        .expect("kubectl answers in time")
        .unwrap();
    assert!(output.status.success(), "kubectl failed: {output:?}");
    let secret: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(secret["metadata"]["name"], "probe");
    // The API server saw the token rekeyd serves, as a bearer token.
    assert_eq!(fake.bearers(), [token]);
    d.stop().await;
}

/// An HTTPS front for `fake`: a self-signed certificate for 127.0.0.1, each
/// connection relayed to the fake as it is. Returns the front's URL and the
/// certificate (base64 PEM, as a kubeconfig's `certificate-authority-data`).
async fn tls_front(fake: &KubeFake) -> (String, String) {
    use base64::Engine as _;
    use std::sync::Arc;
    let backend: std::net::SocketAddr = fake.url().trim_start_matches("http://").parse().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    let ca = base64::engine::general_purpose::STANDARD.encode(certified.cert.pem());
    (format!("https://{addr}"), ca)
}

fn secret_sink(fake: &KubeFake, dir: &Path, extra: &str) -> String {
    let kubeconfig: PathBuf = fake.kubeconfig(dir, NS, "rekeyd-sa");
    format!(
        "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app-token\"\nkubeconfig = \"{}\"\n{extra}\n",
        kubeconfig.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_sink_creates_then_updates_its_key_and_keeps_the_others() {
    let sim = sim().await;
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let sinks = [
        secret_sink(&fake, out.path(), ""),
        // A second key of the same Secret, in another format.
        secret_sink(&fake, out.path(), "key = \"token.env\"\nformat = \"env\""),
    ]
    .concat();
    let text = config(&sim, dir.path(), &sinks);
    let d = start(dir, &text, &out.path().join("rekeyd.toml")).await;
    let handle = d.handle("maps");
    let first = wait_token(&handle, |_| true).await;
    wait_written(&handle, |s| s.iter().all(|s| s.token.is_some())).await;

    let data = fake
        .secret_data(NS, "app-token")
        .expect("the Secret exists");
    assert_eq!(data["token"], value(&first).as_bytes());
    assert_eq!(
        data["token.env"],
        format!("REKEYD_MAPS_TOKEN={}\n", value(&first)).as_bytes()
    );
    let object = fake.object(Kind::Secret, NS, "app-token").unwrap();
    let annotations = &object["metadata"]["annotations"];
    assert_eq!(annotations["rekeyd/token.expires-at"], rfc3339(&first));
    assert_eq!(annotations["rekeyd/token.env.expires-at"], rfc3339(&first));
    assert_eq!(
        object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rekeyd"
    );
    assert_eq!(object["type"], "Opaque");
    // Created once; the second sink found it and added its key.
    assert_eq!(fake.count(Method::POST, Kind::Secret), 1);
    let reports = handle.sink_reports();
    // The namespace is the kubeconfig context's, not in the configuration.
    assert_eq!(reports[0].path, "kubernetes-secret:app-token[token]");
    assert!(
        reports
            .iter()
            .all(|r| r.freshness == SinkFreshness::Current)
    );

    // Someone else's key, and writers racing ours, each adding a key of
    // its own: each lost replace is read again and merged, nothing of
    // theirs is lost.
    fake.set_secret_entry(NS, "app-token", "ca.crt", b"not ours");
    fake.inject_conflicts_adding_keys(3, "racer-");
    let puts = fake.count(Method::PUT, Kind::Secret);
    handle.refresh_now.notify_one();
    let second = wait_token(&handle, |t| value(t) != value(&first)).await;
    wait_written(&handle, |s| {
        s.iter()
            .all(|s| s.token.as_ref().is_some_and(|t| value(t) == value(&second)))
    })
    .await;
    assert_eq!(fake.conflicts_left(), 0);
    assert_eq!(fake.count(Method::PUT, Kind::Secret) - puts, 2 + 3);
    let data = fake.secret_data(NS, "app-token").unwrap();
    assert_eq!(data["token"], value(&second).as_bytes());
    assert_eq!(data["ca.crt"], b"not ours");
    for racer in ["racer-1", "racer-2", "racer-3"] {
        assert_eq!(data[racer], b"x", "{racer}, written during a conflict");
    }
    assert_eq!(
        data["token.env"],
        format!("REKEYD_MAPS_TOKEN={}\n", value(&second)).as_bytes()
    );
    let object = fake.object(Kind::Secret, NS, "app-token").unwrap();
    assert_eq!(
        object["metadata"]["annotations"]["rekeyd/token.expires-at"],
        rfc3339(&second)
    );
    assert!(handle.sink_reports().iter().all(|r| r.last_error.is_none()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_secret_shows_status_and_reason_and_is_retried() {
    let sim = sim().await;
    let fake = KubeFake::start().await;
    // RBAC allows nothing on Secrets yet.
    fake.fail(FailRule {
        method: None,
        kind: Some(Kind::Secret),
        code: 403,
        remaining: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let text = config(&sim, dir.path(), &secret_sink(&fake, out.path(), ""));
    let d = start(dir, &text, &out.path().join("rekeyd.toml")).await;
    let handle = d.handle("maps");
    let token = value(&*wait_token(&handle, |_| true).await);
    let report = wait_report(&handle, 0, "a refused write", |r| {
        r.consecutive_failures >= 2
    })
    .await;
    let error = report.last_error.clone().unwrap();
    assert!(
        error.starts_with(&format!(
            "kubernetes Secret {NS}/app-token[token]: 403 Forbidden: "
        )),
        "{error}"
    );
    assert!(
        error.contains("secrets \"app-token\" is forbidden"),
        "{error}"
    );
    assert!(!error.contains(&token), "{error}");
    assert_eq!(report.freshness, SinkFreshness::Missing);
    assert!(!handle.ready(), "a sink without a token is not ready");

    // Allowed to read and update, not to create: the Secret must exist
    // beforehand, and the error says so.
    fake.clear_failures();
    fake.fail(FailRule {
        method: Some(Method::POST),
        kind: Some(Kind::Secret),
        code: 403,
        remaining: None,
    });
    let report = wait_report(&handle, 0, "a refused create", |r| {
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("create it beforehand"))
    })
    .await;
    assert!(report.last_error.unwrap().contains("403 Forbidden"));

    // A refusal that quotes the Secret it was sent (its data base64, as
    // the API server's JSON has it) does not bring the token into status.
    fake.clear_failures();
    fake.fail(FailRule {
        method: Some(Method::POST),
        kind: Some(Kind::Secret),
        code: 422,
        remaining: None,
    });
    let report = wait_report(&handle, 0, "a refusal quoting the Secret", |r| {
        r.last_error.as_deref().is_some_and(|e| e.contains("422"))
    })
    .await;
    let error = report.last_error.unwrap();
    assert!(error.contains("is invalid"), "{error}");
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&token);
    assert!(
        !error.contains(&token) && !error.contains(&encoded),
        "{error}"
    );

    // Once the Secret exists, the next retry lands without a new token.
    fake.clear_failures();
    fake.fail(FailRule {
        method: Some(Method::POST),
        kind: Some(Kind::Secret),
        code: 403,
        remaining: None,
    });
    fake.set_secret_entry(NS, "app-token", "other", b"x");
    let report = wait_report(&handle, 0, "the token written", |r| {
        r.freshness == SinkFreshness::Current
    })
    .await;
    assert_eq!(report.consecutive_failures, 0);
    assert!(report.last_error.is_none());
    let data = fake.secret_data(NS, "app-token").unwrap();
    assert_eq!(data["token"], token.as_bytes());
    assert_eq!(data["other"], b"x");
    assert!(handle.ready());
    d.stop().await;
}

/// A hung API server holds up the Secret sink only: the token file of the
/// same credential gets each new token while the Secret write still waits
/// for an answer (its request timeout is 10 s), and the Secret follows once
/// the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_server_does_not_hold_up_the_token_files() {
    let sim = sim().await;
    let fake = KubeFake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("maps.token");
    let sinks = format!(
        "{}[[credentials.sinks]]\npath = \"{}\"\n",
        secret_sink(&fake, out.path(), ""),
        file.display()
    );
    let text = config(&sim, dir.path(), &sinks);
    let d = start(dir, &text, &out.path().join("rekeyd.toml")).await;
    let handle = d.handle("maps");
    let first = wait_token(&handle, |_| true).await;
    wait_written(&handle, |s| {
        s.iter()
            .all(|s| s.token.as_ref().is_some_and(|t| value(t) == value(&first)))
    })
    .await;

    fake.stall(Stall {
        method: None,
        kind: Some(Kind::Secret),
    });
    let asked = std::time::SystemTime::now();
    handle.refresh_now.notify_one();
    let second = wait_token(&handle, |t| value(t) != value(&first)).await;
    wait_written(&handle, |s| {
        s[1].token
            .as_ref()
            .is_some_and(|t| value(t) == value(&second))
    })
    .await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), value(&second));
    // Written while the Secret write was still waiting: a writer that
    // waited for it would write the file only once the stalled request
    // timed out, REQUEST_TIMEOUT after the login at the earliest. (Judged
    // on the write's own time stamp, not on when this test looks: a
    // loaded machine may run the test late, never the daemon early.)
    let written = handle.sink_reports()[1]
        .last_written_at
        .expect("the file was written");
    let took = written.duration_since(asked).unwrap_or_default();
    assert!(
        took < rekeyd::serve::secret_sink::REQUEST_TIMEOUT,
        "the token file waited {took:?} for the stalled Secret write"
    );
    assert_eq!(
        fake.secret_data(NS, "app-token").unwrap()["token"],
        value(&first).as_bytes()
    );

    fake.unstall();
    wait_written(&handle, |s| {
        s.iter()
            .all(|s| s.token.as_ref().is_some_and(|t| value(t) == value(&second)))
    })
    .await;
    assert_eq!(
        fake.secret_data(NS, "app-token").unwrap()["token"],
        value(&second).as_bytes()
    );
    d.stop().await;
}
