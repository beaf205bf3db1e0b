//! Small shared vocabulary: kernel id newtypes and errno plumbing.
//!
//! Every raw syscall in the engine goes through [`Errno::result`] (or a sibling) so that a failing
//! call turns into a typed [`Errno`] at the point of the call, never into a silently ignored -1.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A process or thread id as the engine's own pid namespace sees it.
///
/// A newtype rather than a bare `i32` so that a tid, a pid and an fd can never be swapped by
/// accident in a call, and so that "not a valid pid" (≤ 0) is refused once, at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pid(i32);

impl Pid {
    /// Wraps a raw id; `None` for values the kernel never hands out as a process id (≤ 0).
    pub fn new(raw: i32) -> Option<Pid> {
        (raw > 0).then_some(Pid(raw))
    }

    /// Wraps a raw id known to be valid (from the kernel itself, e.g. a /proc directory name).
    pub const fn from_raw(raw: i32) -> Pid {
        Pid(raw)
    }

    /// The engine's own process id.
    pub fn this() -> Pid {
        Pid(std::process::id() as i32)
    }

    pub const fn as_raw(self) -> i32 {
        self.0
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A thread id. The kernel draws thread ids and process ids from one number space (a process id is
/// the id of its thread-group leader), so a tid is a [`Pid`] by another name; the alias documents
/// which of the two a signature means.
pub type Tid = Pid;

/// An errno value returned by a failed syscall.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current errno.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Turns a libc-style return value (-1 and errno on failure) into a `Result`.
    pub fn result<T: SentinelNegOne>(value: T) -> Result<T, Errno> {
        if value.is_neg_one() {
            Err(Errno::last())
        } else {
            Ok(value)
        }
    }

    pub fn desc(self) -> String {
        std::io::Error::from_raw_os_error(self.0).to_string()
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {})", self.0, self.desc())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc())
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

/// Return types of libc calls whose failure sentinel is -1.
pub trait SentinelNegOne: Copy {
    fn is_neg_one(self) -> bool;
}

impl SentinelNegOne for i32 {
    fn is_neg_one(self) -> bool {
        self == -1
    }
}
impl SentinelNegOne for i64 {
    fn is_neg_one(self) -> bool {
        self == -1
    }
}
impl SentinelNegOne for isize {
    fn is_neg_one(self) -> bool {
        self == -1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_refuses_non_positive() {
        assert_eq!(Pid::new(0), None);
        assert_eq!(Pid::new(-5), None);
        assert_eq!(Pid::new(42).map(Pid::as_raw), Some(42));
    }

    #[test]
    fn errno_result_maps_minus_one() {
        // SAFETY: close(-1) touches no memory and always fails with EBADF.
        let r = Errno::result(unsafe { libc::close(-1) });
        assert_eq!(r, Err(Errno(libc::EBADF)));
        assert_eq!(Errno::result(3i32), Ok(3));
    }
}
