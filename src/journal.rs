//! Rotation events to the systemd journal, each with a stable `MESSAGE_ID`
//! (so that `journalctl MESSAGE_ID=<id>` is the audit query) and fields
//! `REKEYD_CREDENTIAL`, `REKEYD_STEP`, `REKEYD_ROTATION_ID`,
//! `REKEYD_SECRET_ID`, `REKEYD_HISTORY_SEQ`, `REKEYD_HISTORY_DIGEST` (and
//! `REKEYD_HISTORY_DROPPED` for a truncation marker). Never
//! a secret value (I7): ids, step names and digests of history entries.
//!
//! When: only when rekeyd runs as a systemd service whose output goes to
//! the journal, which systemd announces by setting `JOURNAL_STREAM`
//! (systemd.exec(5)). Then the events are sent, as datagrams in the
//! journal's native protocol (systemd's "Native Journal Protocol"), to
//! `/run/systemd/journal/socket`, or to the socket `REKEYD_JOURNAL_SOCKET`
//! names (a container that mounts the host's journal socket elsewhere;
//! the tests). The ordinary log lines go to the journal through stderr
//! as before; these entries add the structured audit record.
//!
//! Cost: nothing until the first event (the socket is opened then), no
//! task, no timer. A send that fails (no journald, a full socket buffer
//! for longer than [`SEND_TIMEOUT`]) drops that event with a debug log
//! line: the history in the store and the log keep it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::history::Step;

/// Where journald listens for native-protocol datagrams.
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";

/// A blocked journal never holds a rotation step longer than this.
const SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// The `MESSAGE_ID` of each step (128-bit, as journald expects; stable
/// across versions: README lists them).
pub fn message_id(step: Step) -> &'static str {
    match step {
        Step::Started => "fb7584bd93e341658f4e25128d7f12fa",
        Step::Forced => "13e5d8a24a284ee8a71b4502783883f0",
        Step::Created => "ed85e65227d24e2bbdf94950912ee28a",
        Step::Verified => "b9d0f0da77bd4b779d506053daba4c4d",
        Step::Promoted => "9003fc1375f249038c69dbe7ca5aee32",
        Step::Completed => "dcb8d7dfe3df4ab1ae74a9941c24b07f",
        Step::Aborted => "edadbe8bb1ab4e5e8cb6ae4ddcf8cf5c",
        Step::Deleted => "8ebd4efb9f534d449014b1200d3d5a64",
        Step::OrphanRemoved => "6cf00736086540bf8e27b23d4db4c4c1",
        Step::Set => "92fcbbb72a0b4ed3a83c0915721fea6e",
        Step::Truncated => "3d2faac2c8f14b8ab32db83b34f5c1b5",
    }
}

/// The human-readable `MESSAGE` of a step.
fn message(credential: &str, step: Step) -> String {
    let what = match step {
        Step::Started => "rotation started",
        Step::Forced => "rotation forced by an operator",
        Step::Created => "replacement secret created",
        Step::Verified => "replacement secret verified",
        Step::Promoted => "replacement secret promoted",
        Step::Completed => "rotation completed",
        Step::Aborted => "rotation aborted",
        Step::Deleted => "retired secret deleted",
        Step::OrphanRemoved => "untracked secret of ours deleted",
        Step::Set => "secret set by an operator",
        Step::Truncated => "rotation history truncated",
    };
    format!("{credential}: {what}")
}

/// syslog priority: warning for an abort, info for a truncation marker
/// (once a history is at its bound, every append writes one: kept out of
/// `journalctl -p notice`), notice otherwise.
fn priority(step: Step) -> &'static str {
    match step {
        Step::Aborted => "4",
        Step::Truncated => "6",
        _ => "5",
    }
}

/// A journal socket to send audit events to.
pub struct Journal {
    path: PathBuf,
    socket: OnceLock<io::Result<UnixDatagram>>,
}

