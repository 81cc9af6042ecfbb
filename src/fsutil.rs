//! Durable, atomic file writes.
//!
//! A reader (or a crash) must only ever see the old content or the new, never
//! a half-written file, and the new content must survive power loss once we
//! act on it: write a fresh temp file → fsync → rename over the target →
//! fsync the directory. The temp file is created with `O_CREAT | O_EXCL`
//! (which never follows a symlink), accessible to its creator only until it
//! has its owner and final mode and before any content is written, so
//! neither a planted symlink nor a moment of looser permissions can leak
//! the content; renaming over a symlink replaces the link itself instead of
//! writing through it. A file can be given to
//! another owner and group before it appears ([`write_atomic_owned`]), with
//! user and group names looked up in the system's databases.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically and durably with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_owned(path, contents, mode, Ownership::default())
}

/// [`write_atomic`] without the directory's fsync: the new content is on
/// disk before it takes the name, but after a power failure the name may
/// still lead to the old content. Never a torn file; at worst the last
/// write lost. For records where that is acceptable and an fsync on every
/// write is not (the rotation history: an audit trail beside the journal,
/// which keeps its full durability). Given to `owner` as
/// [`write_atomic_owned`] does.
pub fn replace_atomic(path: &Path, contents: &[u8], mode: u32, owner: Ownership) -> io::Result<()> {
    write_temp_and_rename(path, contents, mode, owner, false)
}

/// The user and group a file written by [`write_atomic_owned`] is given;
/// `None` keeps what the writing process gets by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Like [`write_atomic`], and gives the file to `owner` before it appears
/// under `path`: readers never see it with the wrong owner or group.
///
/// The temp file is created readable by its creator only, given away
/// (`fchown(2)`), then set to `mode`, and only then written: nobody can
/// open it while it still carries the writer's group. Errors name the step
/// (`cannot set owner ... and group ...: Operation not permitted (os error
/// 1)` when the process may not give files away, see `chown(2)`); on any
/// error the temp file is removed and `path` keeps its old content.
pub fn write_atomic_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Ownership,
) -> io::Result<()> {
    write_temp_and_rename(path, contents, mode, owner, true)
}

/// The temp file, fsync, rename of [`write_atomic_owned`]; the directory's
/// fsync (which makes the rename itself durable) when `sync_name`.
fn write_temp_and_rename(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Ownership,
    sync_name: bool,
) -> io::Result<()> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{:016x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600 & mode)
            .open(&tmp)?;
        if owner != Ownership::default() {
            std::os::unix::fs::fchown(&file, owner.uid, owner.gid).map_err(|e| {
                let id = |id: Option<u32>| id.map_or("unchanged".to_string(), |i| i.to_string());
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot set owner {} and group {}: {e}",
                        id(owner.uid),
                        id(owner.gid)
                    ),
                )
            })?;
        }
        // Exactly `mode`: the umask may have narrowed it, and a chown may
        // clear bits.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if sync_name { sync_dir(&dir) } else { Ok(()) }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The uid of the user `name` (passwd database: /etc/passwd or NSS), if
/// there is one.
pub fn user_id(name: &str) -> io::Result<Option<u32>> {
    lookup(
        name,
        |name, entry: &mut libc::passwd, buf, result| {
            // SAFETY: every pointer is valid for the call: `name` is
            // NUL-terminated, `entry` and `result` are live, and `buf` is a
            // live buffer of the length passed.
            unsafe { libc::getpwnam_r(name, entry, buf.as_mut_ptr(), buf.len(), result) }
        },
        |entry| entry.pw_uid,
    )
}

/// The gid of the group `name` (group database: /etc/group or NSS), if
/// there is one.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    lookup(
        name,
        |name, entry: &mut libc::group, buf, result| {
            // SAFETY: as in `user_id`.
            unsafe { libc::getgrnam_r(name, entry, buf.as_mut_ptr(), buf.len(), result) }
        },
        |entry| entry.gr_gid,
    )
}

/// Calls a reentrant `get*nam_r` function, growing its buffer while it
/// answers ERANGE, and reads the id out of the entry while the buffer its
/// strings point into is alive.
fn lookup<T>(
    name: &str,
    call: impl Fn(*const libc::c_char, &mut T, &mut [libc::c_char], *mut *mut T) -> libc::c_int,
    id: impl Fn(&T) -> u32,
) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))?;
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd or group is a valid value (null
        // pointers, zero ids); the call overwrites it.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut result: *mut T = std::ptr::null_mut();
        match call(name.as_ptr(), &mut entry, &mut buf, &mut result) {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(id(&entry))),
            libc::ERANGE if size < 1 << 20 => size *= 4,
            // Some C libraries report "not found" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Makes a rename or create in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) if missing and narrows its mode to `mode`.
///
/// A symlink to a directory is accepted (systemd's `DynamicUser=` makes
/// `/var/lib/NAME` one), and so is a directory we may not chmod (the root of
/// a volume owned by root): the files inside are created 0600 regardless.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    create_dir_durable(dir, mode)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if meta.permissions().mode() & 0o777 != mode {
        match fs::set_permissions(dir, fs::Permissions::from_mode(mode)) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            other => other?,
        }
    }
    Ok(())
}

