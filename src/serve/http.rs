//! Serving HTTP so that no number of local clients can starve the daemon.
//!
//! Every listener (the token API, the diagnostics listener) is served by
//! [`Listener::serve`] with [`ListenerLimits`]:
//!
//! - at most `max_connections` connections at once; a connection beyond
//!   that is answered `503 too_many_connections` and closed as soon as it is
//!   accepted, so an over-limit client never waits;
//! - a peer that is not on loopback holds at most a quarter of them
//!   ([`peer_share`]): one pod flooding the diagnostics listener from the
//!   pod network leaves room for the kubelet's probes and the scrape;
//! - a request's head must be complete `header_timeout` after its first
//!   byte, the whole request (head, handler, response written to the
//!   socket) `request_timeout` after it, and a connection waiting for its
//!   next request is closed after `idle_timeout`;
//! - request heads are capped at [`MAX_HEAD_BYTES`] (hyper answers 431).
//!
//! The timeouts are enforced per connection by a watchdog around hyper's
//! connection future rather than by hyper's own `header_read_timeout`:
//! hyper (1.x) starts that timer as soon as a keep-alive connection goes
//! idle, so idle and header timeouts could not differ, and neither hyper
//! nor a tower layer bounds a client that stops reading its response.
//!
//! File descriptors are what the token engines, the store and the token
//! files cannot do without: [`connection_caps`] lowers the caps at start-up
//! so that connections never hold more than half of `RLIMIT_NOFILE`, and an
//! `accept` that fails for lack of them (EMFILE, ENFILE, ...) is retried
//! with a backoff instead of in a busy loop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::pin::{Pin, pin};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::{debug, warn};

use crate::config::{ListenAddr, ListenerLimits};

/// hyper's read buffer, and so the largest request head accepted (hyper
/// answers 431 beyond it). Requests to rekeyd are a few hundred bytes; the
/// cap keeps `max_connections` clients from pinning hyper's default of
/// ~400 KiB each.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The first pause after an `accept` that failed for want of resources,
/// doubled up to [`ACCEPT_BACKOFF_MAX`] while it keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The reply to a connection beyond `max_connections`.
static REFUSAL: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = r#"{"error":"too_many_connections","detail":"this listener has its maximum of connections open; retry later"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// The per-listener connection caps that keep connections to at most half
/// of the soft `RLIMIT_NOFILE` (`nofile`), less one descriptor per listener
/// for the connection being refused. `wanted` holds each listener's
/// configured `max_connections`; when their sum does not fit, each is
/// lowered in proportion (to 1 at least). The other half is left to the
/// token engines, the store, token files, hooks and provider connections,
/// which need a few descriptors each while they work and fail outright
/// without them.
pub fn connection_caps(nofile: u64, wanted: &[usize]) -> Vec<usize> {
    let budget = (nofile / 2).saturating_sub(wanted.len() as u64);
    let total: u64 = wanted.iter().map(|&w| w as u64).sum();
    if total <= budget {
        return wanted.to_vec();
    }
    wanted
        .iter()
        .map(|&w| ((w as u64 * budget / total) as usize).max(1))
        .collect()
}

/// The soft `RLIMIT_NOFILE` of this process (`u64::MAX` when unlimited).
pub fn nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur
    })
}

