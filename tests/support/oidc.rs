//! A real third-party OAuth2 server for integration tests: the npm package
//! `oidc-provider`, driven by `tests/oidc/server.js`.
//!
//! Include from an integration test with
//! ```ignore
//! #[path = "support/oidc.rs"]
//! mod oidc;
//! ```
//!
//! Needs Node.js >= 20 and npm on `PATH`; without them [`OidcServer::start`]
//! reports the calling test as skipped and returns `None`
//! (`tests/support/tools.rs`: a failure under `REKEYD_REQUIRE_TOOLS=1`).
//! The first use runs `npm ci --prefix tests/oidc` (once, serialised across
//! threads and processes; it downloads from the npm registry) when
//! `tests/oidc/node_modules` is missing or stale.
//!
//! The server has two static clients, both limited to `client_credentials`:
//! * [`BASIC_CLIENT`] — `client_secret_basic`, secret [`OidcServer::basic_secret`]
//! * [`POST_CLIENT`] — `client_secret_post`, secret [`OidcServer::post_secret`]
//!
//! Secrets are random alphanumeric strings. Known scopes: `openid`,
//! `offline_access`, `api:read`, `api:write`, `api:admin` (unknown scopes are
//! silently dropped from the grant, not rejected).
//!
//! Behaviour worth knowing (oidc-provider 9.13.3):
//! * token endpoint `/token`, introspection `/token/introspection`,
//!   revocation `/token/revocation`;
//! * success: `200 {"access_token","expires_in","token_type":"Bearer","scope"?}`;
//! * wrong secret / unknown client: `401 {"error":"invalid_client"}` for both
//!   auth methods (basic additionally gets a `WWW-Authenticate: Basic` header);
//! * no client credentials at all: `400 {"error":"invalid_request"}`;
//! * using the other auth method than the one registered (e.g. basic-client
//!   sending `client_secret` in the form) at `/token` or `/token/revocation`:
//!   `401 invalid_client` — this check is added by server.js (stock
//!   oidc-provider accepts either); disable it with
//!   [`OidcOptions::strict_auth_method`] = false. Introspection accepts either
//!   method from any client.
//! * any client may introspect any client's token.
#![allow(dead_code)]

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use rand::{Rng, distr::Alphanumeric};

#[path = "tools.rs"]
mod tools;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Client registered with `token_endpoint_auth_method = client_secret_basic`.
pub const BASIC_CLIENT: &str = "basic-client";
/// Client registered with `token_endpoint_auth_method = client_secret_post`.
pub const POST_CLIENT: &str = "post-client";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: u32 = 3;
const MAX_LOG_LINES: usize = 2000;

/// Knobs for [`OidcServer::start_with`].
#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Lifetime of client_credentials access tokens (`expires_in`), seconds.
    /// `None` = server default (600).
    pub token_ttl_secs: Option<u64>,
    /// Reject a client that authenticates at /token or /token/revocation
    /// with the other method than the one it is registered with (server.js
    /// extension; default true).
    pub strict_auth_method: bool,
    /// Replace the two default clients with this JSON array of client
    /// metadata (oidc-provider / RFC 7591 field names).
    pub clients: Option<serde_json::Value>,
    /// RFC 7591 registration and RFC 7592 management (server.js
    /// `OIDC_REGISTRATION_FILE`): see [`OidcServer::register`].
    pub registration: bool,
    /// With [`OidcOptions::registration`]: the server keeps the
    /// registration access token across updates (server.js
    /// `OIDC_KEEP_REGISTRATION_TOKEN`) instead of replacing it.
    pub keep_registration_token: bool,
    /// Log every client assertion sent to /token with the answer's status
    /// (server.js `OIDC_LOG_ASSERTIONS`): see [`OidcServer::assertions`].
    pub log_assertions: bool,
    /// Seconds a key set fetched from a client's `jwks_uri` is trusted
    /// before an unknown `kid` makes the server fetch it again (server.js
    /// `OIDC_JWKS_URI_FRESH`); `None`: oidc-provider's own (at least 60).
    pub jwks_uri_fresh_secs: Option<u64>,
}

impl Default for OidcOptions {
    fn default() -> Self {
        Self {
            token_ttl_secs: None,
            strict_auth_method: true,
            clients: None,
            registration: false,
            keep_registration_token: false,
            log_assertions: false,
            jwks_uri_fresh_secs: None,
        }
    }
}

