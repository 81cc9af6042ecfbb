//! An in-process fake of the Kubernetes API server, for the parts the
//! Kubernetes store uses: Secrets and `coordination.k8s.io/v1` Leases,
//! GET / POST (create) / PUT (replace), with the real server's semantics:
//! one `resourceVersion` counter across all objects, optimistic concurrency
//! on replace (409 `Conflict`), 404 `NotFound`, 409 `AlreadyExists`,
//! `?dryRun=All`, base64 Secret data, `Status` objects for every failure.
//!
//! Knobs: conflicts injected on the next replaces (the stored object changes
//! behind the client's back), failures by method and kind, requests stalled
//! by method and kind (a hung server), bearer tokens cut off (a partitioned
//! replica), a client's clock skewed in the Lease times it writes, request
//! counts, the bearer tokens seen.
//! Include with `#[path = "support/kube_fake.rs"] mod kube_fake;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Secret,
    Lease,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Secret => "secrets",
            Kind::Lease => "leases",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Secret => "Secret",
            Kind::Lease => "Lease",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Secret => "v1",
            Kind::Lease => "coordination.k8s.io/v1",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Secret => "",
            Kind::Lease => "coordination.k8s.io",
        }
    }
}

type Key = (Kind, String, String);

/// Answer requests matching `method` and `kind` (`None`: any) with `code`,
/// `remaining` times (`None`: until changed).
#[derive(Debug, Clone)]
pub struct FailRule {
    pub method: Option<Method>,
    pub kind: Option<Kind>,
    pub code: u16,
    pub remaining: Option<u32>,
}

/// Requests matching `method` and `kind` (`None`: any) get no answer while
/// the stall is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub method: Option<Method>,
    pub kind: Option<Kind>,
}

impl Stall {
    fn matches(&self, method: &Method, kind: Kind) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && self.kind.is_none_or(|k| k == kind)
    }
}

#[derive(Default)]
struct State {
    last_rv: u64,
    next_uid: u64,
    objects: BTreeMap<Key, Value>,
    /// Replaces to lose: the stored object's resourceVersion is bumped first.
    inject_conflicts: u32,
    /// With `inject_conflicts` on a Secret: the other writer also adds the
    /// data key `<prefix><conflicts left>`, as a writer of another key would.
    conflict_key_prefix: Option<String>,
    rules: Vec<FailRule>,
    blocked_tokens: HashSet<String>,
    counts: HashMap<(Method, Kind), u64>,
    /// The bearer token of the last successful write of each object.
    last_writer: HashMap<Key, String>,
    /// Seconds added to the times in Lease specs written with a token: that
    /// client's wall clock is off by as much.
    skews: HashMap<String, i64>,
    /// Every bearer token a request carried, in order.
    bearers: Vec<String>,
}

impl State {
    fn bump(&mut self) -> String {
        self.last_rv += 1;
        self.last_rv.to_string()
    }
}

