//! The local file store: one JSON record per credential under
//! `<state_dir>/credentials/`, mode 0600 in a 0700 directory, replaced
//! atomically and durably (see [`crate::fsutil::write_atomic`]).
//!
//! Each credential's rotation history ([`crate::history`]) is a file next
//! to its record, `<name>.history.json`, written the same way under its own
//! lock file `<name>.history.lock` (so the temp-file sweep treats it like a
//! record). Its version is a digest of its bytes.
//!
//! Compare-and-swap holds an exclusive lock on a per-credential lock file
//! while it reads, compares and writes, so two processes sharing the state
//! directory (the daemon and `rekeyd rotate`) never overwrite each other.
//!
//! Ownership: run as root (`sudo rekeyd set-secret`, `sudo rekeyd rotate`)
//! against the state directory of a daemon that runs as its own user (the
//! packaged unit: `User=rekeyd`, `DynamicUser=yes`), every file and
//! directory the store creates takes the owner and group of the directory
//! it is created in. A root-owned 0600 record would otherwise lock the
//! daemon out of its own journal (it stops with "Permission denied", and
//! the secret in use is in that file).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;

use super::record;
use super::{CredentialRecord, Store, StoreError, Versioned};
use crate::fsutil::{self, Ownership};

pub struct FileStore {
    dir: PathBuf,
    history_limit: usize,
}

impl FileStore {
    /// The store under `state_dir`. Touches nothing until the first write,
    /// so a start-up that fails validation leaves the disk as it was.
    pub fn new(state_dir: &Path) -> FileStore {
        FileStore {
            dir: state_dir.join(crate::config::FILE_STORE_DIR),
            history_limit: crate::history::DEFAULT_LIMIT,
        }
    }

    /// Keeps at most `limit` history entries per credential.
    pub fn with_history_limit(mut self, limit: usize) -> Self {
        self.history_limit = limit;
        self
    }

    /// The rotation history of credential `name`.
    pub fn history_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.history.json"))
    }

    /// Creates the state directories (0700) if missing (as root, each new
    /// one given to the owner of the directory it is created in, see the
    /// module doc). Returns the ownership for the files created in the
    /// credentials directory.
    fn ensure_dirs(&self) -> Result<Ownership, StoreError> {
        let state_dir = self.dir.parent().unwrap_or(&self.dir);
        let root = running_as_root();
        for d in [state_dir, self.dir.as_path()] {
            let existed = std::fs::symlink_metadata(d).is_ok();
            fsutil::ensure_private_dir(d, 0o700).map_err(|e| io_err(d, e))?;
            if root && !existed {
                let parent = d.parent().unwrap_or(d);
                let owner = inherited_owner(true, parent).map_err(|e| io_err(parent, e))?;
                if owner != Ownership::default() {
                    std::os::unix::fs::chown(d, owner.uid, owner.gid).map_err(|e| io_err(d, e))?;
                }
            }
        }
        inherited_owner(root, &self.dir).map_err(|e| io_err(&self.dir, e))
    }

    /// Removes the temp files that a crash (`kill -9`, power loss) left
    /// between writing a record's temp file and renaming it: they hold
    /// secrets (I7) and nothing else ever removes them. Each is removed
    /// under its credential's lock, which every writer holds while its temp
    /// file exists, so a write in flight in another process is never
    /// touched (its lock is busy and the file is skipped). Returns how many
    /// were removed.
    pub fn sweep_temp_files(&self) -> Result<usize, StoreError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&self.dir, e)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file_name
                .strip_prefix('.')
                .and_then(|rest| rest.split_once(".json.tmp."))
                .map(|(name, _)| name.to_string())
            else {
                continue;
            };
            if !fsutil::is_temp_of(&file_name, &format!("{name}.json")) {
                continue;
            }
            let lock_path = self.lock_path(&name);
            let owner =
                inherited_owner(running_as_root(), &self.dir).map_err(|e| io_err(&self.dir, e))?;
            let lock = open_lock_file(&lock_path, owner).map_err(|e| io_err(&lock_path, e))?;
            match lock.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&entry.path(), e)),
            }
        }
        if removed > 0 {
            fsutil::sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        }
        Ok(removed)
    }

    pub fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.lock"))
    }

    /// The credential's write lock file, if it exists; never creates it
    /// (reading creates nothing on disk).
    fn existing_lock(&self, name: &str) -> Result<Option<File>, StoreError> {
        let path = self.lock_path(name);
        match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    fn read(&self, name: &str) -> Result<Option<Versioned<CredentialRecord>>, StoreError> {
        let path = self.record_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_err(&path, source)),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        let (version, value) = record::decode(&bytes).map_err(corrupt)?;
        Ok(Some(Versioned { version, value }))
    }
}