pub struct OidcServer {
    pub port: u16,
    pub basic_secret: String,
    pub post_secret: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// With [`OidcOptions::registration`]: the initial access tokens.
    registration: Option<serde_json::Value>,
    _registration_dir: Option<tempfile::TempDir>,
}

/// A client registered through RFC 7591 ([`OidcServer::register`]).
#[derive(Debug, Clone)]
pub struct Registered {
    pub client_id: String,
    pub client_secret: String,
    pub registration_client_uri: String,
    pub registration_access_token: String,
}

impl OidcServer {
    /// Starts a server with the default options. See the module docs.
    /// `None` when Node.js is missing: the caller returns (skipped).
    pub async fn start() -> Option<OidcServer> {
        Self::start_with(OidcOptions::default()).await
    }

    /// Ensures node_modules exist, spawns `node tests/oidc/server.js` with
    /// random secrets, waits for its `LISTENING <port>` line. The process is
    /// killed when the returned value is dropped.
    ///
    /// A start that hangs (seen once on a loaded CI machine: the server
    /// loaded oidc-provider and then printed nothing for a minute) is killed
    /// and retried; the test itself only begins once a server answers.
    pub async fn start_with(opts: OidcOptions) -> Option<OidcServer> {
        let node = match node_tools() {
            Ok(tools) => tools,
            Err(why) => {
                tools::skip(why);
                return None;
            }
        };
        let npm = node.npm.clone();
        tokio::task::spawn_blocking(move || ensure_node_modules(&npm))
            .await
            .expect("npm ci task panicked");
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::spawn(&node.node, &opts).await {
                Ok(server) => return Some(server),
                Err(failure) => {
                    eprintln!("oidc test server start attempt {attempt} failed: {failure}");
                    failures.push(failure);
                }
            }
        }
        panic!(
            "oidc test server failed to start {START_ATTEMPTS} times:\n{}",
            failures.join("\n\n")
        );
    }

    async fn spawn(node: &Path, opts: &OidcOptions) -> Result<OidcServer, String> {
        let basic_secret = random_secret();
        let post_secret = random_secret();
        let dir = oidc_dir();

        let mut cmd = Command::new(node);
        cmd.arg(dir.join("server.js"))
            .current_dir(&dir)
            .env("OIDC_PORT", "0")
            .env("OIDC_BASIC_SECRET", &basic_secret)
            .env("OIDC_POST_SECRET", &post_secret)
            .env(
                "OIDC_STRICT_AUTH_METHOD",
                if opts.strict_auth_method { "1" } else { "0" },
            )
            .env_remove("OIDC_CLIENTS")
            .env_remove("OIDC_TOKEN_TTL")
            .env_remove("NODE_OPTIONS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if opts.log_assertions {
            cmd.env("OIDC_LOG_ASSERTIONS", "1");
        } else {
            cmd.env_remove("OIDC_LOG_ASSERTIONS");
        }
        match opts.jwks_uri_fresh_secs {
            Some(secs) => cmd.env("OIDC_JWKS_URI_FRESH", secs.to_string()),
            None => cmd.env_remove("OIDC_JWKS_URI_FRESH"),
        };
        if let Some(ttl) = opts.token_ttl_secs {
            cmd.env("OIDC_TOKEN_TTL", ttl.to_string());
        }
        if let Some(clients) = &opts.clients {
            cmd.env("OIDC_CLIENTS", clients.to_string());
        }
        let registration_dir = opts.registration.then(|| tempfile::tempdir().unwrap());
        let registration_file = registration_dir
            .as_ref()
            .map(|d| d.path().join("registration.json"));
        match &registration_file {
            Some(file) => cmd.env("OIDC_REGISTRATION_FILE", file),
            None => cmd.env_remove("OIDC_REGISTRATION_FILE"),
        };
        if opts.keep_registration_token {
            cmd.env("OIDC_KEEP_REGISTRATION_TOKEN", "1");
        } else {
            cmd.env_remove("OIDC_KEEP_REGISTRATION_TOKEN");
        }

        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "failed to spawn `node {}`: {e}",
                dir.join("server.js").display()
            )
        });

        // Always drain stderr (a full pipe would block the server) into a
        // bounded buffer that failure messages can show.
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut logs = logs.lock().unwrap();
                    if logs.len() >= MAX_LOG_LINES {
                        logs.remove(0);
                    }
                    logs.push(line);
                }
            });
        }

        let stdout = child.stdout.take().expect("stdout piped");
        let mut stdout = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                // stdout closed: the server died. Give stderr a moment to drain.
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!(
                    "exited before printing `LISTENING <port>` (status: {status:?})\n--- server stderr ---\n{}",
                    logs.lock().unwrap().join("\n")
                ));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(format!(
                    "did not print `LISTENING <port>` within {START_TIMEOUT:?}\n--- server stderr ---\n{}",
                    logs.lock().unwrap().join("\n")
                ));
            }
        };
        let port: u16 = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| {
                format!(
                    "printed {line:?} instead of `LISTENING <port>`\n--- server stderr ---\n{}",
                    logs.lock().unwrap().join("\n")
                )
            })?;
        // Keep draining stdout (nothing more is expected there).
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });

        // Written before LISTENING.
        let registration = registration_file.map(|file| {
            serde_json::from_slice(&std::fs::read(file).expect("registration file"))
                .expect("registration file is JSON")
        });
        Ok(OidcServer {
            port,
            basic_secret,
            post_secret,
            child,
            logs,
            registration,
            _registration_dir: registration_dir,
        })
    }

    /// Registers a `client_credentials` client (RFC 7591 §3) with
    /// `client_secret_basic`; `rotating`: every update also replaces its
    /// secret. Needs [`OidcOptions::registration`].
    pub async fn register(&self, rotating: bool) -> Registered {
        let metadata = serde_json::json!({
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "token_endpoint_auth_method": "client_secret_basic",
            "client_name": "rekeyd test client",
        });
        self.register_metadata(metadata, rotating).await
    }

    /// Registers a client with `metadata` (RFC 7591 §2); `rotating` as for
    /// [`OidcServer::register`]. A client without a secret
    /// (`private_key_jwt`) has an empty [`Registered::client_secret`].
    pub async fn register_metadata(
        &self,
        metadata: serde_json::Value,
        rotating: bool,
    ) -> Registered {
        let tokens = self
            .registration
            .as_ref()
            .expect("started with registration");
        let iat = tokens[if rotating {
            "rotating_initial_access_token"
        } else {
            "initial_access_token"
        }]
        .as_str()
        .unwrap();
        let resp = reqwest::Client::new()
            .post(format!("{}/reg", self.base_url()))
            .bearer_auth(iat)
            .header("content-type", "application/json")
            .body(metadata.to_string())
            .send()
            .await
            .expect("registration request");
        let status = resp.status();
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.unwrap()).expect("registration reply");
        assert_eq!(status, 201, "registration: {body}\n{}", self.logs());
        let text = |field: &str| {
            body[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} in {body}"))
                .to_string()
        };
        Registered {
            client_id: text("client_id"),
            client_secret: body["client_secret"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            registration_client_uri: text("registration_client_uri"),
            registration_access_token: text("registration_access_token"),
        }
    }

    /// Makes the next successful registration update commit and then close
    /// its connection without a reply.
    pub async fn drop_next_update_reply(&self) {
        let resp = reqwest::Client::new()
            .post(format!("{}/__test/drop-next-update-reply", self.base_url()))
            .send()
            .await
            .expect("fault request");
        assert_eq!(resp.status(), 204);
    }

    /// `GET` of the client's registration with `token`: the HTTP status and
    /// the body.
    pub async fn read_registration(
        &self,
        client: &Registered,
        token: &str,
    ) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .get(&client.registration_client_uri)
            .bearer_auth(token)
            .send()
            .await
            .expect("registration read");
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn issuer(&self) -> String {
        self.base_url()
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    pub fn introspection_url(&self) -> String {
        format!("{}/token/introspection", self.base_url())
    }

    pub fn revocation_url(&self) -> String {
        format!("{}/token/revocation", self.base_url())
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.base_url())
    }

    /// The client assertions the token endpoint answered so far, in order:
    /// (HTTP status, assertion). Needs [`OidcOptions::log_assertions`].
    pub fn assertions(&self) -> Vec<(u16, String)> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| {
                let rest = line.strip_prefix("ASSERTION ")?;
                let (status, assertion) = rest.split_once(' ')?;
                Some((status.parse().ok()?, assertion.to_string()))
            })
            .collect()
    }

    /// The server's stderr so far (oidc-provider notices and one
    /// `METHOD /path -> status` line per request), for debugging.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Calls the introspection endpoint authenticated as `client_id`/`secret`
    /// with HTTP Basic (works for every client, whatever its registered
    /// method) and returns the parsed JSON. Panics on a non-2xx answer. An unknown/expired token gives
    /// `{"active": false}`.
    pub async fn introspect(
        &self,
        client_id: &str,
        secret: &str,
        token: &str,
    ) -> serde_json::Value {
        let req = reqwest::Client::new()
            .post(self.introspection_url())
            .basic_auth(form_encode(client_id), Some(form_encode(secret)))
            .form(&[("token", token)]);
        self.send_json(req).await
    }

    /// Like [`Self::introspect`], authenticating with `client_secret_post`.
    pub async fn introspect_post(
        &self,
        client_id: &str,
        secret: &str,
        token: &str,
    ) -> serde_json::Value {
        let req = reqwest::Client::new()
            .post(self.introspection_url())
            .form(&[
                ("token", token),
                ("client_id", client_id),
                ("client_secret", secret),
            ]);
        self.send_json(req).await
    }

    async fn send_json(&self, req: reqwest::RequestBuilder) -> serde_json::Value {
        let resp = req
            .send()
            .await
            .expect("request to oidc test server failed");
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .expect("reading oidc test server response");
        if !status.is_success() {
            panic!(
                "oidc test server answered {status}: {}\n--- server stderr ---\n{}",
                String::from_utf8_lossy(&body),
                self.logs()
            );
        }
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "oidc test server sent non-JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    }
}

