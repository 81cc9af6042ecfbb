//! Socket activation: listening sockets systemd opened for rekeyd
//! (`rekeyd.socket`), handed over as file descriptors 3, 4, ... with
//! `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` (sd_listen_fds(3),
//! systemd.socket(5)). With them, clients may connect before rekeyd runs
//! (the kernel queues their connections), and the socket's owner, group and
//! mode are systemd's (`SocketUser=`, `SocketGroup=`, `SocketMode=`).
//!
//! A passed socket is used by the listener whose configured address it is
//! bound to (`getsockname(2)`); the configuration stays the one source of
//! what rekeyd serves where. A passed socket no listener claims is an error
//! (see [`Inherited::unmatched`]): the socket unit and the
//! configuration disagree, and clients would connect to a socket nobody
//! serves.
//!
//! The descriptors are taken once, in `main` before any thread starts, so
//! that the `LISTEN_*` variables can be removed from the environment: hooks
//! and other children must not believe the sockets are theirs.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::config::ListenAddr;

/// What a passed socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassedAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// Anything rekeyd does not listen on (a datagram socket, an abstract
    /// or unnamed unix socket, another family), described for the error.
    Other(String),
}

impl std::fmt::Display for PassedAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassedAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            PassedAddr::Tcp(addr) => write!(f, "{addr}"),
            PassedAddr::Other(what) => f.write_str(what),
        }
    }
}

/// One socket systemd passed.
#[derive(Debug)]
pub struct Passed {
    fd: OwnedFd,
    /// `FileDescriptorName=` of the socket unit (default: its unit name).
    pub name: String,
    pub addr: PassedAddr,
}

/// The passed sockets not yet claimed by a listener.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Passed>,
    /// `LISTEN_FDS` or `LISTEN_FDNAMES` that could not be read: reported
    /// when the listeners start, where it stops the daemon.
    error: Option<String>,
}

static INHERITED: Mutex<Option<Inherited>> = Mutex::new(None);

/// Takes the sockets systemd passed to this process, if any, and removes
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment.
/// The descriptors are close-on-exec from here on. Later calls find
/// nothing.
///
/// # Safety
///
/// Changes the environment: call it before any other thread runs (at the
/// top of `main`, before the async runtime starts).
pub unsafe fn take_from_env() {
    // SAFETY: the caller guarantees no other thread runs.
    let found = unsafe { sd_notify::listen_fds_with_names_and_unset_env() };
    let inherited = match found {
        Ok(fds) => Inherited {
            sockets: fds
                .map(|(fd, name)| {
                    // SAFETY: sd_listen_fds(3): descriptors 3 to
                    // 3 + LISTEN_FDS - 1 are ours, opened by systemd for
                    // this process (LISTEN_PID matched), and nothing else
                    // owns them.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let addr = describe(fd.as_raw_fd());
                    Passed { fd, name, addr }
                })
                .collect(),
            error: None,
        },
        Err(e) => Inherited {
            sockets: Vec::new(),
            error: Some(format!(
                "the sockets systemd passed cannot be used (LISTEN_FDS, LISTEN_FDNAMES): {e}"
            )),
        },
    };
    *INHERITED.lock().unwrap_or_else(|e| e.into_inner()) = Some(inherited);
}

/// Runs `f` on the passed sockets (none when [`take_from_env`] was not
/// called, as in tests that run the daemon in-process).
pub fn with_inherited<T>(f: impl FnOnce(&mut Inherited) -> T) -> T {
    let mut guard = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Inherited::default))
}

/// A passed socket taken by the listener of that address.
pub enum Claimed {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl Inherited {
    /// An error reading the `LISTEN_*` variables, once.
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    /// The passed socket bound to `listen`, as a non-blocking listener
    /// (tokio needs it so), removed from the set; `None` when systemd
    /// passed none for that address.
    pub fn claim(&mut self, listen: &ListenAddr) -> io::Result<Option<Claimed>> {
        let Some(i) = find(listen, self.sockets.iter().map(|p| &p.addr)) else {
            return Ok(None);
        };
        let passed = self.sockets.remove(i);
        let claimed = match passed.addr {
            PassedAddr::Unix(_) => {
                let l = std::os::unix::net::UnixListener::from(passed.fd);
                l.set_nonblocking(true)?;
                Claimed::Unix(l)
            }
            PassedAddr::Tcp(_) => {
                let l = std::net::TcpListener::from(passed.fd);
                l.set_nonblocking(true)?;
                Claimed::Tcp(l)
            }
            PassedAddr::Other(_) => unreachable!("find matches listening addresses only"),
        };
        Ok(Some(claimed))
    }

