//! Image locking, compatible with QEMU's (`block/file-posix.c`).
//!
//! QEMU describes what each user of an image file does with four permissions (bit `i` of a mask):
//! consistent read (0), write (1), write unchanged (2) and resize (3). A user holds an OFD
//! (open file description) *shared* lock on byte `100 + i` for each permission it takes, and on
//! byte `200 + i` for each permission it does not let others take. Every lock is a read lock, so
//! locks never conflict with each other; conflicts are found by testing (`F_OFD_GETLK` with a
//! write lock) whether any *other* open file description holds a byte:
//!
//! - wanting permission `i` fails when someone holds `200 + i` (they do not share it):
//!   `Failed to get "write" lock`;
//! - refusing to share permission `i` fails when someone holds `100 + i` (they use it):
//!   `Failed to get shared "write" lock`.
//!
//! As QEMU does, the bytes are locked first and tested afterwards, so that of two users opening
//! at the same moment at least one sees the other. What a qcow2 image takes (measured with
//! qemu-io 10.0 and /proc/locks, see `tests/tests/locking.rs`):
//!
//! | open | bytes | [`LockMode`] |
//! |---|---|---|
//! | read-write | 100, 101, 103, 201, 203 | `ReadWrite` |
//! | read-only, and every qcow2 backing file | 100, 201, 203 | `ReadOnly` |
//! | read-only with `-U` (force-share), and every raw backing file | 100 | `ForceShare` |
//! | creation (`raw_co_create`) | 101, 103, 203 | `Create` |
//!
//! OFD locks belong to the open file description: they are released when the file is closed,
//! and two opens of one file in one process exclude each other like two processes do. On a file
//! system without byte-range locks (the lock call fails with ENOLCK, EINVAL or EOPNOTSUPP) the
//! file is used without locks, as QEMU's `locking=auto` does where OFD locks are unavailable.

use std::fs::File;
use std::io;

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

const CONSISTENT_READ: u8 = 1;
const WRITE: u8 = 2;
const RESIZE: u8 = 8;
const ALL: u8 = 0xf;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What an opener does with an image file, in QEMU's terms: which lock bytes it holds and which
/// conflicts it checks for (see [`crate::storage::Storage::lock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockMode {
    /// A read-only open, and every backing file: reads, and lets nobody else write or resize.
    ReadOnly,
    /// A read-write open: reads, writes and resizes, and lets nobody else write or resize.
    ReadWrite,
    /// A read-only open that shares everything (`qemu-img -U`, `force-share=on`): reads, and
    /// fails only against a user that does not share reading.
    ForceShare,
    /// Creating the file: writes and resizes, and lets nobody else resize.
    Create,
}

impl LockMode {
    /// (permissions taken, permissions shared with others)
    fn perms(self) -> (u8, u8) {
        let not_wr = ALL & !(WRITE | RESIZE);
        match self {
            LockMode::ReadOnly => (CONSISTENT_READ, not_wr),
            LockMode::ReadWrite => (CONSISTENT_READ | WRITE | RESIZE, not_wr),
            LockMode::ForceShare => (CONSISTENT_READ, ALL),
            LockMode::Create => (WRITE | RESIZE, ALL & !RESIZE),
        }
    }
}

/// The lock bytes one open file description holds.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Bytes `100 + i` held.
    perm: u8,
    /// Bytes `200 + i` held.
    unshared: u8,
    /// The file system does not support the locks: none are taken.
    off: bool,
}

enum Fail {
    /// The file system has no byte-range locks.
    Unsupported,
    /// Another user: what we could not get.
    Conflict(String),
    Io(io::Error),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        match e.raw_os_error() {
            Some(libc::ENOLCK)
            | Some(libc::EINVAL)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS) => Fail::Unsupported,
            _ => Fail::Io(e),
        }
    }
}

/// Take the locks of `mode` on `file` (named `name` in messages), replacing what `held` holds.
/// On a conflict nothing changes and the error is [`Error::Locked`].
pub(crate) fn set(file: &File, name: &str, held: &mut Held, mode: LockMode) -> Result<()> {
    if held.off {
        return Ok(());
    }
    let (perm, shared) = mode.perms();
    let (old_perm, old_unshared) = (held.perm, held.unshared);
    // Lock the union of the old and the new bytes, then look for other users (as QEMU's
    // RAW_PL_PREPARE), then drop what the new mode does not need (RAW_PL_COMMIT).
    let r = apply(
        file,
        held,
        old_perm | perm,
        old_unshared | (ALL & !shared),
        false,
    )
    .and_then(|()| check(file, perm, shared))
    .and_then(|()| apply(file, held, perm, ALL & !shared, true));
    let hint = |what: String| Error::Locked {
        file: name.to_string(),
        what,
    };
    match r {
        Ok(()) => Ok(()),
        Err(Fail::Unsupported) => {
            let _ = apply(file, held, 0, 0, true);
            held.off = true;
            Ok(())
        }
        Err(e) => {
            let _ = apply(file, held, old_perm, old_unshared, true);
            Err(match e {
                Fail::Conflict(what) => hint(what),
                Fail::Io(e) => Error::io(name, "lock the image", e),
                Fail::Unsupported => unreachable!("handled above"),
            })
        }
    }
}