/// Reads, compares and writes under the credential's lock. A free function
/// over owned data so it can run on the blocking pool.
fn swap(dir: &Path, name: &str, expected: Option<u64>, bytes: &[u8]) -> Result<u64, StoreError> {
    let store = FileStore::at(dir);
    let owner = store.ensure_dirs()?;
    let lock_path = store.lock_path(name);
    let lock = open_lock_file(&lock_path, owner).map_err(|e| io_err(&lock_path, e))?;
    // Released when `lock` is dropped at the end of this function.
    lock.lock().map_err(|e| io_err(&lock_path, e))?;
    let found = store.read(name)?.map(|v| v.version);
    if found != expected {
        return Err(StoreError::Conflict {
            name: name.to_string(),
            expected,
        });
    }
    let path = store.record_path(name);
    // Test builds only: `FAILPOINTS="store-before-write=sleep(3000)"` holds
    // each write here for 3 s, lock taken and version checked, so that
    // tests can signal a process while one of its journal writes is in
    // flight (`2*off->1*sleep(3000)`: only the third write).
    #[cfg(feature = "failpoints")]
    fail::fail_point!("store-before-write");
    fsutil::write_atomic_owned(&path, bytes, 0o600, owner).map_err(|e| io_err(&path, e))?;
    Ok(next_version(expected))
}

impl FileStore {
    /// The store over the credentials directory `dir` itself, for the
    /// blocking helpers.
    fn at(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
            history_limit: crate::history::DEFAULT_LIMIT,
        }
    }
}

