//! The guard's fds and its two bytes: one source file compiled into the engine (as
//! `tern_stub::guard_protocol`) and into the guard (`src/guard/main.rs`, by `#[path]`).
//!
//! The engine starts the guard with these fds in place and nothing else open (fds 1 and 2 are
//! closed: the guard prints nothing):
//!
//! ```text
//!  fd 0  CHANNEL_FD  its end of an AF_UNIX stream socketpair with the engine
//!  fd 3  UFFD_FD     a dup of the restored process's userfaultfd (the root one)
//!  fd 4  ENGINE_FD   a pidfd of the engine's process (readable when it has exited)
//!  fd 5  PROCESS_FD  a pidfd of the restored process (readable when it has exited)
//! ```
//!
//! The guard writes [`ARMED`] on the channel once it holds and watches all of them; the engine
//! writes [`HOLD`] with one fd attached (SCM_RIGHTS) for every child the process forks while its
//! memory is lazy (that child's userfaultfd: the guard holds at most [`MAX_HELD`] of them), and
//! [`RELEASE`] when the guard is no longer needed. End of file on the channel without
//! [`RELEASE`] (the engine closed it or died) or the engine's exit: the guard kills the process
//! and every descendant of it.

/// Its end of the socketpair with the engine.
pub const CHANNEL_FD: i32 = 0;
/// The userfaultfd it holds (and never reads).
pub const UFFD_FD: i32 = 3;
/// pidfd of the engine's process.
pub const ENGINE_FD: i32 = 4;
/// pidfd of the restored process.
pub const PROCESS_FD: i32 = 5;

/// Guard → engine: everything is held and watched.
pub const ARMED: u8 = b'A';
/// Engine → guard, with one fd in an SCM_RIGHTS message: the userfaultfd of a child the process
/// forked (UFFD_EVENT_FORK); hold it like the root one.
pub const HOLD: u8 = b'F';
/// How many forked children's userfaultfds the guard holds at most; it closes any beyond (and
/// the engine counts those as unguarded).
pub const MAX_HELD: usize = 256;
/// Engine → guard: every page is home and the ranges are unregistered; exit, kill nothing.
pub const RELEASE: u8 = b'R';

/// Exit status: released, or the process exited by itself (holding no forked child's
/// userfaultfd).
pub const EXIT_DONE: i32 = 0;
/// Exit status: the engine went away first; the guard killed the process and its descendants
/// (and waited for their exit).
pub const EXIT_KILLED: i32 = 1;
/// Exit status: one of its fds was missing at start (it never reported armed).
pub const EXIT_BAD_FDS: i32 = 2;
/// Exit status: reporting armed failed (the engine's end was closed).
pub const EXIT_NOT_ARMED: i32 = 3;
