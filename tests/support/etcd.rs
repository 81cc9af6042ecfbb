//! A single-member etcd server for integration tests: `etcd` on `PATH` (or
//! `$REKEYD_TEST_ETCD`) on loopback ports picked by the kernel, data in a
//! temporary directory, killed when dropped. Without etcd the calling test
//! is reported as skipped (`tests/support/tools.rs`: a failure under
//! `REKEYD_REQUIRE_TOOLS=1`).
//! Include with `#[path = "support/etcd.rs"] mod etcd;`.
#![allow(dead_code)]

#[path = "tools.rs"]
mod tools;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A failure rather than a hang when etcd does not come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EtcdServer {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` with TLS), for `[store] endpoints`.
    pub endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free loopback port: bound by the kernel, then released for etcd. The
/// window in which another process could take it is tiny; `start` retries
/// with fresh ports if etcd cannot bind.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().unwrap().port()
}

/// TLS on the client port: the server's certificate and key (PEM files),
/// and with `client_ca` the CA whose client certificates it requires
/// (`--client-cert-auth --trusted-ca-file`).
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl EtcdServer {
    /// A running server, or `None` (the caller returns: skipped) when etcd
    /// is not installed.
    pub fn start() -> Option<EtcdServer> {
        Self::start_with(None)
    }

    /// Like [`EtcdServer::start`], serving clients over TLS (`https://`).
    pub fn start_tls(tls: &ServerTls) -> Option<EtcdServer> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> Option<EtcdServer> {
        let binary = match std::env::var_os("REKEYD_TEST_ETCD") {
            Some(path) => PathBuf::from(path),
            None => tools::find("etcd", "Debian package etcd-server")?,
        };
        let mut last_log = String::new();
        for _ in 0..3 {
            match Self::try_start(&binary, tls) {
                Ok(server) => return Some(server),
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not start:\n{last_log}");
    }

    /// Starts etcd and waits until its client port accepts connections and
    /// answers; on failure returns its log.
    fn try_start(binary: &Path, tls: Option<&ServerTls>) -> Result<EtcdServer, String> {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        // With TLS on the client port, /health is asked on a plain
        // metrics port.
        let health_port = if tls.is_some() {
            free_port()
        } else {
            client_port
        };
        let peer = format!("http://127.0.0.1:{peer_port}");
        // Unique per server: two tests' clusters never take each other for
        // a member.
        let name = format!("rekeyd-test-{}-{client_port}", std::process::id());
        let log = dir.path().join("etcd.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(binary);
        if let Some(tls) = tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{health_port}"));
            if let Some(ca) = &tls.client_ca {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        let child = command
            .arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("{name}={peer}"))
            .args(["--initial-cluster-token", &name])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", binary.display()));
        let mut server = EtcdServer {
            child,
            endpoint: client,
            log,
            _dir: dir,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], health_port).into();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The health endpoint answers on the client port once the
            // member has a leader (itself) and serves requests.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && health_ok(addr)
            {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("etcd exited ({status})\n{}", server.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd not healthy within {START_TIMEOUT:?}\n{}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Freezes the server (SIGSTOP): connections stay open, requests get no
    /// answer, as from a hung member.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws a [`EtcdServer::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to etcd");
    }

    /// Stops the server now (SIGKILL), e.g. to test an unreachable store.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET /health` with a bare HTTP/1.0 request: `{"health":"true"}`.
fn health_ok(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}
