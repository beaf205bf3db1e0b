//! tern-core: the engine of Tern.
//!
//! A migration reads top-down through these modules:
//! - [`sys`]: newtypes over raw kernel ids ([`sys::Pid`]) and the errno helpers every module uses.
//! - [`proc`]: everything the kernel tells about a process through /proc (tasks, maps, fds, ...).
//! - [`check`]: turns a [`proc::ProcessInventory`] into a verdict: movable, or not and why.
//! - [`ptrace`]: seize, interrupt, read registers, detach — owned by one tracer thread per target.
//! - [`remote`]: run syscalls inside a frozen target (compel's technique, no parasite).
//! - [`pidfd`]: pidfd_open / pidfd_getfd, to duplicate a target's fds into the engine.
//! - [`probe`]: which kernel mechanisms this machine has (soft-dirty, userfaultfd, PAGEMAP_SCAN, ...).
//! - [`image`]: the versioned description of a frozen process (msgpack).
//! - [`dirty`]: dirty tracking for pre-copy (uffd-wp async + PAGEMAP_SCAN, or soft-dirty).
//! - [`dump`]: freeze a process and produce its image plus a page stream.
//! - [`pages`]: page sinks and the page store; the page transfer protocol.
//! - [`files`]: dump and recreate each kind of open file.
//! - [`restore`]: rebuild a process from an image with the same pid.
//! - [`uapi`]: kernel ABI newer than this machine's headers (PAGEMAP_SCAN, userfaultfd).

pub mod check;
pub mod dirty;
pub mod dump;
pub mod files;
pub mod image;
pub mod pages;
pub mod pidfd;
pub mod probe;
pub mod proc;
pub mod ptrace;
pub mod remote;
pub mod restore;
pub mod sys;
pub mod uapi;