pub struct KubeFake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stalls: watch::Sender<Vec<Stall>>,
    /// Requests held by a stall so far: a client's request reaching the
    /// server is the signal a test waits on.
    stalled: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeFake {
    pub async fn start() -> KubeFake {
        let state = Arc::new(Mutex::new(State::default()));
        let stalls = watch::Sender::new(Vec::<Stall>::new());
        let stalled = watch::Sender::new(0u64);
        let app = Router::new().fallback({
            let state = state.clone();
            let stalls = stalls.clone();
            let stalled = stalled.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                let mut stalls = stalls.subscribe();
                let stalled = stalled.clone();
                async move {
                    if let Some((kind, _, _)) = route(uri.path()) {
                        if stalls.borrow().iter().any(|s| s.matches(&method, kind)) {
                            stalled.send_modify(|n| *n += 1);
                        }
                        // Answered once no stall matches any more: a request
                        // the client gave up on may still land late, as on a
                        // real server.
                        let _ = stalls
                            .wait_for(|s| !s.iter().any(|s| s.matches(&method, kind)))
                            .await;
                    }
                    handle(&state, method, uri, headers, body)
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        KubeFake {
            addr,
            state,
            stalls,
            stalled,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (namespace `ns`, bearer `token`)
    /// into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path, ns: &str, token: &str) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{token}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n    namespace: {ns}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn inject_conflicts(&self, n: u32) {
        self.state.lock().unwrap().inject_conflicts = n;
    }

    /// Like [`KubeFake::inject_conflicts`], each lost replace of a Secret
    /// caused by a writer that added its own data key (`<prefix>1`, ...,
    /// `<prefix>n`, value `x`): a client that resends its first read with a
    /// fresh resourceVersion instead of merging into the new one loses them.
    pub fn inject_conflicts_adding_keys(&self, n: u32, prefix: &str) {
        let mut state = self.state.lock().unwrap();
        state.inject_conflicts = n;
        state.conflict_key_prefix = Some(prefix.to_string());
    }

    pub fn conflicts_left(&self) -> u32 {
        self.state.lock().unwrap().inject_conflicts
    }

    pub fn fail(&self, rule: FailRule) {
        self.state.lock().unwrap().rules.push(rule);
    }

    pub fn clear_failures(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Requests matching `stall` get no answer until [`KubeFake::unstall`].
    pub fn stall(&self, stall: Stall) {
        self.stalls.send_modify(|s| s.push(stall));
    }

    /// How many requests a stall has held so far.
    pub fn held(&self) -> u64 {
        *self.stalled.borrow()
    }

    /// Waits until `n` requests in all have been held by a stall.
    pub async fn stalled(&self, n: u64) {
        let _ = self.stalled.subscribe().wait_for(|held| *held >= n).await;
    }

    /// Answers the stalled requests and stalls no more.
    pub fn unstall(&self) {
        self.stalls.send_modify(Vec::clear);
    }

    /// Lease writes bearing `token` store `renewTime` and `acquireTime`
    /// shifted by `seconds`, as if that client's wall clock were off by so
    /// much.
    pub fn skew_lease_times(&self, token: &str, seconds: i64) {
        self.state
            .lock()
            .unwrap()
            .skews
            .insert(token.to_string(), seconds);
    }

    /// Every request bearing `token` fails with 503 from now on.
    pub fn block_token(&self, token: &str) {
        self.state
            .lock()
            .unwrap()
            .blocked_tokens
            .insert(token.to_string());
    }

    /// The bearer tokens requests carried, in order (a client's
    /// credentials as the server saw them).
    pub fn bearers(&self) -> Vec<String> {
        self.state.lock().unwrap().bearers.clone()
    }

    pub fn count(&self, method: Method, kind: Kind) -> u64 {
        let state = self.state.lock().unwrap();
        state.counts.get(&(method, kind)).copied().unwrap_or(0)
    }

    pub fn object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.objects.get(&(kind, ns.into(), name.into())).cloned()
    }

    pub fn last_writer(&self, kind: Kind, ns: &str, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state
            .last_writer
            .get(&(kind, ns.into(), name.into()))
            .cloned()
    }

    /// The decoded data of a Secret.
    pub fn secret_data(&self, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let secret = self.object(Kind::Secret, ns, name)?;
        let mut out = BTreeMap::new();
        if let Some(data) = secret.get("data").and_then(Value::as_object) {
            for (k, v) in data {
                out.insert(k.clone(), BASE64.decode(v.as_str().unwrap()).unwrap());
            }
        }
        Some(out)
    }

    /// Creates an object as an operator would (`kubectl apply`).
    pub fn put_object(&self, kind: Kind, ns: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        finish_metadata(&mut state, kind, ns, &mut object, None);
        state.objects.insert((kind, ns.into(), name), object);
    }

    /// Sets one data key of a Secret directly (creating the Secret).
    pub fn set_secret_entry(&self, ns: &str, name: &str, key: &str, value: &[u8]) {
        let mut object = self
            .object(Kind::Secret, ns, name)
            .unwrap_or_else(|| json!({"metadata": {"name": name}, "type": "Opaque"}));
        object["data"][key] = Value::String(BASE64.encode(value));
        self.put_object(Kind::Secret, ns, object);
    }
}

fn finish_metadata(
    state: &mut State,
    kind: Kind,
    ns: &str,
    object: &mut Value,
    old: Option<&Value>,
) {
    let rv = state.bump();
    object["kind"] = json!(kind.kind());
    object["apiVersion"] = json!(kind.api_version());
    let meta = &mut object["metadata"];
    meta["namespace"] = json!(ns);
    meta["resourceVersion"] = json!(rv);
    match old {
        Some(old) => {
            meta["uid"] = old["metadata"]["uid"].clone();
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        }
        None => {
            state.next_uid += 1;
            meta["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", state.next_uid));
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
    }
}

fn reason_of(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        422 => "Invalid",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

fn status(code: u16, reason: &str, message: String, kind: Option<Kind>, name: &str) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(kind) = kind {
        body["details"] = json!({"name": name, "group": kind.group(), "kind": kind.plural()});
    }
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: StatusCode, object: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        object.to_string(),
    )
        .into_response()
}

/// `(kind, namespace, name)` of a path we serve.
fn route(path: &str) -> Option<(Kind, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "secrets"] => Some((Kind::Secret, ns.to_string(), None)),
        ["api", "v1", "namespaces", ns, "secrets", name] => {
            Some((Kind::Secret, ns.to_string(), Some(name.to_string())))
        }
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
        ] => Some((Kind::Lease, ns.to_string(), None)),
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            name,
        ] => Some((Kind::Lease, ns.to_string(), Some(name.to_string()))),
        _ => None,
    }
}