/// Creates `dir` and any missing parents with `mode`, and fsyncs each new
/// directory's parent: a file later written durably inside must not vanish
/// with its directory on power loss (I2).
fn create_dir_durable(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while fs::symlink_metadata(at).is_err() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(d) {
            // Created meanwhile by another process: it made it durable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            other => other?,
        }
        sync_dir(&parent_dir(d))?;
    }
    Ok(())
}

/// Whether `file_name` is a temp file [`write_atomic`] made for `target`
/// (left behind by a crash between create and rename).
pub fn is_temp_of(file_name: &str, target: &str) -> bool {
    file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(target))
        .is_some_and(|rest| rest.starts_with(".tmp."))
}

/// Removes the temp files [`write_atomic`] left for `path` in a process
/// that no longer runs (a `kill -9` between create and rename): they hold
/// what `path` was to hold, and nothing else would ever remove them. A
/// running process's temp file (its pid is in the name) may be a write in
/// flight and is left alone. Returns how many were removed.
pub fn sweep_dead_temps(path: &Path) -> io::Result<usize> {
    let Some(target) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(0);
    };
    let entries = match fs::read_dir(parent_dir(path)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_temp_of(&name, &target) {
            continue;
        }
        // `.{target}.tmp.{pid}.{random}`
        let pid = name[target.len() + 1..]
            .strip_prefix(".tmp.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        let alive = pid.is_some_and(|pid| {
            // SAFETY: kill(2) with signal 0 only checks that `pid` exists.
            pid > 0
                && (unsafe { libc::kill(pid, 0) } == 0
                    || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
        });
        if !alive && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn replaces_content_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory where the file belongs: the content is
        // written to the temp file, then the rename fails.
        let path = dir.path().join("token");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();
        let err = write_atomic(&path, b"secret", 0o600).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["token"], "no temp file left");
    }

    #[test]
    fn owner_and_group_are_set_before_the_file_appears() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // SAFETY: these calls only read the process's credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // Root may give it to anyone; others to themselves and their group.
        let (to_uid, to_gid) = if uid == 0 { (4242, 4343) } else { (uid, gid) };
        let owner = Ownership {
            uid: Some(to_uid),
            gid: Some(to_gid),
        };
        write_atomic_owned(&path, b"one", 0o640, owner).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (to_uid, to_gid));
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        if uid != 0 {
            // Giving it to root is refused, and says so; the file stays.
            let refused = Ownership {
                uid: Some(0),
                gid: None,
            };
            let err = write_atomic_owned(&path, b"two", 0o640, refused).unwrap_err();
            assert!(err.to_string().contains("cannot set owner 0"), "{err}");
            assert_eq!(fs::read(&path).unwrap(), b"one");
        }
    }

    #[test]
    fn users_and_groups_are_looked_up_by_name() {
        assert_eq!(user_id("root").unwrap(), Some(0));
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(user_id("no-such-user-rekeyd").unwrap(), None);
        assert_eq!(group_id("no-such-group-rekeyd").unwrap(), None);
        assert!(user_id("nul\0byte").is_err());
    }

    #[test]
    fn creates_missing_parents_private() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        ensure_private_dir(&deep, 0o700).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(dir.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{d}");
        }
        // Idempotent.
        ensure_private_dir(&deep, 0o700).unwrap();
    }

    #[test]
    fn temp_files_of_dead_processes_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("maps.token");
        std::fs::write(&target, b"current").unwrap();
        // A pid no process has (above the kernel's pid_max), ours, and
        // another target's.
        let dead = dir
            .path()
            .join(".maps.token.tmp.2147483646.00000000000000aa");
        let live = dir.path().join(format!(
            ".maps.token.tmp.{}.00000000000000bb",
            std::process::id()
        ));
        let other = dir
            .path()
            .join(".other.token.tmp.2147483646.00000000000000cc");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"half a token").unwrap();
        }
        assert_eq!(sweep_dead_temps(&target).unwrap(), 1);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && target.exists());
        assert_eq!(sweep_dead_temps(&dir.path().join("gone/x")).unwrap(), 0);
    }

    #[test]
    fn temp_files_are_recognised() {
        assert!(is_temp_of(".maps.json.tmp.12.00ab", "maps.json"));
        assert!(!is_temp_of(".maps.json.tmp.12.00ab", "map.json"));
        assert!(!is_temp_of("maps.json", "maps.json"));
        assert!(!is_temp_of(".maps.json", "maps.json"));
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("token");
        symlink(&victim, &path).unwrap();
        write_atomic(&path, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