    /// The passed sockets none of `listens` would claim, each as
    /// `address (FileDescriptorName=name)`.
    pub fn unmatched(&self, listens: &[&ListenAddr]) -> Vec<String> {
        self.sockets
            .iter()
            .filter(|p| {
                !listens
                    .iter()
                    .any(|l| find(l, std::iter::once(&p.addr)).is_some())
            })
            .map(|p| format!("{} (FileDescriptorName={})", p.addr, p.name))
            .collect()
    }
}

/// The index of the passed socket bound to `listen`. A TCP listener on
/// port 0 never matches: it asks for a fresh port, which no socket unit
/// can have bound beforehand.
pub fn find<'a>(
    listen: &ListenAddr,
    passed: impl Iterator<Item = &'a PassedAddr>,
) -> Option<usize> {
    passed
        .enumerate()
        .find(|(_, addr)| match (listen, addr) {
            (ListenAddr::Unix(want), PassedAddr::Unix(have)) => want == have,
            (ListenAddr::Tcp(want), PassedAddr::Tcp(have)) => want.port() != 0 && want == have,
            _ => false,
        })
        .map(|(i, _)| i)
}

/// What `fd` is: a listening stream socket's address, or why it is not
/// one rekeyd can serve on.
fn describe(fd: RawFd) -> PassedAddr {
    let int_opt = |level, name| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    match (
        int_opt(libc::SOL_SOCKET, libc::SO_TYPE),
        int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN),
    ) {
        (Ok(libc::SOCK_STREAM), Ok(1)) => {}
        (Err(e), _) | (_, Err(e)) => {
            return PassedAddr::Other(format!("fd {fd}, not a socket ({e})"));
        }
        _ => return PassedAddr::Other(format!("fd {fd}, not a listening stream socket")),
    }
    // SAFETY: a zeroed sockaddr_storage is valid; getsockname fills at most
    // `len` bytes of it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &raw mut len) };
    if rc != 0 {
        return PassedAddr::Other(format!("fd {fd} ({})", io::Error::last_os_error()));
    }
    // The family decides which std listener may read the address (each
    // parses its own sockaddr kind); they borrow the descriptor.
    match libc::c_int::from(storage.ss_family) {
        libc::AF_UNIX => {
            // SAFETY: `fd` stays owned by the caller; ManuallyDrop keeps
            // this temporary listener from closing it.
            let l = std::mem::ManuallyDrop::new(unsafe {
                std::os::unix::net::UnixListener::from_raw_fd(fd)
            });
            match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
            {
                Some(path) => PassedAddr::Unix(path),
                None => PassedAddr::Other(format!("fd {fd}, an unnamed or abstract unix socket")),
            }
        }
        libc::AF_INET | libc::AF_INET6 => {
            // SAFETY: as above.
            let l = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
            match l.local_addr() {
                Ok(addr) => PassedAddr::Tcp(addr),
                Err(e) => PassedAddr::Other(format!("fd {fd} ({e})")),
            }
        }
        family => PassedAddr::Other(format!("fd {fd}, address family {family}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_socket_matches_the_listener_of_its_address() {
        let passed = [
            PassedAddr::Other("fd 3, not a listening stream socket".into()),
            PassedAddr::Tcp("127.0.0.1:9860".parse().unwrap()),
            PassedAddr::Unix("/run/rekeyd/api.sock".into()),
        ];
        let unix = ListenAddr::Unix("/run/rekeyd/api.sock".into());
        assert_eq!(find(&unix, passed.iter()), Some(2));
        let other = ListenAddr::Unix("/run/rekeyd/diag.sock".into());
        assert_eq!(find(&other, passed.iter()), None);
        let tcp = ListenAddr::Tcp("127.0.0.1:9860".parse().unwrap());
        assert_eq!(find(&tcp, passed.iter()), Some(1));
        let any_port = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let bound_to_zero = [PassedAddr::Tcp("127.0.0.1:0".parse().unwrap())];
        assert_eq!(find(&any_port, bound_to_zero.iter()), None);
    }

    #[test]
    fn a_bound_socket_is_described_by_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(describe(unix.as_raw_fd()), PassedAddr::Unix(path));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            describe(tcp.as_raw_fd()),
            PassedAddr::Tcp(tcp.local_addr().unwrap())
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(describe(a.as_raw_fd()), PassedAddr::Other(_)));
        // The descriptors described are still open.
        assert!(unix.local_addr().is_ok() && tcp.local_addr().is_ok());
    }
}