/// A bound listener, so bind errors surface at start-up, before serving.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                // A stale socket from a previous run would make bind fail.
                // A live one belongs to a running daemon: removing it would
                // silently take its API away, so refuse instead.
                match std::fs::symlink_metadata(path) {
                    Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                        let probe = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::net::UnixStream::connect(path),
                        )
                        .await;
                        if !matches!(probe, Ok(Err(_))) {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                "another process is listening on this socket",
                            ));
                        }
                        std::fs::remove_file(path)?
                    }
                    _ => {}
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(listener))
            }
        }
    }

    /// A socket systemd passed (socket activation), as it is: its owner,
    /// group and mode are the socket unit's, and its path is not removed
    /// or replaced. Needs the async runtime.
    pub fn from_passed(passed: super::activation::Claimed) -> io::Result<Listener> {
        use super::activation::Claimed;
        Ok(match passed {
            Claimed::Unix(l) => Listener::Unix(tokio::net::UnixListener::from_std(l)?),
            Claimed::Tcp(l) => Listener::Tcp(tokio::net::TcpListener::from_std(l)?),
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// Serves `router` until `shutdown`, then lets the requests in flight
    /// finish. `name` names the listener in logs (`api`, `diag`).
    pub async fn serve(
        self,
        name: &'static str,
        router: Router,
        limits: ListenerLimits,
        shutdown: CancellationToken,
    ) {
        let server = Server {
            name,
            router,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            peers: Arc::new(Mutex::new(HashMap::new())),
            shutdown,
        };
        // Each arm drops its listener when the loop ends, so that new
        // clients are refused by the kernel while the last requests finish.
        match self {
            Listener::Tcp(l) => {
                server
                    .accept_loop(|| async {
                        l.accept().await.map(|(s, peer)| (s, Some(peer.ip())))
                    })
                    .await
            }
            Listener::Unix(l) => {
                server
                    .accept_loop(|| async { l.accept().await.map(|(s, _)| (s, None)) })
                    .await
            }
        }
        server.drain().await;
    }
}

struct Server {
    name: &'static str,
    router: Router,
    limits: ListenerLimits,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    /// Open connections per non-loopback peer ([`peer_share`]).
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    shutdown: CancellationToken,
}

/// The most connections one peer that is not on loopback may hold: a
/// quarter of the listener's cap (at least one). Loopback clients are the
/// host's or the pod's own; a remote peer, on a listener that admits the
/// network (`[diag]`, `allow_non_loopback`), must not take every slot.
pub fn peer_share(max_connections: usize) -> usize {
    (max_connections / 4).max(1)
}

/// Counts a new connection of remote peer `ip` unless it already holds
/// `share` of them.
fn admit_peer(peers: &mut HashMap<IpAddr, usize>, ip: IpAddr, share: usize) -> bool {
    let held = peers.entry(ip).or_default();
    if *held >= share {
        return false;
    }
    *held += 1;
    true
}

/// A remote peer's connection, counted in [`Server::peers`] until dropped.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl Server {
    async fn accept_loop<S, F, A>(&self, mut accept: A)
    where
        S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
        F: Future<Output = io::Result<(S, Option<IpAddr>)>>,
        A: FnMut() -> F,
    {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut starved = Throttle::default();
        let mut refusing = Throttle::default();
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                accepted = accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                // The client gave up before we took the connection.
                Err(e) if is_connection_error(&e) => continue,
                // Out of descriptors or memory: the connection stays in the
                // backlog and the listener stays readable, so retrying at
                // once would spin. Pausing leaves what is free to the engines.
                Err(e) => {
                    if let Some(times) = starved.due() {
                        warn!(step = "listen", listener = self.name, error = %e, times, "cannot accept connections; retrying with backoff");
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            backoff = ACCEPT_BACKOFF_MIN;
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                if let Some(times) = refusing.due() {
                    warn!(
                        step = "listen",
                        listener = self.name,
                        max_connections = self.limits.max_connections,
                        times,
                        "connection limit reached; refusing new connections with 503"
                    );
                }
                refuse(stream.as_raw_fd());
                continue;
            };
            let share = peer_share(self.limits.max_connections);
            let peer_slot = match peer.filter(|ip| !ip.to_canonical().is_loopback()) {
                None => None,
                Some(ip) => {
                    let admitted = {
                        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
                        admit_peer(&mut peers, ip, share)
                    };
                    if !admitted {
                        if let Some(times) = refusing.due() {
                            warn!(
                                step = "listen",
                                listener = self.name,
                                peer = %ip,
                                per_peer = share,
                                times,
                                "a remote peer holds its share of connections; refusing its new ones with 503"
                            );
                        }
                        drop(permit);
                        refuse(stream.as_raw_fd());
                        continue;
                    }
                    Some(PeerSlot {
                        peers: self.peers.clone(),
                        ip,
                    })
                }
            };
            let name = self.name;
            let router = self.router.clone();
            let limits = self.limits;
            let shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                serve_connection(name, stream, router, limits, shutdown).await;
                drop(peer_slot);
                drop(permit);
            });
        }
    }

    /// Waits for the connections to end. Each holds a permit until it
    /// does: having them all back means the requests in flight are done
    /// (the daemon bounds this wait at shutdown).
    async fn drain(&self) {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }
}

