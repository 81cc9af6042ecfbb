//! `cargo run --release --features bench --bin rekeyd-bench`: measures rekeyd against its
//! performance targets on this machine, on loopback only, against the
//! simulated provider (which runs inside this process), and writes the
//! results to BENCHMARKS.md.
//!
//! The daemon runs as a child process (`target/release/rekeyd run`, built
//! first), so its memory and CPU time are read from `/proc/PID` alone.
//! Sections:
//!
//! - binary: stripped size, start to `READY=1` (a notify socket we own);
//! - idle: RSS and CPU time of one credential over 60 idle seconds;
//! - api: `GET /v1/token/{name}` with `wrk` against nginx serving a static
//!   file of the same size, same wrk parameters, three alternating rounds;
//!   wrk on the first half of the cores, the server on the other half;
//! - scale: 10,000 credentials with 60 s tokens for 3 minutes;
//! - rotation: 1,000 rotations at once with the file store, in-process, on
//!   disk and on tmpfs, with the time spent in store writes measured;
//! - outage: 200 credentials on one endpoint that goes down for 2 minutes:
//!   how the retries spread (token requests per 100 ms) and how long after
//!   the recovery every credential holds a valid token again.
//!
//! `--only idle,api` runs some sections; `--quick` shortens every window
//! (for trying the bench, not for numbers). Without `--output`, partial or
//! quick runs only print. Everything is bounded in time; the whole run takes
//! about 10 minutes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use rand::Rng;
use rekeyd::config::Config;
use rekeyd::provider::HttpClients;
use rekeyd::rotation::driver::{Outcome, Rotator};
use rekeyd::sim::{Endpoint, FaultScope, Faults, SimOptions, SimProvider};
use rekeyd::store::file::FileStore;
use rekeyd::store::{Claim, CredentialRecord, SecretEntry, Store, StoreError, Versioned};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

/// `--daemon-env`: set once at start.
static DAEMON_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const USAGE: &str = "\
usage: rekeyd-bench [--only SECTIONS] [--quick] [--output FILE | --no-write] [--no-build]
                    [--rekeyd PATH] [--no-pin] [--scale-credentials N] [--scale-secs S]
                    [--daemon-env K=V]...

  --only SECTIONS  comma-separated: binary,idle,api,scale,rotation,outage (default: all)
  --quick          short windows (idle 10 s, wrk 3 s, 1,000 credentials for 60 s,
                   a 45 s outage)
  --output FILE    where to write the report (default BENCHMARKS.md in the
                   repository, for a full run only)
  --no-write       print the report only
  --no-build       do not run `cargo build --release --bin rekeyd` first
  --rekeyd PATH    measure this rekeyd binary (implies --no-build)
  --scale-credentials N, --scale-secs S
                   scale: N credentials (10,000) for S seconds (180)
  --daemon-env K=V extra environment for the daemon (e.g. a profiler's LD_PRELOAD)
  --no-pin         api: let wrk and the server share all cores (default: wrk on
                   the first half of the cores, the server on the other half)
";

const SECTIONS: [&str; 6] = ["binary", "idle", "api", "scale", "rotation", "outage"];

/// Window sizes; `--quick` shrinks them.
#[derive(Clone, Debug)]
struct Plan {
    sections: Vec<&'static str>,
    idle: Duration,
    wrk: Duration,
    wrk_rounds: usize,
    scale_credentials: usize,
    scale_run: Duration,
    rotations: usize,
    /// outage: how long the token endpoint stays down.
    outage: Duration,
    output: Option<PathBuf>,
    build: bool,
    full: bool,
    /// api: wrk and the servers on separate cores.
    pin: bool,
    /// `--rekeyd PATH`: this binary instead of target/release/rekeyd.
    rekeyd: Option<PathBuf>,
    /// `--daemon-env KEY=VALUE`: extra environment of the daemon (profilers).
    daemon_env: Vec<(String, String)>,
}

fn parse_args() -> Result<Plan> {
    let mut args = std::env::args().skip(1);
    let mut only: Option<Vec<&'static str>> = None;
    let mut quick = false;
    let mut output = None;
    let mut no_write = false;
    let mut build = true;
    let mut pin = true;
    let mut rekeyd = None;
    let mut daemon_env = Vec::new();
    let mut scale_credentials: Option<usize> = None;
    let mut scale_secs: Option<u64> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => {
                let list = args.next().ok_or("--only needs a list")?;
                let mut chosen = Vec::new();
                for name in list.split(',').filter(|s| !s.is_empty()) {
                    let known = SECTIONS
                        .iter()
                        .find(|s| **s == name)
                        .ok_or_else(|| format!("unknown section {name:?}\n{USAGE}"))?;
                    chosen.push(*known);
                }
                only = Some(chosen);
            }
            "--quick" => quick = true,
            "--output" => output = Some(PathBuf::from(args.next().ok_or("--output needs a file")?)),
            "--no-write" => no_write = true,
            "--no-build" => build = false,
            "--no-pin" => pin = false,
            "--scale-credentials" => {
                scale_credentials =
                    Some(args.next().ok_or("--scale-credentials needs N")?.parse()?);
            }
            "--scale-secs" => {
                scale_secs = Some(args.next().ok_or("--scale-secs needs S")?.parse()?);
            }
            "--daemon-env" => {
                let kv = args.next().ok_or("--daemon-env needs KEY=VALUE")?;
                let (k, v) = kv.split_once('=').ok_or("--daemon-env needs KEY=VALUE")?;
                daemon_env.push((k.to_string(), v.to_string()));
            }
            "--rekeyd" => {
                rekeyd = Some(PathBuf::from(args.next().ok_or("--rekeyd needs a path")?));
                build = false;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    let full = only.is_none() && !quick && scale_credentials.is_none() && scale_secs.is_none();
    let sections = only.unwrap_or_else(|| SECTIONS.to_vec());
    let output = if no_write {
        None
    } else if output.is_some() {
        output
    } else if full {
        Some(repo_dir().join("BENCHMARKS.md"))
    } else {
        None
    };
    Ok(Plan {
        sections,
        idle: secs(if quick { 10 } else { 60 }),
        wrk: secs(if quick { 3 } else { 10 }),
        wrk_rounds: if quick { 1 } else { 3 },
        scale_credentials: scale_credentials.unwrap_or(if quick { 1_000 } else { 10_000 }),
        scale_run: secs(scale_secs.unwrap_or(if quick { 60 } else { 180 })),
        rotations: 1_000,
        outage: secs(if quick { 45 } else { 120 }),
        output,
        build,
        full: full && pin && rekeyd.is_none() && daemon_env.is_empty(),
        pin,
        rekeyd,
        daemon_env,
    })
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[rekeyd-bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------
// Results: one row per target, plus details per section.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    /// The target asks only for the number.
    Reported,
}

struct Row {
    target: String,
    goal: String,
    measured: String,
    verdict: Verdict,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    details: String,
}

impl Report {
    fn row(&mut self, target: &str, goal: &str, measured: String, verdict: Verdict) {
        log(format!("{target}: {measured} ({})", verdict_text(verdict)));
        self.rows.push(Row {
            target: target.to_string(),
            goal: goal.to_string(),
            measured,
            verdict,
        });
    }

    fn check(&mut self, target: &str, goal: &str, measured: String, ok: bool) {
        let verdict = if ok { Verdict::Met } else { Verdict::Missed };
        self.row(target, goal, measured, verdict);
    }

    fn detail(&mut self, heading: &str, body: &str) {
        let _ = write!(self.details, "### {heading}\n\n{body}\n");
    }
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "met",
        Verdict::Missed => "**missed**",
        Verdict::Reported => "reported",
    }
}

// ---------------------------------------------------------------------------
// The machine.
// ---------------------------------------------------------------------------

struct Machine {
    cpu: String,
    cores: usize,
    ram: String,
    kernel: String,
    os: String,
    rustc: String,
    commit: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into());
    let rustc = command_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    let commit = match command_line("git", &["rev-parse", "--short", "HEAD"]) {
        Some(c) => {
            let dirty = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .current_dir(repo_dir())
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if dirty {
                format!("{c} + local changes")
            } else {
                c
            }
        }
        None => "unknown".into(),
    };
    Machine {
        cpu,
        cores,
        ram,
        kernel,
        os,
        rustc,
        commit,
    }
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo_dir())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

// ---------------------------------------------------------------------------
// /proc readings of the daemon.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    rss_kib: u64,
    /// The parts of VmRSS: heap and stacks, and mapped files (our code).
    rss_anon_kib: u64,
    rss_file_kib: u64,
    hwm_kib: u64,
    threads: u64,
    /// utime + stime, in milliseconds (kernel clock-tick resolution).
    cpu_ms: u64,
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sample(pid: u32) -> io::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unexpected /proc/PID/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = tick(11) + tick(12);
    Ok(ProcSample {
        rss_kib: status_field(&status, "VmRSS:"),
        rss_anon_kib: status_field(&status, "RssAnon:"),
        rss_file_kib: status_field(&status, "RssFile:"),
        hwm_kib: status_field(&status, "VmHWM:"),
        threads: status_field(&status, "Threads:"),
        cpu_ms: ticks * 1000 / clock_ticks_per_second(),
    })
}

