//! Environment proxies, against the real binary (the proxy variables are
//! process-wide, so each daemon gets its own environment):
//!
//! - plain http never goes through a proxy: with every proxy variable
//!   pointing at a loopback stand-in, the daemon's login to a plain-http
//!   loopback token endpoint reaches the provider, never the stand-in;
//! - https follows HTTPS_PROXY, as a CONNECT tunnel that carries the proxy's
//!   credentials and nothing of the client secret;
//! - `rekeyd check` shows each endpoint's route, proxy credentials redacted.
//!
//! The stand-in accepts connections on port 0, records what arrives and
//! answers 502; it never connects anywhere.

#[path = "support/process.rs"]
mod process;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use process::{BIN, RekeydProcess, TIMEOUT};
use rekeyd::sim::{SimOptions, SimProvider};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What reached the stand-in proxy: each request's head and any bytes that
/// followed it.
#[derive(Clone, Debug, Default)]
struct Seen {
    requests: Vec<String>,
}

/// A loopback "proxy" that records requests and refuses them.
struct StandIn {
    port: u16,
    seen: watch::Receiver<Seen>,
}

impl StandIn {
    async fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, seen) = watch::channel(Seen::default());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    let mut buf = [0u8; 4096];
                    // The head, and whatever body comes with it within a
                    // moment (a proxied plain-http login sends its form).
                    loop {
                        let read =
                            tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf))
                                .await;
                        match read {
                            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    tx.send_modify(|s| {
                        s.requests
                            .push(String::from_utf8_lossy(&received).into_owned())
                    });
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        StandIn { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.seen.borrow().requests.clone()
    }
}

fn write_config(dir: &Path, token_url: &str, secret: &str) -> std::path::PathBuf {
    let secret_file = dir.join("maps.secret");
    rekeyd::fsutil::write_atomic(&secret_file, secret.as_bytes(), 0o600).unwrap();
    let config = dir.join("rekeyd.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{dir}/state"

[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "proxy-maps"
initial_secret_file = "{secret_file}"
[credentials.endpoints]
token_url = "{token_url}"
"#,
            dir = dir.display(),
            secret_file = secret_file.display(),
        ),
    )
    .unwrap();
    config
}