/// How often a listener logs a condition that may last (a flood at the
/// connection cap, descriptors running out): the log must not become the
/// next thing to fill up.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Says when a recurring condition is due to be logged again, and how
/// often it happened since the last time.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    times: u64,
}

impl Throttle {
    fn due(&mut self) -> Option<u64> {
        self.times += 1;
        if self.last.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.times))
    }
}

/// Answers 503 on a connection about to be closed, without waiting: a
/// fresh socket's send buffer is empty, and when it is not the client gets
/// the close alone. What the client already sent is read first, so that
/// closing does not reset the connection before it reads the answer.
fn refuse(fd: RawFd) {
    let mut sink = [0u8; 2048];
    // SAFETY: `fd` is an open socket owned by the caller for the duration
    // of these calls; the buffers are valid for the lengths given.
    unsafe {
        libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT);
        libc::send(
            fd,
            REFUSAL.as_ptr().cast(),
            REFUSAL.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What a connection is doing, which decides its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Reading a request head.
    Head,
    /// Handling a request and writing its response; `sent` once hyper has
    /// taken the whole body and only has to write out what it buffered.
    Busy { sent: bool },
}

impl Phase {
    /// The setting whose time ran out in this phase.
    fn timeout_key(self) -> &'static str {
        match self {
            Phase::Idle => "idle_timeout",
            Phase::Head => "header_timeout",
            Phase::Busy { .. } => "request_timeout",
        }
    }
}

/// The phase and when it began (for `Busy`: when the request's first byte
/// arrived). Shared by the socket wrapper, the service and the watchdog,
/// which all run in the connection's task: the lock is never contended.
struct Clock {
    state: Mutex<(Phase, Instant)>,
    limits: ListenerLimits,
}