/// Context switches per live thread: how often each one woke up.
fn thread_switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("status")) {
                let n = status_field(&s, "voluntary_ctxt_switches:")
                    + status_field(&s, "nonvoluntary_ctxt_switches:");
                out.insert(task.file_name().to_string_lossy().into_owned(), n);
            }
        }
    }
    out
}

/// Wake-ups between two [`thread_switches`] of threads alive at the end.
fn wakeups(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n - before.get(tid).copied().unwrap_or(0).min(*n))
        .sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// The daemon as a child process, with a notify socket we own.
// ---------------------------------------------------------------------------

/// Receives the daemon's sd_notify datagrams; notes when READY=1 came.
struct NotifySocket {
    path: PathBuf,
    ready_at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Result<NotifySocket> {
        let socket = UnixDatagram::bind(&path)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let ready_at = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let ready_at = ready_at.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    // Drained all along, so the daemon never blocks on us.
                    if let Ok(n) = socket.recv(&mut buf) {
                        let now = Instant::now();
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.lines().any(|l| l == "READY=1") {
                            ready_at.lock().unwrap().get_or_insert(now);
                        }
                    }
                }
            })
        };
        Ok(NotifySocket {
            path,
            ready_at,
            stop,
            thread: Some(thread),
        })
    }

    fn ready_at(&self) -> Option<Instant> {
        *self.ready_at.lock().unwrap()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Daemon {
    child: std::process::Child,
    started: Instant,
    notify: NotifySocket,
    api: SocketAddr,
    key: String,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts `rekeyd run --config dir/rekeyd.toml` (already written) with
    /// NOTIFY_SOCKET pointing at a socket of ours.
    fn spawn(bin: &Path, dir: &Path, api: SocketAddr, key: &str) -> Result<Daemon> {
        Daemon::spawn_on(bin, dir, api, key, None)
    }

    /// [`Daemon::spawn`], restricted to `cpus` when given.
    fn spawn_on(
        bin: &Path,
        dir: &Path,
        api: SocketAddr,
        key: &str,
        cpus: Option<&[usize]>,
    ) -> Result<Daemon> {
        let notify = NotifySocket::bind(dir.join("notify.sock"))?;
        let log_path = dir.join("rekeyd.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(bin);
        if let Some(cpus) = cpus {
            let pin = affinity(cpus);
            // SAFETY: the closure only calls sched_setaffinity.
            unsafe { command.pre_exec(pin) };
        }
        let started = Instant::now();
        let child = command
            .arg("run")
            .arg("--config")
            .arg(dir.join("rekeyd.toml"))
            .env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", "info")
            .envs(DAEMON_ENV.get().into_iter().flatten().map(|(k, v)| (k, v)))
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("REKEYD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        Ok(Daemon {
            child,
            started,
            notify,
            api,
            key: key.to_string(),
            log_path,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn sample(&self) -> Result<ProcSample> {
        Ok(sample(self.pid())?)
    }

    /// Waits for READY=1; returns the time from spawn to READY=1.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.notify.ready_at() {
                return Ok(at - self.started);
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "rekeyd exited ({status}) before READY=1; log:\n{}",
                    tail(&self.log_path, 20)
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no READY=1 within {timeout:?}; log:\n{}",
                    tail(&self.log_path, 20)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// SIGTERM, then waits (SIGKILL after 15 s). Returns how long it took.
    async fn stop(mut self) -> Result<Duration> {
        let t = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    log(format!("rekeyd exited with {status}"));
                }
                return Ok(t.elapsed());
            }
            if t.elapsed() > secs(15) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("rekeyd did not stop within 15 s of SIGTERM".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log_path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `pre_exec` hook that restricts the child to `cpus`.
fn affinity(cpus: &[usize]) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes a bit of `set`; cpu < CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    move || {
        // SAFETY: sched_setaffinity on the calling (forked) process.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?)
}

/// A fresh world for a daemon: tempdir with secret files, API key and config.
struct Setup {
    dir: tempfile::TempDir,
    api: SocketAddr,
    key: String,
}

struct Cred {
    name: String,
    client_id: String,
}

/// Registers `n` clients with the sim and writes their bootstrap secrets
/// and a configuration for them.
fn write_setup(sim: &SimProvider, creds: &[Cred]) -> Result<Setup> {
    let dir = tempfile::Builder::new().prefix("rekeyd-bench-").tempdir()?;
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets)?;
    // All clients first: the sim re-homes existing secrets on add_client.
    for c in creds {
        sim.add_client(&c.client_id, &format!("cust-{}", c.name));
    }
    let api = free_port()?;
    let key = hex::encode(rand::random::<[u8; 32]>());
    let key_file = dir.path().join("api.key");
    rekeyd::fsutil::write_atomic(&key_file, format!("{key}\n").as_bytes(), 0o640)?;
    let mut toml = format!(
        "state_dir = \"{}\"\n\n[api]\nlisten = \"{api}\"\nkey_file = \"{}\"\n\n",
        dir.path().join("state").display(),
        key_file.display()
    );
    let token_url = sim.mapsindoors_token_url();
    for c in creds {
        let (_, value) = sim.add_secret(&c.client_id, "bench bootstrap secret");
        let file = secrets.join(format!("{}.secret", c.name));
        rekeyd::fsutil::write_atomic(&file, value.as_bytes(), 0o600)?;
        let _ = write!(
            toml,
            "[[credentials]]\nname = \"{}\"\nprovider = \"mapsindoors\"\nclient_id = \"{}\"\n\
             initial_secret_file = \"{}\"\n[credentials.endpoints]\ntoken_url = \"{token_url}\"\n\n",
            c.name,
            c.client_id,
            file.display()
        );
    }
    std::fs::write(dir.path().join("rekeyd.toml"), toml)?;
    Ok(Setup { dir, api, key })
}

fn creds(n: usize) -> Vec<Cred> {
    (0..n)
        .map(|i| Cred {
            name: format!("c{i:05}"),
            client_id: format!("client-{i:05}"),
        })
        .collect()
}

fn one_cred() -> Vec<Cred> {
    vec![Cred {
        name: "maps".into(),
        client_id: "maps-client".into(),
    }]
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(secs(10))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------
// binary: size and start to ready.
// ---------------------------------------------------------------------------

/// Whether an ELF file still has a symbol table (`.symtab`).
fn has_symtab(path: &Path) -> io::Result<bool> {
    let data = std::fs::read(path)?;
    let bad = || io::Error::other("not a 64-bit little-endian ELF file");
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
    let shoff = u64_at(0x28);
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    let shstrndx = u16_at(0x3e);
    if shoff == 0 || shoff + shnum * shentsize > data.len() || shstrndx >= shnum {
        return Err(bad());
    }
    let section = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(section(shstrndx) + 0x18);
    for i in 0..shnum {
        let name = strtab + u32_at(section(i));
        if data.get(name..name + 8) == Some(b".symtab\0") {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn bench_binary(bin: &Path, report: &mut Report) -> Result<()> {
    log("binary: size and start to READY=1");
    let size = std::fs::metadata(bin)?.len();
    let stripped = !has_symtab(bin)?;
    report.row(
        "Release binary size",
        "reported",
        format!(
            "{:.1} MiB ({} bytes, {})",
            size as f64 / 1024.0 / 1024.0,
            size,
            if stripped { "stripped" } else { "NOT stripped" }
        ),
        Verdict::Reported,
    );

    let sim = SimProvider::start(SimOptions {
        token_lifetime: secs(3600),
        ..SimOptions::default()
    })
    .await?;
    let setup = write_setup(&sim, &one_cred())?;
    // First start stores the bootstrap secret (fsync); later ones read it.
    let mut cold = Duration::ZERO;
    let mut warm = Vec::new();
    let mut stops = Vec::new();
    for i in 0..6 {
        let mut d = Daemon::spawn(bin, setup.dir.path(), setup.api, &setup.key)?;
        let ready = d.wait_ready(secs(30)).await?;
        stops.push(d.stop().await?);
        let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
        if i == 0 {
            cold = ready;
        } else {
            warm.push(ready);
        }
    }
    warm.sort();
    stops.sort();
    let median = warm[warm.len() / 2];
    report.row(
        "Start to ready (1 credential)",
        "reported",
        format!(
            "{} (first start, stores the bootstrap secret: {}); median of 5 later starts",
            ms(median),
            ms(cold)
        ),
        Verdict::Reported,
    );
    report.detail(
        "Binary and start-up",
        &format!(
            "- `target/release/rekeyd`: {size} bytes; `.symtab` {}.\n\
             - Start to `READY=1` (spawn of `rekeyd run` until the datagram reaches a \
             notify socket owned by the bench; includes one login against the sim on \
             loopback): first start {}, later starts {} (min {}, max {}).\n\
             - SIGTERM to exit: median {}.\n",
            if stripped {
                "absent (stripped)"
            } else {
                "present"
            },
            ms(cold),
            ms(median),
            ms(warm[0]),
            ms(*warm.last().unwrap()),
            ms(stops[stops.len() / 2]),
        ),
    );
    sim.shutdown().await;
    Ok(())
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.0} ms")
    }
}

// ---------------------------------------------------------------------------
// idle: one credential, 60 quiet seconds.
// ---------------------------------------------------------------------------

async fn bench_idle(bin: &Path, plan: &Plan, report: &mut Report) -> Result<()> {
    log(format!(
        "idle: one credential, {} s without a refresh",
        plan.idle.as_secs()
    ));
    // Refreshed at 70-80 % of an hour: never within the window.
    let sim = SimProvider::start(SimOptions {
        token_lifetime: secs(3600),
        ..SimOptions::default()
    })
    .await?;
    let setup = write_setup(&sim, &one_cred())?;
    let mut d = Daemon::spawn(bin, setup.dir.path(), setup.api, &setup.key)?;
    d.wait_ready(secs(30)).await?;
    // One token request and one readiness probe, as a consumer would.
    let client = http();
    let token = client
        .get(d.url("/v1/token/maps"))
        .header("X-Rekeyd-Key", &d.key)
        .send()
        .await?;
    if !token.status().is_success() {
        return Err(format!("GET /v1/token/maps: {}", token.status()).into());
    }
    drop(client);
    tokio::time::sleep(secs(2)).await;
    let logins_before = sim.stats().logins_ok;
    let before = d.sample()?;
    let switches_before = thread_switches(d.pid());
    tokio::time::sleep(plan.idle).await;
    let after = d.sample()?;
    let woke = wakeups(&switches_before, &thread_switches(d.pid()));
    let threads_before = switches_before.len();
    let logins = sim.stats().logins_ok - logins_before;
    d.stop().await?;
    sim.shutdown().await;

    let cpu = after.cpu_ms - before.cpu_ms;
    let rss = after.rss_kib.max(before.rss_kib);
    report.check(
        "Idle RSS, 1 credential after the first token",
        "≤ 10 MiB",
        format!("{:.1} MiB", mib(rss)),
        mib(rss) <= 10.0,
    );
    report.check(
        &format!("Idle CPU time over {} s", plan.idle.as_secs()),
        "< 50 ms",
        format!("{cpu} ms ({woke} wake-ups, {logins} logins)"),
        cpu < 50 && logins == 0,
    );
    report.detail(
        "Idle",
        &format!(
            "One MapsIndoors credential (sim token lifetime 1 h, so no refresh in the window), \
             API on TCP loopback, NOTIFY_SOCKET set (no watchdog). Measured from 2 s after \
             the first token was served.\n\n\
             - VmRSS {:.1} MiB at the start of the window, {:.1} MiB at its end ({:.1} MiB \
             anonymous: heap and stacks; {:.1} MiB file-backed: pages of the binary and shared \
             libraries); VmHWM {:.1} MiB; {threads_before} threads at the start, {} at the end.\n\
             - utime+stime over {} s: {cpu} ms (clock-tick resolution: {} ms); context switches \
             of the threads alive at the end: {woke}; logins during the window: {logins}.\n",
            mib(before.rss_kib),
            mib(after.rss_kib),
            mib(after.rss_anon_kib),
            mib(after.rss_file_kib),
            mib(after.hwm_kib),
            after.threads,
            plan.idle.as_secs(),
            1000 / clock_ticks_per_second(),
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// api: wrk against rekeyd and against nginx.
// ---------------------------------------------------------------------------

/// Installs wrk and nginx from Debian if missing (as root), or says how.
fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = [("wrk", "wrk"), ("nginx", "nginx")]
        .into_iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let how = format!("apt-get install -y {}", missing.join(" "));
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "missing {}; install them with: sudo {how}",
            missing.join(", ")
        )
        .into());
    }
    log(format!("installing {} with apt-get", missing.join(" ")));
    let ok = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    if !(ok(&["update", "-qq"]) && ok(&install)) {
        return Err(format!("could not install {}; try: {how}", missing.join(", ")).into());
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

#[derive(Clone, Debug, Default)]
struct WrkResult {
    rps: f64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    requests: u64,
    errors: u64,
    /// Server CPU time during the run.
    cpu_ms: u64,
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (num, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))?;
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(v * factor))
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse()?,
            ["50%", v] => r.p50 = parse_duration(v).ok_or("wrk p50")?,
            ["90%", v] => r.p90 = parse_duration(v).ok_or("wrk p90")?,
            ["99%", v] => r.p99 = parse_duration(v).ok_or("wrk p99")?,
            ["Latency", _avg, _stdev, max, _] => r.max = parse_duration(max).unwrap_or_default(),
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if r.rps == 0.0 {
        return Err(format!("could not read wrk's output:\n{out}").into());
    }
    Ok(r)
}

async fn wrk(
    url: &str,
    key: &str,
    duration: Duration,
    threads: usize,
    cpus: Option<&[usize]>,
) -> Result<WrkResult> {
    // The API key goes to wrk in a script file (0600, removed afterwards),
    // never on its command line, where any local user could read it.
    let mut script = tempfile::Builder::new()
        .prefix("rekeyd-bench-wrk-")
        .suffix(".lua")
        .tempfile()?;
    {
        use std::io::Write as _;
        writeln!(script, "wrk.headers[\"X-Rekeyd-Key\"] = [==[{key}]==]")?;
        script.flush()?;
    }
    let mut command = tokio::process::Command::new("wrk");
    if let Some(cpus) = cpus {
        let pin = affinity(cpus);
        // SAFETY: the closure only calls sched_setaffinity.
        unsafe { command.pre_exec(pin) };
    }
    let out = command
        .args([
            &format!("-t{threads}"),
            "-c64",
            &format!("-d{}s", duration.as_secs()),
            "--latency",
        ])
        .arg("-s")
        .arg(script.path())
        .arg(url)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("wrk failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    parse_wrk(&text)
}

struct Nginx {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Nginx {
    async fn start(body_len: usize, cpus: &[usize]) -> Result<Nginx> {
        let workers = cpus.len();
        let dir = tempfile::Builder::new()
            .prefix("rekeyd-bench-nginx-")
            .tempdir()?;
        // nginx's workers run as an unprivileged user when started as root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let www = dir.path().join("www");
        std::fs::create_dir(&www)?;
        std::fs::set_permissions(&www, std::fs::Permissions::from_mode(0o755))?;
        let file = www.join("token.json");
        let mut body = String::from("{\"pad\":\"");
        while body.len() + 2 < body_len {
            body.push('x');
        }
        body.push_str("\"}");
        std::fs::write(&file, &body)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let addr = free_port()?;
        let d = dir.path().display();
        let conf = format!(
            "worker_processes {workers};\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               keepalive_requests 1000000;\n\
               keepalive_timeout 65s;\n\
               server {{\n\
                 listen {addr}{reuseport};\n\
                 location = /token.json {{\n\
                   root {www};\n\
                   default_type application/json;\n\
                   add_header Cache-Control no-store;\n\
                 }}\n\
               }}\n\
             }}\n",
            www = www.display(),
            // One listening socket per worker: connections are spread evenly.
            reuseport = if workers > 1 { " reuseport" } else { "" },
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut command = tokio::process::Command::new(which("nginx").ok_or("nginx not found")?);
        let pin = affinity(cpus);
        // SAFETY: the closure only calls sched_setaffinity.
        unsafe { command.pre_exec(pin) };
        let child = command
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://{addr}/token.json");
        let client = http();
        let deadline = Instant::now() + secs(10);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                let got = r.bytes().await?.len();
                if got != body_len {
                    return Err(format!("nginx serves {got} bytes, expected {body_len}").into());
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx did not answer on {addr}; its log:\n{}",
                    tail(&dir.path().join("error.log"), 10)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Nginx {
            child,
            _dir: dir,
            url,
        })
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGQUIT: graceful stop of master and workers.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGQUIT);
            }
        }
        if tokio::time::timeout(secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn bench_api(bin: &Path, plan: &Plan, report: &mut Report) -> Result<()> {
    ensure_tools()?;
    log("api: wrk against rekeyd and nginx");
    let sim = SimProvider::start(SimOptions {
        token_lifetime: secs(3600),
        ..SimOptions::default()
    })
    .await?;
    let setup = write_setup(&sim, &one_cred())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Pinned: wrk on the first half of the cores, the server on the rest,
    // so the load generator never takes CPU from the server under test.
    let pinned = plan.pin && cores >= 2;
    let all_cpus: Vec<usize> = (0..cores).collect();
    let (load_cpus, server_cpus) = if pinned {
        all_cpus.split_at(cores / 2)
    } else {
        (&all_cpus[..], &all_cpus[..])
    };
    let load = pinned.then_some(load_cpus);
    let mut d = Daemon::spawn_on(
        bin,
        setup.dir.path(),
        setup.api,
        &setup.key,
        pinned.then_some(server_cpus),
    )?;
    d.wait_ready(secs(30)).await?;
    let url = d.url("/v1/token/maps");
    let body = http()
        .get(&url)
        .header("X-Rekeyd-Key", &d.key)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let rekeyd_threads = d.sample()?.threads;
    let workers = server_cpus.len();
    let nginx = Nginx::start(body.len(), server_cpus).await?;

    // One wrk thread per core it may use (two when it shares all cores).
    let threads = if pinned { load_cpus.len() } else { 2 };
    let warm = secs(2);
    let nginx_pid = nginx.child.id().ok_or("nginx exited")?;
    wrk(&url, &d.key, warm, threads, load).await?;
    wrk(&nginx.url, &d.key, warm, threads, load).await?;
    // Interleaved rounds; the medians are reported.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..plan.wrk_rounds {
        let cpu = d.sample()?.cpu_ms;
        let mut r = wrk(&url, &d.key, plan.wrk, threads, load).await?;
        r.cpu_ms = d.sample()?.cpu_ms - cpu;
        ours.push(r);
        let cpu = tree_cpu_ms(nginx_pid);
        let mut r = wrk(&nginx.url, &d.key, plan.wrk, threads, load).await?;
        r.cpu_ms = tree_cpu_ms(nginx_pid) - cpu;
        theirs.push(r);
    }
    let after = d.sample()?;
    nginx.stop().await;
    d.stop().await?;
    sim.shutdown().await;

    let median = |runs: &[WrkResult], key: fn(&WrkResult) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(key).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rps = |r: &WrkResult| r.rps;
    let p99 = |r: &WrkResult| r.p99.as_secs_f64();
    let (our_rps, their_rps) = (median(&ours, rps), median(&theirs, rps));
    let (our_p99, their_p99) = (
        Duration::from_secs_f64(median(&ours, p99)),
        Duration::from_secs_f64(median(&theirs, p99)),
    );
    let errors: u64 = ours.iter().map(|r| r.errors).sum();
    let ratio = our_rps / their_rps;
    let rounds = if plan.wrk_rounds > 1 {
        format!(", medians of {} runs", plan.wrk_rounds)
    } else {
        String::new()
    };
    report.check(
        "Token API throughput vs nginx (64 connections)",
        "≥ 60 % of nginx",
        format!(
            "{:.0} % ({our_rps:.0} req/s vs nginx {their_rps:.0} req/s{rounds})",
            ratio * 100.0,
        ),
        ratio >= 0.6 && errors == 0,
    );
    report.check(
        "Token API p99 latency",
        "≤ 2 ms",
        format!("{} (nginx {}{rounds})", ms(our_p99), ms(their_p99)),
        our_p99 <= Duration::from_millis(2),
    );
    let mut table = String::from(
        "| server | run | req/s | p50 | p90 | p99 | max | errors | server CPU per request |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let version = nginx_version();
    for (server, runs) in [("rekeyd", &ours), (&*format!("nginx {version}"), &theirs)] {
        for (i, r) in runs.iter().enumerate() {
            let _ = writeln!(
                table,
                "| {server} | {} | {:.0} | {} | {} | {} | {} | {} | {:.1} µs |",
                i + 1,
                r.rps,
                ms(r.p50),
                ms(r.p90),
                ms(r.p99),
                ms(r.max),
                r.errors,
                per_request_us(r.cpu_ms, r.requests),
            );
        }
    }
    report.detail(
        "Token API",
        &format!(
            "`wrk -t{threads} -c64 -d{}s --latency -s key.lua` (the script sets `X-Rekeyd-Key`), after a 2 s warm-up of \
             each, against `GET /v1/token/maps` and against nginx ({workers} worker processes, \
             access log off, keep-alive unlimited) serving a static `application/json` file of \
             the same size ({} bytes) with the same `Cache-Control: no-store`; {} rounds, \
             alternating. rekeyd had {rekeyd_threads} threads. {}\n\n{table}\n\
             rekeyd's VmRSS after the load: {:.1} MiB (peak {:.1} MiB).\n",
            plan.wrk.as_secs(),
            body.len(),
            plan.wrk_rounds,
            if pinned {
                format!(
                    "Pinned with sched_setaffinity: wrk on CPU {load_cpus:?}, each server on CPU \
                     {server_cpus:?}."
                )
            } else {
                format!("Nothing pinned: wrk and the server share the {cores} cores.")
            },
            mib(after.rss_kib),
            mib(after.hwm_kib),
        ),
    );
    Ok(())
}

fn per_request_us(cpu_ms: u64, requests: u64) -> f64 {
    cpu_ms as f64 * 1000.0 / requests.max(1) as f64
}

/// CPU time of a process and its children (nginx: master and workers).
fn tree_cpu_ms(pid: u32) -> u64 {
    let mut total = sample(pid).map_or(0, |s| s.cpu_ms);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(')')?.1.to_string();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(pid) {
                total += sample(child).map_or(0, |s| s.cpu_ms);
            }
        }
    }
    total
}

fn nginx_version() -> String {
    // nginx prints its version on stderr.
    Command::new(which("nginx").unwrap_or_else(|| "nginx".into()))
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .split('/')
                .nth(1)
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// scale: 10,000 credentials, 60 s tokens, 3 minutes.
// ---------------------------------------------------------------------------

async fn bench_scale(bin: &Path, plan: &Plan, report: &mut Report) -> Result<()> {
    let n = plan.scale_credentials;
    log(format!(
        "scale: {n} credentials, 60 s tokens, {} s",
        plan.scale_run.as_secs()
    ));
    let sim = Arc::new(
        SimProvider::start(SimOptions {
            token_lifetime: secs(60),
            ..SimOptions::default()
        })
        .await?,
    );
    let all = creds(n);
    let setup = write_setup(&sim, &all)?;
    let mut d = Daemon::spawn(bin, setup.dir.path(), setup.api, &setup.key)?;
    let started = d.started;

    // All tokens obtained: the sim has issued one per credential.
    let mut all_logged_in = None;
    let mut peak_rss = 0u64;
    let deadline = started + secs(120);
    while all_logged_in.is_none() {
        if sim.stats().logins_ok >= n as u64 {
            all_logged_in = Some(started.elapsed());
        } else if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} tokens after 120 s; log:\n{}",
                sim.stats().logins_ok,
                tail(&d.log_path, 10)
            )
            .into());
        }
        if let Some(status) = d.child.try_wait()? {
            return Err(format!("rekeyd exited: {status}\n{}", tail(&d.log_path, 20)).into());
        }
        if let Ok(s) = d.sample() {
            peak_rss = peak_rss.max(s.rss_kib);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_logged_in = all_logged_in.unwrap();
    let ready = d.wait_ready(secs(60)).await?;
    let client = http();
    let mut readyz_at = None;
    while readyz_at.is_none() {
        let ok = client
            .get(d.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            readyz_at = Some(started.elapsed());
        } else if started.elapsed() > secs(120) {
            return Err("/readyz not 200 within 120 s".into());
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let readyz_at = readyz_at.unwrap();
    let at_ready = d.sample()?;
    let logins_at_ready = sim.stats().logins_ok;
    log(format!(
        "scale: {n} tokens after {}, READY=1 after {}, /readyz 200 after {}",
        ms(all_logged_in),
        ms(ready),
        ms(readyz_at)
    ));

    // Sampling until the end of the run: every second, /readyz and the
    // token of random credentials, checked against the sim.
    const PER_SECOND: usize = 50;
    let mut samples = 0u64;
    let mut bad = Vec::new();
    let mut readyz_ok = 0u64;
    let mut readyz_checks = 0u64;
    let mut min_expires_in = u64::MAX;
    let end = started + plan.scale_run;
    let mut next = Instant::now();
    while Instant::now() < end {
        next += secs(1);
        readyz_checks += 1;
        match client.get(d.url("/readyz")).send().await {
            Ok(r) if r.status().is_success() => readyz_ok += 1,
            Ok(r) => bad.push(format!("/readyz: {}", r.status())),
            Err(e) => bad.push(format!("/readyz: {e}")),
        }
        let picks: Vec<usize> = {
            let mut rng = rand::rng();
            (0..PER_SECOND).map(|_| rng.random_range(0..n)).collect()
        };
        for i in picks {
            samples += 1;
            let c = &all[i];
            let r = client
                .get(d.url(&format!("/v1/token/{}", c.name)))
                .header("X-Rekeyd-Key", &d.key)
                .send()
                .await;
            let body: serde_json::Value = match r {
                Ok(r) if r.status().is_success() => serde_json::from_slice(&r.bytes().await?)?,
                Ok(r) => {
                    bad.push(format!("{}: HTTP {}", c.name, r.status()));
                    continue;
                }
                Err(e) => {
                    bad.push(format!("{}: {e}", c.name));
                    continue;
                }
            };
            let expires_in = body["expires_in"].as_u64().unwrap_or(0);
            min_expires_in = min_expires_in.min(expires_in);
            let token = body["access_token"].as_str().unwrap_or_default();
            let valid_at_sim = sim.token_client(token).as_deref() == Some(c.client_id.as_str());
            if expires_in == 0 || !valid_at_sim {
                bad.push(format!(
                    "{}: expires_in {expires_in}, valid at the provider: {valid_at_sim}",
                    c.name
                ));
            }
        }
        if let Ok(s) = d.sample() {
            peak_rss = peak_rss.max(s.rss_kib);
        }
        if let Some(status) = d.child.try_wait()? {
            return Err(format!("rekeyd exited: {status}\n{}", tail(&d.log_path, 20)).into());
        }
        tokio::time::sleep_until(next.into()).await;
    }
    let end_sample = d.sample()?;
    let stats = sim.stats();
    // What the sampling cost the daemon: the same requests again, back to
    // back; refreshes meanwhile are taken out at the gross rate.
    const PROBE_ROUNDS: u64 = 30;
    let probe_logins = sim.stats().logins_ok;
    let probe_cpu = d.sample()?.cpu_ms;
    for _ in 0..PROBE_ROUNDS {
        let _ = client.get(d.url("/readyz")).send().await?.bytes().await?;
        for i in 0..PER_SECOND {
            let _ = client
                .get(d.url(&format!("/v1/token/{}", all[(i * 7919) % n].name)))
                .header("X-Rekeyd-Key", &d.key)
                .send()
                .await?
                .bytes()
                .await?;
        }
    }
    let probe_cpu = d.sample()?.cpu_ms - probe_cpu;
    let probe_refreshes = sim.stats().logins_ok - probe_logins;
    let log_lines = d.log_lines();
    let stop = d.stop().await?;
    let sim_rejected = stats.logins_rejected;
    drop(sim);

    let logins = stats.logins_ok;
    let steady_logins = logins - logins_at_ready;
    let steady_cpu = end_sample.cpu_ms - at_ready.cpu_ms;
    let per_refresh_us = |cpu_ms: u64, count: u64| cpu_ms as f64 * 1000.0 / count.max(1) as f64;
    let peak = end_sample.hwm_kib.max(peak_rss);
    let within = Duration::from_secs(30);
    let gross = per_refresh_us(steady_cpu, steady_logins);
    let sampling_per_second_us =
        (probe_cpu as f64 * 1000.0 - probe_refreshes as f64 * gross).max(0.0) / PROBE_ROUNDS as f64;
    let sampling_ms = (sampling_per_second_us * readyz_checks as f64 / 1000.0).round() as u64;
    let net = per_refresh_us(steady_cpu.saturating_sub(sampling_ms), steady_logins);
    report.check(
        &format!("Scale: all {n} tokens obtained"),
        "≤ 30 s after start",
        format!(
            "{:.1} s (READY=1 {:.1} s, /readyz 200 {:.1} s)",
            all_logged_in.as_secs_f64(),
            ready.as_secs_f64(),
            readyz_at.as_secs_f64()
        ),
        readyz_at <= within && all_logged_in <= within,
    );
    report.check(
        &format!(
            "Scale: expired tokens served over {} s",
            plan.scale_run.as_secs()
        ),
        "0",
        format!(
            "{} bad of {samples} sampled tokens; /readyz 200 in {readyz_ok}/{readyz_checks} checks",
            bad.len()
        ),
        bad.is_empty() && readyz_ok == readyz_checks,
    );
    report.check(
        &format!("Scale: resident memory, {n} credentials"),
        "≤ 100 MiB",
        format!(
            "{:.1} MiB peak ({:.1} MiB at the end)",
            mib(peak),
            mib(end_sample.rss_kib)
        ),
        mib(peak) <= 100.0,
    );
    report.row(
        "Scale: CPU time per refresh",
        "reported",
        format!(
            "{net:.0} µs ({steady_cpu} ms for {steady_logins} refreshes after start-up, less \
             {sampling_ms} ms for the bench's sampling requests; {gross:.0} µs with them)"
        ),
        Verdict::Reported,
    );
    let mut detail = format!(
        "{n} MapsIndoors credentials in one `rekeyd run` (no token files, no rotation), sim \
         token lifetime 60 s, fresh state directory (the first start stores {n} bootstrap \
         secrets), NOTIFY_SOCKET set, log at info to a file. Run for {} s from the start.\n\n\
         - Start-up: {n} tokens issued by the sim after {}; READY=1 after {}; `/readyz` 200 \
         after {}. VmRSS at that point {:.1} MiB, CPU time {} ms ({:.0} µs per credential).\n\
         - Checks from then to the end: every second `/readyz` ({readyz_ok}/{readyz_checks} \
         were 200) and `GET /v1/token/{{random name}}` for {PER_SECOND} random credentials \
         ({samples} samples; each must be 200 with `expires_in` > 0 and a token the sim still \
         honours for that client). Smallest `expires_in` seen: {} s. Problems: {}.\n\
         - Logins: {logins} in all ({steady_logins} refreshes after start-up); the sim refused \
         {sim_rejected}.\n\
         - CPU (utime+stime): {} ms in all, {steady_cpu} ms after start-up = {gross:.0} µs per \
         refresh with the sampling requests above. Those requests, repeated {PROBE_ROUNDS} times \
         back to back at the end, cost {probe_cpu} ms ({probe_refreshes} refreshes meanwhile): \
         {:.1} ms per second of sampling, {sampling_ms} ms over the run, leaving {net:.0} µs per \
         refresh.\n\
         - Memory: VmRSS {:.1} MiB at the end, VmHWM {:.1} MiB; {} threads.\n\
         - Log: {log_lines} lines. Stop (SIGTERM to exit): {}.\n",
        plan.scale_run.as_secs(),
        ms(all_logged_in),
        ms(ready),
        ms(readyz_at),
        mib(at_ready.rss_kib),
        at_ready.cpu_ms,
        per_refresh_us(at_ready.cpu_ms, n as u64),
        if min_expires_in == u64::MAX {
            "none".to_string()
        } else {
            min_expires_in.to_string()
        },
        if bad.is_empty() {
            "none".to_string()
        } else {
            bad.len().to_string()
        },
        end_sample.cpu_ms,
        sampling_per_second_us / 1000.0,
        mib(end_sample.rss_kib),
        mib(end_sample.hwm_kib),
        end_sample.threads,
        ms(stop),
    );
    for b in bad.iter().take(10) {
        let _ = writeln!(detail, "  - {b}");
    }
    report.detail("Scale", &detail);
    Ok(())
}

// ---------------------------------------------------------------------------
// rotation: 1,000 at once, in-process, with a timed file store.
// ---------------------------------------------------------------------------

/// A [`FileStore`] that adds up the time spent in each operation.
struct TimedStore {
    inner: FileStore,
    writes: Counter,
    probes: Counter,
    claims: Counter,
    loads: Counter,
}

#[derive(Default)]
struct Counter {
    nanos: AtomicU64,
    count: AtomicU64,
}

impl Counter {
    fn add(&self, since: Instant) {
        self.nanos
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn total(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.nanos.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
    }
}

impl TimedStore {
    fn reset(&self) {
        for c in [&self.writes, &self.probes, &self.claims, &self.loads] {
            c.reset();
        }
    }
}

impl Store for TimedStore {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Claim>>, StoreError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.claim(name, wait).await;
            self.claims.add(t);
            r
        })
    }

    fn check_writable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.check_writable(name).await;
            self.probes.add(t);
            r
        })
    }

    fn load<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.load(name).await;
            self.loads.add(t);
            r
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let t = Instant::now();
            let r = self.inner.compare_and_swap(name, expected, record).await;
            self.writes.add(t);
            r
        })
    }

    // The history is part of a rotation's cost: passed through, counted
    // in the run's wall time.
    fn keeps_history(&self) -> bool {
        self.inner.keeps_history()
    }

    fn history_limit(&self) -> usize {
        self.inner.history_limit()
    }

    fn load_history<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<Vec<u8>>>, StoreError>> {
        self.inner.load_history(name)
    }

    fn swap_history<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.swap_history(name, expected, bytes)
    }
}

