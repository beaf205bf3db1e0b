//! tern-stub: the program a restored process starts life as, and its protocol; and the guard
//! a lazy restore leaves beside the process.
//!
//! The stub itself is `src/stub/main.rs`: a `#![no_std]`, `#![no_main]` static binary with its
//! own `_start` and raw syscalls (no libc, no dynamic loader, one loadable segment), compiled by
//! this crate's build script with the same rustc and embedded here as [`ELF`]. The engine runs it
//! from a memfd (`execveat(memfd, "", AT_EMPTY_PATH)`) in the child it cloned with the image's pid,
//! so no stub file has to be installed on the destination.
//!
//! [`protocol`] is the conversation between engine and stub (see its header).
//!
//! The guard is `src/guard/main.rs`, built and started the same way ([`GUARD_ELF`]): while a
//! restored process's memory is still lazy it holds a dup of its userfaultfd (and of every forked
//! child's) and kills the process and its descendants if the engine dies (see [`guard_protocol`],
//! and tern-core's restore/guard.rs). Both programs
//! share their runtime (`src/rt.rs`: `_start`, raw syscalls, panic handler, mem* functions).
#![no_std]

pub mod guard_protocol;
pub mod protocol;

/// The stub's executable (static ELF).
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern-stub"));

/// The guard's executable (static ELF).
pub static GUARD_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern-guard"));