fn verb(method: &Method) -> &'static str {
    match *method {
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

fn handle(
    state: &Mutex<State>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((kind, ns, name)) = route(uri.path()) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
            "",
        );
    };
    let dry_run = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "dryRun=All"));
    let mut state = state.lock().unwrap();
    *state.counts.entry((method.clone(), kind)).or_default() += 1;

    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
    else {
        return status(401, "Unauthorized", "Unauthorized".into(), None, "");
    };
    state.bearers.push(token.clone());
    if state.blocked_tokens.contains(&token) {
        return status(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request".into(),
            None,
            "",
        );
    }
    let target_name = name.clone().unwrap_or_default();
    if let Some(i) = state.rules.iter().position(|r| {
        r.method.as_ref().is_none_or(|m| *m == method) && r.kind.is_none_or(|k| k == kind)
    }) {
        let rule = &mut state.rules[i];
        let code = rule.code;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                state.rules.remove(i);
            }
        }
        let message = match code {
            403 => format!(
                "{} \"{target_name}\" is forbidden: User \"system:serviceaccount:{ns}:rekeyd\" cannot {} resource \"{}\" in API group \"{}\" in the namespace \"{ns}\"",
                kind.plural(),
                verb(&method),
                kind.plural(),
                kind.group()
            ),
            500 => "Internal error occurred: etcdserver: request timed out".into(),
            // A validation failure that quotes the object it was sent, as
            // some admission webhooks do.
            422 => format!(
                "{} \"{target_name}\" is invalid: {}",
                kind.plural(),
                String::from_utf8_lossy(&body)
            ),
            _ => format!("injected failure {code}"),
        };
        return status(code, reason_of(code), message, Some(kind), &target_name);
    }

    match (method.clone(), name) {
        (Method::GET, Some(name)) => match state.objects.get(&(kind, ns.clone(), name.clone())) {
            Some(object) => ok(StatusCode::OK, object),
            None => not_found(kind, &name),
        },
        (Method::POST, None) => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(_) => {
                    return status(
                        400,
                        "BadRequest",
                        "the body is not a JSON object".into(),
                        Some(kind),
                        "",
                    );
                }
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    422,
                    "Invalid",
                    format!("{} is invalid: metadata.name: Required value", kind.kind()),
                    Some(kind),
                    "",
                );
            };
            if let Some(response) = validate(kind, &ns, &name, &object) {
                return response;
            }
            if !object["metadata"]["resourceVersion"].is_null() {
                return status(
                    500,
                    "InternalError",
                    "resourceVersion should not be set on objects to be created".into(),
                    Some(kind),
                    &name,
                );
            }
            let key = (kind, ns.clone(), name.clone());
            if state.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.plural()),
                    Some(kind),
                    &name,
                );
            }
            if dry_run {
                return ok(StatusCode::CREATED, &object);
            }
            skew_lease_times(&state, kind, &token, &mut object);
            finish_metadata(&mut state, kind, &ns, &mut object, None);
            state.objects.insert(key.clone(), object.clone());
            state.last_writer.insert(key, token);
            ok(StatusCode::CREATED, &object)
        }
        (Method::PUT, Some(name)) => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(_) => {
                    return status(
                        400,
                        "BadRequest",
                        "the body is not a JSON object".into(),
                        Some(kind),
                        &name,
                    );
                }
            };
            if object["metadata"]["name"].as_str() != Some(name.as_str()) {
                return status(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the URL".into(),
                    Some(kind),
                    &name,
                );
            }
            if let Some(response) = validate(kind, &ns, &name, &object) {
                return response;
            }
            let key = (kind, ns.clone(), name.clone());
            if !state.objects.contains_key(&key) {
                return not_found(kind, &name);
            }
            if state.inject_conflicts > 0 && !dry_run {
                // Another writer got in first: the object moves on.
                state.inject_conflicts -= 1;
                let rv = state.bump();
                let added = (kind == Kind::Secret)
                    .then(|| state.conflict_key_prefix.clone())
                    .flatten()
                    .map(|prefix| format!("{prefix}{}", state.inject_conflicts + 1));
                let stored = state.objects.get_mut(&key).unwrap();
                stored["metadata"]["resourceVersion"] = json!(rv);
                if let Some(added) = added {
                    stored["data"][added] = Value::String(BASE64.encode(b"x"));
                }
            }
            let old = state.objects.get(&key).unwrap().clone();
            // No resourceVersion: an unconditional update, which the real
            // server allows for Secrets and Leases.
            let sent = object["metadata"]["resourceVersion"].as_str();
            let stored = old["metadata"]["resourceVersion"].as_str();
            if sent.is_some() && sent != stored {
                return status(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {}{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.plural(),
                        if kind.group().is_empty() {
                            String::new()
                        } else {
                            format!(".{}", kind.group())
                        }
                    ),
                    Some(kind),
                    &name,
                );
            }
            if dry_run {
                return ok(StatusCode::OK, &old_with(&object, &old));
            }
            skew_lease_times(&state, kind, &token, &mut object);
            finish_metadata(&mut state, kind, &ns, &mut object, Some(&old));
            state.objects.insert(key.clone(), object.clone());
            state.last_writer.insert(key, token);
            ok(StatusCode::OK, &object)
        }
        (method, _) => status(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            Some(kind),
            &target_name,
        ),
    }
}