struct RotationRun {
    label: String,
    wall: Duration,
    latencies: Vec<Duration>,
    writes: Duration,
    write_count: u64,
    probes: Duration,
    claims: Duration,
    loads: Duration,
    provider_requests: u64,
}

/// Sets up `n` MapsIndoors credentials (one customer each) with bootstrap
/// records in a store under `base`, then rotates them: all at once when
/// `concurrent`, else one after the other.
async fn rotation_run(
    label: &str,
    base: &Path,
    n: usize,
    latency: Duration,
    concurrent: bool,
) -> Result<RotationRun> {
    let sim = SimProvider::start(SimOptions {
        token_lifetime: secs(3600),
        ..SimOptions::default()
    })
    .await?;
    let dir = tempfile::Builder::new()
        .prefix("rekeyd-bench-rotation-")
        .tempdir_in(base)?;
    let store = Arc::new(TimedStore {
        inner: FileStore::new(dir.path()),
        writes: Counter::default(),
        probes: Counter::default(),
        claims: Counter::default(),
        loads: Counter::default(),
    });
    let all = creds(n);
    let mut toml = format!("state_dir = \"{}\"\n", dir.path().display());
    for c in &all {
        sim.add_client(&c.client_id, &format!("cust-{}", c.name));
    }
    for c in &all {
        let (id, value) = sim.add_secret(&c.client_id, "bench bootstrap secret");
        let record = CredentialRecord::new(SecretEntry {
            id: Some(id),
            value: SecretString::from(value),
            created_at: SystemTime::now(),
            expires_at: None,
        });
        store.compare_and_swap(&c.name, None, &record).await?;
        let _ = write!(
            toml,
            "[[credentials]]\nname = \"{}\"\nprovider = \"mapsindoors\"\nclient_id = \"{}\"\n\
             customer_id = \"cust-{}\"\ninitial_secret_file = \"/nonexistent/{}.secret\"\n\
             [credentials.endpoints]\ntoken_url = \"{}\"\nsecrets_url = \"{}\"\n\
             [credentials.rotation]\nevery = \"24h\"\ngrace = \"0s\"\n",
            c.name,
            c.client_id,
            c.name,
            c.name,
            sim.mapsindoors_token_url(),
            sim.mapsindoors_secrets_url()
        );
    }
    let config = Config::from_toml(&toml)?;
    let clients = HttpClients::default();
    let mut rotators = Vec::with_capacity(n);
    for cred in &config.credentials {
        rotators.push(Arc::new(Rotator {
            name: cred.name.clone(),
            client_id: cred.client_id.clone(),
            provider: rekeyd::provider::build_with(cred, &clients)?,
            secret_api: rekeyd::provider::build_secret_api_with(cred, &clients)?
                .ok_or("no secret API")?,
            secret_api_bearer: None,
            store: store.clone(),
            grace: Duration::ZERO,
            verify_window: secs(60),
            status: None,
            refresh_now: None,
            clock: rekeyd::rotation::driver::system_clock(),
        }));
    }
    if !latency.is_zero() {
        sim.set_faults(Faults {
            latency: Some((latency, latency)),
            ..Faults::default()
        });
    }
    store.reset();
    let requests_before: u64 = sim.stats().requests.values().sum();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    if concurrent {
        let mut set = tokio::task::JoinSet::new();
        for r in rotators {
            let shutdown = shutdown.clone();
            set.spawn(async move {
                let t = Instant::now();
                let outcome = r.rotate(true, true, &shutdown).await;
                (outcome, t.elapsed())
            });
        }
        while let Some(joined) = set.join_next().await {
            let (outcome, took) = joined?;
            if outcome? != Outcome::Rotated {
                return Err("a rotation did not complete".into());
            }
            latencies.push(took);
        }
    } else {
        for r in rotators {
            let t = Instant::now();
            if r.rotate(true, true, &shutdown).await? != Outcome::Rotated {
                return Err("a rotation did not complete".into());
            }
            latencies.push(t.elapsed());
        }
    }
    let wall = started.elapsed();
    let stats = sim.stats();
    let provider_requests = stats.requests.values().sum::<u64>() - requests_before;
    // Every client is left with exactly one secret: the new one.
    for c in &all {
        let left = sim.secrets(&c.client_id);
        if left.len() != 1 || !left[0].description.starts_with("rekeyd:") {
            return Err(format!("{}: {} secrets left after rotation", c.name, left.len()).into());
        }
    }
    sim.shutdown().await;
    latencies.sort();
    Ok(RotationRun {
        label: label.to_string(),
        wall,
        latencies,
        writes: store.writes.total(),
        write_count: store.writes.count(),
        probes: store.probes.total(),
        claims: store.claims.total(),
        loads: store.loads.total(),
        provider_requests,
    })
}