/// The history of `name` with its version, if there is one.
fn read_history(dir: &Path, name: &str) -> Result<Option<Versioned<Vec<u8>>>, StoreError> {
    let path = FileStore::at(dir).history_path(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(Versioned {
            version: crate::history::content_version(&bytes),
            value: bytes,
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Compares and writes the history of `name` under `<name>.history.lock`.
fn swap_history(
    dir: &Path,
    name: &str,
    expected: Option<u64>,
    bytes: &[u8],
) -> Result<u64, StoreError> {
    let store = FileStore::at(dir);
    let owner = store.ensure_dirs()?;
    // `<name>.history` as a record name: its lock, temp files and sweep
    // follow the record's rules (credential names hold no dots).
    let history = format!("{name}.history");
    let lock_path = store.lock_path(&history);
    let lock = open_lock_file(&lock_path, owner).map_err(|e| io_err(&lock_path, e))?;
    lock.lock().map_err(|e| io_err(&lock_path, e))?;
    let found = read_history(dir, name)?.map(|v| v.version);
    if found != expected {
        return Err(StoreError::Conflict {
            name: history,
            expected,
        });
    }
    let path = store.history_path(name);
    // Without the directory's fsync (half a journal write's cost): after a
    // power failure the history may lack its newest entries, never hold a
    // torn one; the journal, written with write_atomic, keeps the steps.
    fsutil::replace_atomic(&path, bytes, 0o600, owner).map_err(|e| io_err(&path, e))?;
    Ok(crate::history::content_version(bytes))
}

fn next_version(expected: Option<u64>) -> u64 {
    expected.map_or(1, |v| v + 1)
}

/// Opens (creating if missing) a lock file, given to `owner` (see the
/// module doc; one that a root-run command created before is given back).
fn open_lock_file(path: &Path, owner: Ownership) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    if let Some(uid) = owner.uid {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        if meta.uid() != uid || Some(meta.gid()) != owner.gid {
            std::os::unix::fs::fchown(&file, owner.uid, owner.gid)?;
        }
    }
    Ok(file)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    unsafe { libc::geteuid() == 0 }
}

/// The ownership for what a process (`root`: running as root) creates in
/// `dir`: `dir`'s owner and group when root writes into a directory that
/// belongs to another user, the process's own (default) otherwise.
fn inherited_owner(root: bool, dir: &Path) -> io::Result<Ownership> {
    use std::os::unix::fs::MetadataExt;
    if !root {
        return Ok(Ownership::default());
    }
    let meta = std::fs::metadata(dir)?;
    Ok(owner_for(meta.uid(), meta.gid()))
}

/// Pure part of [`inherited_owner`] for root: a root-owned directory keeps
/// root's defaults.
fn owner_for(dir_uid: u32, dir_gid: u32) -> Ownership {
    if dir_uid == 0 {
        Ownership::default()
    } else {
        Ownership {
            uid: Some(dir_uid),
            gid: Some(dir_gid),
        }
    }
}

fn io_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An exclusive lock on `<name>.rotate.lock`, released on drop (and by the
/// kernel if the process dies, so a crash never leaves a stale claim).
struct FileClaim {
    _file: File,
}

impl super::Claim for FileClaim {}

/// Larger than any record, so a disk that takes the probe takes the record.
const PROBE_BYTES: usize = 64 * 1024;

/// How often a claimer waiting for another process's rotation tries again.
/// Polled rather than blocked on: a thread blocked in `flock` cannot be
/// cancelled, and Ctrl-C must end a command that waits for a claim.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One attempt at the claim: `Ok(None)` while someone else holds it.
fn try_claim(dir: &Path, name: &str) -> Result<Option<FileClaim>, StoreError> {
    let store = FileStore::at(dir);
    let owner = store.ensure_dirs()?;
    let path = dir.join(format!("{name}.rotate.lock"));
    let file = open_lock_file(&path, owner).map_err(|e| io_err(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(FileClaim { _file: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path, e)),
    }
}

fn check_writable(dir: &Path, name: &str) -> Result<(), StoreError> {
    let store = FileStore::at(dir);
    store.ensure_dirs()?;
    let path = dir.join(format!(".{name}.probe"));
    let result = fsutil::write_atomic(&path, &[0u8; PROBE_BYTES], 0o600);
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| io_err(&path, e))
}

impl Store for FileStore {
    fn keeps_history(&self) -> bool {
        true
    }

    fn history_limit(&self) -> usize {
        self.history_limit
    }

    fn load_history<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<Vec<u8>>>, StoreError>> {
        Box::pin(async move { read_history(&self.dir, name) })
    }

    fn swap_history<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let dir = self.dir.clone();
        let name = name.to_string();
        let bytes = bytes.to_vec();
        Box::pin(async move {
            let path = dir.clone();
            tokio::task::spawn_blocking(move || swap_history(&dir, &name, expected, &bytes))
                .await
                .map_err(|e| io_err(&path, io::Error::other(e)))?
        })
    }

    fn claim<'a>(
        &'a self,
        name: &'a str,
        wait: bool,
    ) -> BoxFuture<'a, Result<Option<Box<dyn super::Claim>>, StoreError>> {
        let dir = self.dir.clone();
        let name = name.to_string();
        Box::pin(async move {
            let path = dir.join(format!("{name}.rotate.lock"));
            let mut announced = false;
            loop {
                let (d, n) = (dir.clone(), name.clone());
                let claimed = tokio::task::spawn_blocking(move || try_claim(&d, &n))
                    .await
                    .map_err(|e| io_err(&path, io::Error::other(e)))??;
                match claimed {
                    Some(c) => return Ok(Some(Box::new(c) as Box<dyn super::Claim>)),
                    None if !wait => return Ok(None),
                    None => {
                        if !announced {
                            tracing::info!(
                                step = "claim",
                                credential = %name,
                                "another process is rotating this credential; waiting for it to finish"
                            );
                            announced = true;
                        }
                        tokio::time::sleep(CLAIM_POLL).await
                    }
                }
            }
        })
    }

    fn check_writable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let dir = self.dir.clone();
        let name = name.to_string();
        Box::pin(async move {
            let path = dir.clone();
            tokio::task::spawn_blocking(move || check_writable(&dir, &name))
                .await
                .map_err(|e| io_err(&path, io::Error::other(e)))?
        })
    }

    fn load<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        // Small local files: a blocking read is cheaper than a thread hop.
        Box::pin(async move { self.read(name) })
    }

    fn load_settled<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Versioned<CredentialRecord>>, StoreError>> {
        Box::pin(async move {
            // S4: a write in flight (another process's, or one whose task
            // was cut short by a reload) holds the credential's lock until
            // it lands; wait for it. Without a writer, a blocking read of a
            // small local file is cheaper than a thread hop.
            let Some(lock) = self.existing_lock(name)? else {
                return self.read(name);
            };
            match lock.try_lock_shared() {
                Ok(()) => self.read(name),
                Err(std::fs::TryLockError::WouldBlock) => {
                    let store = FileStore::at(&self.dir);
                    let (name, path) = (name.to_string(), self.lock_path(name));
                    tokio::task::spawn_blocking(move || {
                        lock.lock_shared().map_err(|e| io_err(&path, e))?;
                        store.read(&name)
                    })
                    .await
                    .map_err(|e| io_err(&self.dir, io::Error::other(e)))?
                }
                Err(std::fs::TryLockError::Error(e)) => Err(io_err(&self.lock_path(name), e)),
            }
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        name: &'a str,
        expected: Option<u64>,
        record: &'a CredentialRecord,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let bytes = record::encode(record, next_version(expected));
        let dir = self.dir.clone();
        let name = name.to_string();
        // fsync can take long on a busy disk: keep it off the async workers.
        Box::pin(async move {
            let path = dir.join(format!("{name}.json"));
            tokio::task::spawn_blocking(move || swap(&dir, &name, expected, &bytes))
                .await
                .map_err(|e| io_err(&path, io::Error::other(e)))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Rotation, SecretEntry};
    use secrecy::{ExposeSecret, SecretString};
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;

    fn record(value: &str) -> CredentialRecord {
        CredentialRecord::new(SecretEntry {
            id: Some("id1".into()),
            value: SecretString::from(value),
            created_at: SystemTime::UNIX_EPOCH,
            expires_at: None,
        })
    }

    #[test]
    fn root_gives_new_files_to_the_owner_of_their_directory() {
        assert_eq!(owner_for(0, 0), Ownership::default());
        assert_eq!(owner_for(0, 5), Ownership::default());
        assert_eq!(
            owner_for(61234, 61235),
            Ownership {
                uid: Some(61234),
                gid: Some(61235)
            }
        );
    }

    /// `sudo rekeyd set-secret` against the state of a daemon that runs as
    /// its own user: every file the store writes stays the daemon's, or the
    /// daemon could no longer read its journal.
    #[tokio::test]
    async fn as_root_the_files_written_belong_to_the_state_directorys_owner() {
        use std::os::unix::fs::MetadataExt;
        if !running_as_root() {
            eprintln!("skipped: needs root (giving files away is root's privilege)");
            return;
        }
        let (uid, gid) = (65534, 65533);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
        let store = FileStore::new(&state);
        // A lock file an earlier root-run command left root's.
        std::fs::create_dir(&store.dir).unwrap();
        std::os::unix::fs::chown(&store.dir, Some(uid), Some(gid)).unwrap();
        std::fs::write(store.lock_path("a"), b"").unwrap();
        let v1 = store
            .compare_and_swap("a", None, &record("one"))
            .await
            .unwrap();
        store
            .compare_and_swap("a", Some(v1), &record("two"))
            .await
            .unwrap();
        store.swap_history("a", None, b"{}").await.unwrap();
        drop(store.claim("a", false).await.unwrap());
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&store.dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            seen.push(entry.file_name().to_string_lossy().into_owned());
            assert_eq!(
                (meta.uid(), meta.gid()),
                (uid, gid),
                "{:?} is not the daemon's",
                entry.path()
            );
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "a.history.json",
                "a.history.lock",
                "a.json",
                "a.lock",
                "a.rotate.lock"
            ]
        );

        // A credentials directory root creates is the daemon's as well.
        let fresh = dir.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        std::os::unix::fs::chown(&fresh, Some(uid), Some(gid)).unwrap();
        let store = FileStore::new(&fresh.join("state"));
        store
            .compare_and_swap("b", None, &record("one"))
            .await
            .unwrap();
        for d in [fresh.join("state"), store.dir.clone()] {
            let meta = std::fs::metadata(&d).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{d:?}");
        }
    }

    #[tokio::test]
    async fn cas_round_trip_and_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert!(store.load("a").await.unwrap().is_none());
        let v1 = store
            .compare_and_swap("a", None, &record("one"))
            .await
            .unwrap();
        assert!(matches!(
            store.compare_and_swap("a", None, &record("x")).await,
            Err(StoreError::Conflict { .. })
        ));
        let mut r = record("two");
        r.rotation = Rotation::Creating {
            rid: "r1".into(),
            attempt: "a1".into(),
            chosen: None,
        };
        let v2 = store.compare_and_swap("a", Some(v1), &r).await.unwrap();
        assert_eq!(v2, v1 + 1);
        let got = store.load("a").await.unwrap().unwrap();
        assert_eq!(got.version, v2);
        assert_eq!(got.value.current.value.expose_secret(), "two");
        assert_eq!(got.value.rotation.phase(), "creating");
        let path = store.record_path("a");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn temp_files_left_by_a_crash_are_swept_but_not_under_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store
            .compare_and_swap("a", None, &record("one"))
            .await
            .unwrap();
        let leftover = store.dir.join(".a.json.tmp.4242.00000000000000aa");
        std::fs::write(&leftover, b"secret-bearing").unwrap();
        let busy = store.dir.join(".b.json.tmp.4243.00000000000000bb");
        std::fs::write(&busy, b"being written").unwrap();
        let writer = open_lock_file(&store.lock_path("b"), Ownership::default()).unwrap();
        writer.lock().unwrap();
        let unrelated = store.dir.join(".a.jsonx");
        std::fs::write(&unrelated, b"x").unwrap();

        assert_eq!(store.sweep_temp_files().unwrap(), 1);
        assert!(!leftover.exists());
        assert!(busy.exists(), "a write in flight keeps its temp file");
        assert!(unrelated.exists());
        assert!(store.load("a").await.unwrap().is_some());
        drop(writer);
        assert_eq!(store.sweep_temp_files().unwrap(), 1);
        assert!(!busy.exists());
    }

    #[tokio::test]
    async fn corrupt_record_is_loud_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let path = store.record_path("a");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"format\":1,\"vers").unwrap();
        let err = store.load("a").await.unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(
            store
                .compare_and_swap("a", Some(1), &record("x"))
                .await
                .is_err()
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"format\":1,\"vers");
    }
}