/// Every variable a proxy could be taken from, pointing at `proxy`.
fn all_proxy_variables(proxy: &str) -> Vec<(&'static str, String)> {
    [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .map(|name| (name, proxy.to_string()))
    .collect()
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn a_plain_http_login_never_reaches_the_proxy() {
    let proxy = StandIn::start().await;
    let sim = SimProvider::start(SimOptions::default()).await.unwrap();
    sim.add_client("proxy-maps", "cust");
    let (_, secret) = sim.add_secret("proxy-maps", "bootstrap");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &sim.mapsindoors_token_url(), &secret);
    let env = all_proxy_variables(&proxy.url());
    let mut daemon = RekeydProcess::spawn(&config, &dir.path().join("log"), &env_refs(&env));

    // Either the login reaches the provider, or the proxy sees it.
    daemon
        .wait_until("a login at the provider or the proxy", |_| {
            sim.stats().logins_ok > 0 || !proxy.requests().is_empty()
        })
        .await;
    // Request lines only: a proxied login's body holds the secret.
    let reached: Vec<String> = proxy
        .requests()
        .iter()
        .map(|r| r.lines().next().unwrap_or_default().to_string())
        .collect();
    assert!(
        reached.is_empty(),
        "the plain-http login went through the proxy: {reached:?}"
    );
    assert!(sim.stats().logins_ok > 0);
    let (_, log) = daemon.stop().await;
    assert!(!log.contains(&secret));
    assert!(proxy.requests().is_empty());
}

#[tokio::test]
async fn an_https_login_goes_through_https_proxy_as_a_tunnel() {
    let proxy = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "tunnel-secret-value-7f3a";
    // A name that resolves nowhere: only the proxy is ever asked for it.
    let config = write_config(
        dir.path(),
        "https://auth.example.invalid/connect/token",
        secret,
    );
    let with_credentials = format!("http://proxyuser:proxypass@127.0.0.1:{}", proxy.port);
    let env = [
        ("HTTPS_PROXY", with_credentials),
        ("HTTP_PROXY", "http://127.0.0.1:9".to_string()),
    ];
    let mut daemon = RekeydProcess::spawn(&config, &dir.path().join("log"), &env_refs(&env));
    daemon
        .wait_until("a request at the proxy", |_| !proxy.requests().is_empty())
        .await;
    let request = proxy.requests().remove(0);
    assert!(
        request.starts_with("CONNECT auth.example.invalid:443 HTTP/1.1\r\n"),
        "{:?}",
        request.lines().next()
    );
    let credentials = base64::engine::general_purpose::STANDARD.encode("proxyuser:proxypass");
    assert!(
        request
            .to_ascii_lowercase()
            .contains(&format!("proxy-authorization: basic {credentials}").to_ascii_lowercase()),
        "no proxy credentials in the CONNECT"
    );
    assert!(!request.contains(secret), "the secret reached the proxy");
    let (_, log) = daemon.stop().await;
    assert!(!log.contains("proxypass"), "{log}");
    assert!(!log.contains(secret));
}

#[tokio::test]
async fn check_shows_the_route_of_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("s.secret");
    rekeyd::fsutil::write_atomic(&secret_file, b"check-secret", 0o600).unwrap();
    let credential = |name: &str, token_url: &str, extra: &str| {
        format!(
            "[[credentials]]\nname = \"{name}\"\nprovider = \"oauth2\"\nclient_id = \"{name}-client\"\n\
             initial_secret_file = \"{}\"\n{extra}[credentials.endpoints]\ntoken_url = \"{token_url}\"\n\n",
            secret_file.display()
        )
    };
    // Kubernetes Secret sinks talk to the API server their kubeconfig
    // names: through the proxy, or not, as any other endpoint.
    let kubeconfig = |name: &str, server: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
                 users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
                 current-context: c\n"
            ),
        )
        .unwrap();
        path
    };
    let sink = |secret: &str, kubeconfig: &Path| {
        format!(
            "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"{secret}\"\nnamespace = \"n\"\nkubeconfig = \"{}\"\n",
            kubeconfig.display()
        )
    };
    let public_cluster = kubeconfig("public.kubeconfig", "https://k8s.example.com:6443");
    let internal_cluster = kubeconfig("internal.kubeconfig", "https://k8s.internal.example.net");
    let config = dir.path().join("rekeyd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}/state\"\n\n{}{}{}{}",
            dir.path().display(),
            credential("plain", "http://127.0.0.1:8080/token", ""),
            credential(
                "public",
                "https://auth.example.com/token",
                &format!(
                    "{}{}",
                    sink("a", &public_cluster),
                    sink("b", &internal_cluster)
                ),
            ),
            credential("internal", "https://login.internal.example.net/token", ""),
            credential("local", "https://127.0.0.1:8443/token", ""),
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&config)
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://proxyuser:hunter2@proxy.example:3128")
            .env("NO_PROXY", "internal.example.net")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("https_proxy")
            .env_remove("no_proxy")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("check finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    assert!(!stdout.contains("proxyuser"));
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let route = |i: usize| doc["credentials"][i]["endpoints"]["token_url_proxy"].clone();
    assert_eq!(
        route(0),
        "direct (plain http never uses a proxy)",
        "{stdout}"
    );
    assert_eq!(
        route(1),
        "via http://[redacted]@proxy.example:3128 (HTTPS_PROXY)",
        "{stdout}"
    );
    assert_eq!(route(2), "direct (NO_PROXY)", "{stdout}");
    let sinks = &doc["credentials"][1]["sinks"];
    assert_eq!(
        (&sinks[0]["api_server"], &sinks[0]["api_server_proxy"]),
        (
            &json!("https://k8s.example.com:6443/"),
            &json!("via http://[redacted]@proxy.example:3128 (HTTPS_PROXY)")
        ),
        "{stdout}"
    );
    assert_eq!(
        sinks[1]["api_server_proxy"], "direct (NO_PROXY)",
        "{stdout}"
    );
    assert_eq!(route(3), "direct (loopback)", "{stdout}");
    assert_eq!(
        doc["proxy_variables_ignored"][0], "HTTP_PROXY: plain http never uses a proxy",
        "{stdout}"
    );
}