/// A tmpfs mount to compare with the disk, if there is one.
fn tmpfs_dir() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "tmpfs").then(|| PathBuf::from(f[1]))
        })
        .find(|p| p == Path::new("/dev/shm") || p == Path::new("/run/user"))
        .filter(|p| {
            tempfile::Builder::new()
                .prefix("rekeyd-bench-probe-")
                .tempdir_in(p)
                .is_ok()
        })
}

fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && path.starts_with(f[1]))
                .then(|| (f[1].len(), f[2].to_string(), f[0].to_string()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, t, dev)| format!("{t} on {dev}"))
        .unwrap_or_else(|| "unknown".into())
}

async fn bench_rotation(plan: &Plan, report: &mut Report) -> Result<()> {
    let n = plan.rotations;
    let disk = std::env::temp_dir();
    let latency = Duration::from_millis(50);
    log(format!("rotation: store in {}", disk.display()));
    let alone = rotation_run("disk, one at a time (20)", &disk, 20, Duration::ZERO, false).await?;
    let at_once = rotation_run(
        &format!("disk, {n} at once"),
        &disk,
        n,
        Duration::ZERO,
        true,
    )
    .await?;
    let tmpfs = tmpfs_dir();
    let on_tmpfs = match &tmpfs {
        Some(t) => {
            log(format!(
                "rotation: {n} at once, store on tmpfs {}",
                t.display()
            ));
            Some(rotation_run(&format!("tmpfs, {n} at once"), t, n, Duration::ZERO, true).await?)
        }
        None => None,
    };
    log("rotation: provider latency 50 ms");
    let slow_alone = rotation_run(
        "disk, one at a time (10), provider latency 50 ms",
        &disk,
        10,
        latency,
        false,
    )
    .await?;
    let slow_at_once = rotation_run(
        &format!("disk, {n} at once, provider latency 50 ms"),
        &disk,
        n,
        latency,
        true,
    )
    .await?;

    let per = |d: Duration, count: usize| d / count.max(1) as u32;
    let median = |r: &RotationRun| r.latencies[r.latencies.len() / 2];
    let requests_each = slow_alone.provider_requests / slow_alone.latencies.len() as u64;
    let writes_each = alone.write_count / alone.latencies.len() as u64;
    let beyond = median(&slow_alone).saturating_sub(latency * requests_each as u32);
    let tmpfs_text = match &on_tmpfs {
        Some(t) => format!(
            "; on tmpfs {:.2} s ({} per rotation): the disk's fsyncs cost {} per rotation",
            t.wall.as_secs_f64(),
            ms(per(t.wall, n)),
            ms(per(at_once.wall.saturating_sub(t.wall), n)),
        ),
        None => String::new(),
    };
    report.row(
        &format!("Rotation: {n} credentials at once (file store)"),
        "reported",
        format!(
            "{:.2} s on disk ({} per rotation){tmpfs_text}; with 50 ms provider latency {:.2} s",
            at_once.wall.as_secs_f64(),
            ms(per(at_once.wall, n)),
            slow_at_once.wall.as_secs_f64(),
        ),
        Verdict::Reported,
    );
    report.row(
        "Rotation: one rotation beyond the provider's latency",
        "reported",
        format!(
            "{} ({requests_each} requests at 50 ms excluded); alone at latency 0: {}, of which \
             store writes ({} fsynced) {}",
            ms(beyond),
            ms(median(&alone)),
            writes_each + 1,
            ms(per(alone.writes + alone.probes, alone.latencies.len())),
        ),
        Verdict::Reported,
    );
    let mut table = String::from(
        "| run | wall | per rotation (wall / n) | rotation latency p50 / p99 | store writes per rotation | of which the probe | lock + reads per rotation | journal writes | provider requests |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut runs = vec![&alone, &at_once];
    runs.extend(on_tmpfs.as_ref());
    runs.extend([&slow_alone, &slow_at_once]);
    for r in runs {
        let count = r.latencies.len();
        let _ = writeln!(
            table,
            "| {} | {:.2} s | {} | {} / {} | {} | {} | {} | {} | {} |",
            r.label,
            r.wall.as_secs_f64(),
            ms(per(r.wall, count)),
            ms(r.latencies[count / 2]),
            ms(r.latencies[(count * 99 / 100).min(count - 1)]),
            ms(per(r.writes + r.probes, count)),
            ms(per(r.probes, count)),
            ms(per(r.claims + r.loads, count)),
            r.write_count,
            r.provider_requests,
        );
    }
    report.detail(
        "Rotation",
        &format!(
            "In-process `Rotator`s (as the daemon builds them, sharing one HTTP client) with a \
             `FileStore` wrapped to time each call, against the sim (propagation delay 0, grace \
             0). A rotation is: claim, load, a write probe (64 KiB, fsync), {writes_each} \
             journal writes (temp file, fsync, rename, directory fsync) and {requests_each} \
             provider requests (a bearer login, create, a login with the new secret, one more \
             after the grace period whose token also serves the listing and the delete, list, \
             delete). Store times are wall time inside the \
             store calls, so with {n} at once they include waiting for the disk. Disk: {}; \
             tmpfs: {}.\n\n{table}\n\
             One rotation alone with 50 ms of provider latency per request takes {} beyond its \
             {requests_each} requests' own latency. {n} at once are bound by the disk: on tmpfs \
             the same run takes {}.\n",
            fs_type(&disk),
            tmpfs
                .as_deref()
                .map_or("not available".to_string(), fs_type),
            ms(beyond),
            on_tmpfs
                .as_ref()
                .map_or("(no tmpfs)".to_string(), |t| format!(
                    "{:.2} s",
                    t.wall.as_secs_f64()
                )),
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// outage: many credentials, one endpoint, down for a while.
// ---------------------------------------------------------------------------

/// Polls `/readyz` every 50 ms until it answers 200; the time that took.
async fn until_ready(client: &reqwest::Client, d: &Daemon, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let ok = client
            .get(d.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!("/readyz not 200 within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bench_outage(bin: &Path, plan: &Plan, report: &mut Report) -> Result<()> {
    const CREDENTIALS: usize = 200;
    const LIFETIME: Duration = Duration::from_secs(30);
    const BUCKET: Duration = Duration::from_millis(100);
    let outage = plan.outage;
    log(format!(
        "outage: {CREDENTIALS} credentials, {} s tokens, token endpoint down for {} s",
        LIFETIME.as_secs(),
        outage.as_secs()
    ));
    let sim = SimProvider::start(SimOptions {
        token_lifetime: LIFETIME,
        ..SimOptions::default()
    })
    .await?;
    let setup = write_setup(&sim, &creds(CREDENTIALS))?;
    let mut d = Daemon::spawn(bin, setup.dir.path(), setup.api, &setup.key)?;
    d.wait_ready(secs(60)).await?;
    let client = http();
    until_ready(&client, &d, secs(60)).await?;
    tokio::time::sleep(secs(2)).await;

    // Every token request fails (500/502/503, nothing performed) from now
    // on; the tokens obtained at start run out meanwhile.
    let requests = || sim.stats().requests_to(Endpoint::MapsIndoorsToken);
    sim.set_faults(Faults {
        scope: FaultScope::Token,
        random_5xx: 1.0,
        ..Faults::default()
    });
    let down_at = Instant::now();
    let at_start = requests();
    // Token requests per 100 ms, sampled on the bench's clock.
    let mut buckets: Vec<(Duration, u64)> = Vec::new();
    let mut tick = tokio::time::interval(BUCKET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = at_start;
    while down_at.elapsed() < outage {
        tick.tick().await;
        let now = requests();
        buckets.push((down_at.elapsed(), now - last));
        last = now;
        if let Some(status) = d.child.try_wait()? {
            return Err(format!("rekeyd exited: {status}\n{}", tail(&d.log_path, 20)).into());
        }
    }
    sim.set_faults(Faults::default());
    let during = requests() - at_start;
    let all_valid = until_ready(&client, &d, secs(600)).await?;
    let after = requests() - at_start - during;
    let log_lines = d.log_lines();
    d.stop().await?;
    sim.shutdown().await;

    let busiest = buckets.iter().max_by_key(|(_, n)| *n).copied();
    let (busiest_at, busiest_n) = busiest.unwrap_or_default();
    let mean = during as f64 / buckets.len().max(1) as f64;
    // The start-up tokens were all issued before `/readyz` turned 200, two
    // seconds before the outage began, within a few seconds of each other:
    // they expired in the few seconds before `expiry`.
    let expiry = LIFETIME.saturating_sub(secs(2));
    let near_expiry = buckets
        .iter()
        .filter(|(at, _)| *at <= expiry && expiry - *at <= secs(5))
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    report.row(
        &format!("Outage: retry spread, {CREDENTIALS} credentials on one endpoint"),
        "reported",
        format!(
            "at most {busiest_n} token requests per 100 ms (at {:.1} s; mean {mean:.1}; \
             at most {near_expiry} in the 5 s before the tokens expired)",
            busiest_at.as_secs_f64()
        ),
        Verdict::Reported,
    );
    report.check(
        "Outage: every token valid again after the provider recovers",
        "≤ 30 s",
        format!("{:.1} s", all_valid.as_secs_f64()),
        all_valid <= secs(30),
    );
    let mut detail = format!(
        "{CREDENTIALS} MapsIndoors credentials in one `rekeyd run`, sim token lifetime {} s, \
         all logged in at start. Two seconds after `/readyz` turned 200 the sim's token \
         endpoint answered every request with a 5xx for {} s; the tokens from the start \
         had all expired {} s into the outage.\n\n\
         - Token requests during the outage: {during} ({:.1} per second); per 100 ms \
         (sampled by the bench): mean {mean:.1}, at most {busiest_n} (at {:.1} s), at most \
         {near_expiry} in the 5 s before the tokens expired.\n\
         - After the recovery: `/readyz` 200 (every credential holds a valid token) after \
         {}, with {after} token requests.\n\
         - Log: {log_lines} lines.\n",
        LIFETIME.as_secs(),
        outage.as_secs(),
        expiry.as_secs(),
        during as f64 / outage.as_secs_f64(),
        busiest_at.as_secs_f64(),
        ms(all_valid),
    );
    let mut per_second: Vec<u64> = buckets
        .chunks(10)
        .map(|c| c.iter().map(|(_, n)| *n).sum())
        .collect();
    per_second.truncate(outage.as_secs() as usize);
    let _ = writeln!(
        detail,
        "- Token requests per second of the outage: {per_second:?}"
    );
    report.detail("Outage", &detail);
    Ok(())
}

// ---------------------------------------------------------------------------
// Report.
// ---------------------------------------------------------------------------

const BEGIN: &str = "<!-- rekeyd-bench: begin (generated; edit outside these markers) -->";
const END: &str = "<!-- rekeyd-bench: end -->";

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn render(m: &Machine, report: &Report, started: SystemTime, took: Duration, load: &str) -> String {
    let date = chrono::DateTime::<chrono::Utc>::from(started).format("%Y-%m-%d %H:%M UTC");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run on {date} with `cargo run --release --features bench --bin rekeyd-bench` ({:.1} min), \
         commit {}.\n\n\
         | machine | |\n|---|---|\n\
         | CPU | {} ({} cores) |\n| RAM | {} |\n| kernel | {} |\n| OS | {} |\n| compiler | {} |\n\
         | load average (1, 5, 15 min) before the run | {} |\n",
        took.as_secs_f64() / 60.0,
        m.commit,
        m.cpu,
        m.cores,
        m.ram,
        m.kernel,
        m.os,
        m.rustc,
        load,
    );
    out.push_str("| target | goal | measured | |\n|---|---|---|---|\n");
    for r in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.target,
            r.goal,
            r.measured,
            verdict_text(r.verdict)
        );
    }
    out.push('\n');
    out.push_str(&report.details);
    out
}

fn write_report(path: &Path, generated: &str) -> Result<()> {
    let block = format!("{BEGIN}\n\n{generated}\n{END}\n");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => {
                format!(
                    "{}{block}{}",
                    &old[..b],
                    old[e + END.len()..].trim_start_matches('\n')
                )
            }
            _ => format!("{old}\n{block}"),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => format!(
            "# Benchmarks\n\n\
             How to run: `cargo run --release --features bench --bin rekeyd-bench` (about 7 minutes; installs the\n\
             Debian packages `wrk` and `nginx` when missing and run as root). Everything runs on\n\
             loopback against the built-in simulated provider; the table below is rewritten.\n\n\
             {block}"
        ),
        Err(e) => return Err(e.into()),
    };
    std::fs::write(path, text)?;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rekeyd-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let plan = parse_args()?;
    let _ = DAEMON_ENV.set(plan.daemon_env.clone());
    let began = Instant::now();
    let began_wall = SystemTime::now();
    let exe = std::env::current_exe()?;
    let bin = match &plan.rekeyd {
        Some(path) => path.clone(),
        None => exe
            .parent()
            .ok_or("cannot locate the target directory")?
            .join("rekeyd"),
    };
    if plan.build {
        log("building target/release/rekeyd");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "rekeyd"])
            .current_dir(repo_dir())
            .status()?;
        if !status.success() {
            return Err("cargo build --release --bin rekeyd failed".into());
        }
    }
    if !bin.is_file() {
        return Err(format!("{} is missing: run cargo build --release", bin.display()).into());
    }
    let machine = machine();
    let load_before = loadavg();
    let busy: f64 = load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if busy > 0.5 {
        log(format!(
            "warning: load average {load_before}: other work on this machine skews the results"
        ));
    }
    log(format!(
        "{} ({} cores), {}, kernel {}",
        machine.cpu, machine.cores, machine.ram, machine.kernel
    ));
    let mut report = Report::default();
    let mut failures = Vec::new();
    for section in &plan.sections {
        let result = match *section {
            "binary" => bench_binary(&bin, &mut report).await,
            "idle" => bench_idle(&bin, &plan, &mut report).await,
            "api" => bench_api(&bin, &plan, &mut report).await,
            "scale" => bench_scale(&bin, &plan, &mut report).await,
            "rotation" => bench_rotation(&plan, &mut report).await,
            "outage" => bench_outage(&bin, &plan, &mut report).await,
            _ => unreachable!("sections are validated"),
        };
        if let Err(e) = result {
            log(format!("{section}: FAILED: {e}"));
            report.row(section, "runs", format!("failed: {e}"), Verdict::Missed);
            failures.push(*section);
        }
    }
    let generated = render(&machine, &report, began_wall, began.elapsed(), &load_before);
    println!("{generated}");
    match &plan.output {
        Some(path) => {
            write_report(path, &generated)?;
            log(format!("wrote {}", path.display()));
        }
        None if !plan.full => log("partial or quick run: report not written (use --output FILE)"),
        None => {}
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("sections failed: {}", failures.join(", ")).into())
    }
}