/// RFC 6749 §2.3.1: client_id and secret are form-urlencoded before Basic.
/// (Identity for the alphanumeric secrets used here.)
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn random_secret() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("oidc")
}

/// Node.js and npm, as found on `PATH`.
struct NodeTools {
    node: PathBuf,
    npm: PathBuf,
}

/// Node.js >= 20 and npm, or why the OAuth2 server cannot run here
/// (looked up once per test binary).
fn node_tools() -> Result<&'static NodeTools, &'static str> {
    static FOUND: OnceLock<Result<NodeTools, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let hint = "the real OAuth2 server (oidc-provider) needs Node.js >= 20 with npm: \
                    Debian packages nodejs and npm, or nodejs.org";
        let (Some(node), Some(npm)) = (tools::on_path("node"), tools::on_path("npm")) else {
            return Err(format!("node or npm is not on PATH ({hint})"));
        };
        let version = std::process::Command::new(&node)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {} ({e}; {hint})", node.display()))?;
        let text = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let major: Option<u32> = text
            .strip_prefix('v')
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok());
        match major {
            Some(major) if major >= 20 => Ok(NodeTools { node, npm }),
            _ => Err(format!("node --version says {text:?} ({hint})")),
        }
    });
    found.as_ref().map_err(String::as_str)
}