/// Shifts the times a Lease write carries by the skew of the writer's clock.
fn skew_lease_times(state: &State, kind: Kind, token: &str, object: &mut Value) {
    let Some(&seconds) = state.skews.get(token) else {
        return;
    };
    if kind != Kind::Lease {
        return;
    }
    for field in ["renewTime", "acquireTime"] {
        let time = &mut object["spec"][field];
        if let Some(at) = time.as_str().and_then(|t| t.parse::<Timestamp>().ok()) {
            *time = json!((at + SignedDuration::from_secs(seconds)).to_string());
        }
    }
}

/// The object a dry-run replace would have stored (its version unchanged).
fn old_with(object: &Value, old: &Value) -> Value {
    let mut object = object.clone();
    object["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    object
}

fn not_found(kind: Kind, name: &str) -> Response {
    let what = if kind.group().is_empty() {
        kind.plural().to_string()
    } else {
        format!("{}.{}", kind.plural(), kind.group())
    };
    status(
        404,
        "NotFound",
        format!("{what} \"{name}\" not found"),
        Some(kind),
        name,
    )
}

/// What the real server's validation would refuse, for fields we use.
fn validate(kind: Kind, ns: &str, name: &str, object: &Value) -> Option<Response> {
    if let Some(body_ns) = object["metadata"]["namespace"].as_str()
        && body_ns != ns
    {
        return Some(status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
            Some(kind),
            name,
        ));
    }
    let invalid = |field: &str| {
        Some(status(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {field}", kind.kind()),
            Some(kind),
            name,
        ))
    };
    match kind {
        Kind::Secret => {
            if let Some(data) = object.get("data").filter(|d| !d.is_null()) {
                let Some(data) = data.as_object() else {
                    return invalid("data: must be a map");
                };
                for (k, v) in data {
                    if v.as_str().is_none_or(|s| BASE64.decode(s).is_err()) {
                        return invalid(&format!("data[{k}]: illegal base64 data"));
                    }
                }
            }
        }
        Kind::Lease => {
            if let Some(d) = object["spec"]["leaseDurationSeconds"].as_i64()
                && d <= 0
            {
                return invalid("spec.leaseDurationSeconds: must be greater than 0");
            }
        }
    }
    None
}