/// Release every lock byte (when the file is closed).
///
/// Closing the descriptor would release them too, but only once no other descriptor refers to
/// the open file description: a process that another thread is starting holds a copy of every
/// descriptor from its fork until its exec, and a user that opens the image in that moment (a
/// qemu-img we run right after closing it) would find it locked.
pub(crate) fn release(file: &File, held: &mut Held) {
    if held.perm | held.unshared != 0 {
        let _ = apply(file, held, 0, 0, true);
    }
}

/// Lock the bytes for `perm` and `unshared` not held yet; with `unlock`, release the others.
fn apply(
    file: &File,
    held: &mut Held,
    perm: u8,
    unshared: u8,
    unlock: bool,
) -> std::result::Result<(), Fail> {
    for i in 0..4 {
        let bit = 1u8 << i;
        for (base, want, have) in [
            (PERM_BASE, perm, &mut held.perm),
            (SHARED_BASE, unshared, &mut held.unshared),
        ] {
            let byte = base + i as i64;
            if want & bit != 0 && *have & bit == 0 {
                match sys::set(file, byte, true) {
                    Ok(()) => *have |= bit,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Someone holds a write lock on it (QEMU never does).
                        return Err(Fail::Conflict(format!("Failed to lock byte {byte}")));
                    }
                    Err(e) => return Err(e.into()),
                }
            } else if unlock && want & bit == 0 && *have & bit != 0 {
                sys::set(file, byte, false)?;
                *have &= !bit;
            }
        }
    }
    Ok(())
}

/// Look for other users that conflict with taking `perm` and sharing only `shared`.
fn check(file: &File, perm: u8, shared: u8) -> std::result::Result<(), Fail> {
    for (i, name) in NAMES.iter().enumerate() {
        if perm & (1 << i) != 0 && sys::held_by_other(file, SHARED_BASE + i as i64)? {
            return Err(Fail::Conflict(format!("Failed to get \"{name}\" lock")));
        }
    }
    for (i, name) in NAMES.iter().enumerate() {
        if shared & (1 << i) == 0 && sys::held_by_other(file, PERM_BASE + i as i64)? {
            return Err(Fail::Conflict(format!(
                "Failed to get shared \"{name}\" lock"
            )));
        }
    }
    Ok(())
}

/// The two `fcntl` calls: the only unsafe code of the crate.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    fn fcntl(file: &File, cmd: libc::c_int, typ: libc::c_int, byte: i64) -> io::Result<i32> {
        // SAFETY: `flock` is a plain C struct of integers, for which all zeros is a valid value
        // (and `l_pid` must be 0 for OFD locks).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        loop {
            // SAFETY: the descriptor is open for as long as `file` is borrowed, and `fl` is a
            // valid `flock` that outlives the call (F_OFD_GETLK writes into it).
            let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
            if r != -1 {
                return Ok(fl.l_type as i32);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Take a shared lock on `byte` (or release it). EAGAIN/EACCES (someone holds a write lock
    /// on the byte) come back as `WouldBlock`.
    pub(super) fn set(file: &File, byte: i64, lock: bool) -> io::Result<()> {
        let typ = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
        match fcntl(file, libc::F_OFD_SETLK, typ, byte) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether another open file description holds a lock on `byte`.
    pub(super) fn held_by_other(file: &File, byte: i64) -> io::Result<bool> {
        Ok(fcntl(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)? != libc::F_UNLCK)
    }
}

/// No OFD locks on this system: images are used without locks.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::fs::File;
    use std::io;

    pub(super) fn set(_: &File, _: i64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
    pub(super) fn held_by_other(_: &File, _: i64) -> io::Result<bool> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockless_file_systems_are_told_from_conflicts_and_io_errors() {
        for errno in [libc::ENOLCK, libc::EINVAL, libc::EOPNOTSUPP, libc::ENOSYS] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(matches!(Fail::from(e), Fail::Unsupported), "errno {errno}");
        }
        let e = io::Error::from_raw_os_error(libc::EBADF);
        assert!(matches!(Fail::from(e), Fail::Io(_)));
    }

    #[test]
    fn modes_hold_qemus_bytes() {
        let bytes = |m: LockMode| {
            let (perm, shared) = m.perms();
            let mut b: Vec<i64> = (0..4)
                .filter(|i| perm & (1 << i) != 0)
                .map(|i| 100 + i)
                .collect();
            b.extend((0..4).filter(|i| shared & (1 << i) == 0).map(|i| 200 + i));
            b
        };
        assert_eq!(bytes(LockMode::ReadWrite), [100, 101, 103, 201, 203]);
        assert_eq!(bytes(LockMode::ReadOnly), [100, 201, 203]);
        assert_eq!(bytes(LockMode::ForceShare), [100]);
        assert_eq!(bytes(LockMode::Create), [101, 103, 203]);
    }
}