/// True when node_modules holds a finished install of the pinned version.
fn node_modules_ready(dir: &Path) -> bool {
    let read = |p: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    };
    let Some(pkg) = read(dir.join("package.json")) else {
        return false;
    };
    let Some(want) = pkg["dependencies"]["oidc-provider"]
        .as_str()
        .map(str::to_owned)
    else {
        return false;
    };
    // npm writes node_modules/.package-lock.json last.
    if !dir
        .join("node_modules")
        .join(".package-lock.json")
        .is_file()
    {
        return false;
    }
    let Some(have) = read(
        dir.join("node_modules")
            .join("oidc-provider")
            .join("package.json"),
    ) else {
        return false;
    };
    have["version"].as_str() == Some(want.as_str())
}

/// Runs `npm ci --prefix tests/oidc` if needed: once per process
/// (OnceLock) and under an exclusive file lock across processes.
fn ensure_node_modules(npm: &Path) {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let dir = oidc_dir();
        if node_modules_ready(&dir) {
            return;
        }
        let lock_path = dir.join(".npm-ci.lock");
        let lock = File::create(&lock_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
        lock.lock()
            .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
        if node_modules_ready(&dir) {
            return; // another process installed it while we waited
        }
        let out = std::process::Command::new(npm)
            .args(["ci", "--prefix", "tests/oidc", "--no-audit", "--no-fund"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running `npm ci --prefix tests/oidc`: {e}"));
        if !out.status.success() || !node_modules_ready(&dir) {
            panic!(
                "`npm ci --prefix tests/oidc` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // `lock` is released when dropped here.
    });
}