impl Clock {
    fn set(&self, update: impl FnOnce(&mut (Phase, Instant))) {
        update(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bytes arrived: a request begins if none was in progress.
    fn read_bytes(&self) {
        self.set(|s| {
            if s.0 == Phase::Idle {
                *s = (Phase::Head, Instant::now());
            }
        })
    }

    /// hyper parsed a head and calls the service.
    fn request(&self) {
        self.set(|s| {
            // A pipelined request was read while the previous one was busy:
            // it starts now.
            if s.0 != Phase::Head {
                s.1 = Instant::now();
            }
            s.0 = Phase::Busy { sent: false };
        })
    }

    /// hyper has taken the whole response body (and dropped it).
    fn body_sent(&self) {
        self.set(|s| {
            if s.0 == (Phase::Busy { sent: false }) {
                s.0 = Phase::Busy { sent: true };
            }
        })
    }

    /// hyper flushes the socket only once its whole write buffer is in it:
    /// a flush after the body was taken means the response is written.
    fn flushed(&self) {
        self.set(|s| {
            if s.0 == (Phase::Busy { sent: true }) {
                *s = (Phase::Idle, Instant::now());
            }
        })
    }

    fn deadline(&self) -> (Phase, Instant) {
        let (phase, since) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        let limit = match phase {
            Phase::Idle => self.limits.idle_timeout,
            Phase::Head => self.limits.header_timeout,
            Phase::Busy { .. } => self.limits.request_timeout,
        };
        (phase, since + limit)
    }
}

/// The socket as hyper sees it, reporting reads and flushes to the clock.
struct Watched<S> {
    io: S,
    clock: Arc<Clock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.read_bytes();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        if result.is_ready() {
            self.clock.flushed();
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that tells the clock when hyper is done with it.
struct Tracked {
    inner: axum::body::Body,
    clock: Arc<Clock>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.clock.body_sent();
    }
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one connection until the client closes it, it misses its
/// deadline (then it is dropped, which closes the socket), or shutdown.
async fn serve_connection<S>(
    name: &'static str,
    stream: S,
    router: Router,
    limits: ListenerLimits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = Arc::new(Clock {
        state: Mutex::new((Phase::Idle, Instant::now())),
        limits,
    });
    let io = TokioIo::new(Watched {
        io: stream,
        clock: clock.clone(),
    });
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            clock.request();
            let clock = clock.clone();
            let response = router.clone().call(request);
            async move {
                let response = response
                    .await
                    .unwrap_or_else(|never: Infallible| match never {});
                Ok::<_, Infallible>(response.map(|inner| Tracked { inner, clock }))
            }
        })
    };
    let mut conn = pin!(
        hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD_BYTES)
            // The watchdog below times heads, requests and idleness.
            .header_read_timeout(None)
            .serve_connection(io, service)
    );
    let mut stopping = pin!(shutdown.cancelled_owned());
    let mut draining = false;
    let (_, first) = clock.deadline();
    let mut alarm: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(first));
    let outcome = std::future::poll_fn(|cx| {
        if !draining && stopping.as_mut().poll(cx).is_ready() {
            // Idle connections close now; a request in flight finishes.
            conn.as_mut().graceful_shutdown();
            draining = true;
        }
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(|e| e.to_string()));
        }
        // The alarm may ring early (the deadline moved later meanwhile),
        // never late: it is moved only when the deadline comes sooner.
        let (_, deadline) = clock.deadline();
        if deadline < alarm.deadline() {
            alarm.as_mut().reset(deadline);
        }
        while alarm.as_mut().poll(cx).is_ready() {
            let (phase, deadline) = clock.deadline();
            if deadline <= Instant::now() {
                return Poll::Ready(Err(format!("{} passed", phase.timeout_key())));
            }
            alarm.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    if let Err(reason) = outcome {
        debug!(step = "listen", listener = name, reason = %reason, "connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_peer_holds_at_most_a_quarter_of_the_connections() {
        assert_eq!(peer_share(64), 16);
        assert_eq!(peer_share(3), 1);
        let mut peers = HashMap::new();
        let flooder: IpAddr = "10.1.2.3".parse().unwrap();
        let kubelet: IpAddr = "10.1.0.1".parse().unwrap();
        let admitted = (0..100)
            .filter(|_| admit_peer(&mut peers, flooder, 16))
            .count();
        assert_eq!(admitted, 16);
        assert!(
            admit_peer(&mut peers, kubelet, 16),
            "another peer still gets in"
        );
        // Its connections end: room again.
        let slot = PeerSlot {
            peers: Arc::new(Mutex::new(peers)),
            ip: flooder,
        };
        let shared = slot.peers.clone();
        drop(slot);
        assert_eq!(shared.lock().unwrap()[&flooder], 15);
        // IPv4 on an IPv6 socket is still loopback.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(mapped.to_canonical().is_loopback());
    }

    #[test]
    fn caps_keep_half_the_descriptors_for_the_daemon() {
        // Plenty of descriptors: as configured.
        assert_eq!(connection_caps(u64::MAX, &[256, 64]), [256, 64]);
        assert_eq!(connection_caps(1024, &[256, 64]), [256, 64]);
        assert_eq!(connection_caps(1024, &[511]), [511]);
        // Too few: lowered in proportion to half the limit, less one per
        // listener for the connection being refused.
        assert_eq!(connection_caps(1024, &[512]), [511]);
        assert_eq!(connection_caps(256, &[256, 64]), [100, 25]);
        assert_eq!(connection_caps(256, &[256]), [127]);
        // Never below one connection each.
        assert_eq!(connection_caps(4, &[256, 64]), [1, 1]);
        for nofile in [16, 256, 1000, 4096] {
            let caps = connection_caps(nofile, &[1000, 10]);
            assert!(
                caps.iter().sum::<usize>() as u64 <= (nofile / 2).max(2),
                "{nofile}: {caps:?}"
            );
        }
    }
}