impl Journal {
    /// Sends to the socket at `path` (opened at the first send).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Journal {
            path: path.into(),
            socket: OnceLock::new(),
        }
    }

    /// The journal of this process's environment: `Some` under systemd with
    /// output to the journal (`JOURNAL_STREAM` set), see the module doc.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("JOURNAL_STREAM")?;
        let path = std::env::var_os("REKEYD_JOURNAL_SOCKET")
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        Some(Journal::at(path))
    }

    /// Sends one audit event of `credential`, with `fields` (name, value)
    /// besides the standard ones.
    pub fn send(&self, credential: &str, step: Step, fields: &[(&str, String)]) -> io::Result<()> {
        let socket = self.socket.get_or_init(|| {
            let socket = UnixDatagram::unbound()?;
            socket.set_write_timeout(Some(SEND_TIMEOUT))?;
            Ok(socket)
        });
        let socket = socket
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
        let datagram = encode(credential, step, fields);
        socket.send_to(&datagram, &self.path).map(|_| ())
    }
}

/// The datagram of one event in the native protocol: `NAME=value\n` per
/// field, or, for a value with a newline, `NAME\n`, its length as 64-bit
/// little-endian, the value and `\n`.
pub fn encode(credential: &str, step: Step, fields: &[(&str, String)]) -> Vec<u8> {
    let standard = [
        ("MESSAGE", message(credential, step)),
        ("MESSAGE_ID", message_id(step).to_string()),
        ("PRIORITY", priority(step).to_string()),
        ("SYSLOG_IDENTIFIER", "rekeyd".to_string()),
        ("REKEYD_CREDENTIAL", credential.to_string()),
        ("REKEYD_STEP", step.as_str().to_string()),
    ];
    let mut out = Vec::with_capacity(512);
    for (name, value) in standard
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(fields.iter().map(|(n, v)| (*n, v.as_str())))
    {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        } else {
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

static JOURNAL: OnceLock<Option<Journal>> = OnceLock::new();

/// Sends an audit event to the journal when rekeyd runs under systemd
/// (see the module doc); otherwise does nothing.
pub fn audit(credential: &str, step: Step, fields: &[(&str, String)]) {
    let Some(journal) = JOURNAL.get_or_init(Journal::from_env) else {
        return;
    };
    if let Err(e) = journal.send(credential, step, fields) {
        tracing::debug!(step = "journal", error = %e, "cannot send an audit event to the journal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let steps = [
            Step::Started,
            Step::Forced,
            Step::Created,
            Step::Verified,
            Step::Promoted,
            Step::Completed,
            Step::Aborted,
            Step::Deleted,
            Step::OrphanRemoved,
            Step::Set,
            Step::Truncated,
        ];
        let mut ids: Vec<_> = steps.iter().map(|s| message_id(*s)).collect();
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), steps.len());
    }

    #[test]
    fn a_fake_journal_socket_receives_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = UnixDatagram::bind(&path).unwrap();
        let journal = Journal::at(&path);
        journal
            .send(
                "maps",
                Step::Created,
                &[
                    ("REKEYD_SECRET_ID", "s-1".into()),
                    ("REKEYD_DETAIL", "two\nlines".into()),
                ],
            )
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = server.recv(&mut buf).unwrap();
        let got = &buf[..n];
        let text = String::from_utf8_lossy(got);
        assert!(text.contains(&format!("MESSAGE_ID={}\n", message_id(Step::Created))));
        assert!(text.contains("REKEYD_CREDENTIAL=maps\n"));
        assert!(text.contains("REKEYD_STEP=created\n"));
        assert!(text.contains("REKEYD_SECRET_ID=s-1\n"));
        // The multi-line value uses the length-prefixed form.
        let mut framed = b"REKEYD_DETAIL\n".to_vec();
        framed.extend_from_slice(&9u64.to_le_bytes());
        framed.extend_from_slice(b"two\nlines\n");
        assert!(got.windows(framed.len()).any(|w| w == framed));
    }
}
