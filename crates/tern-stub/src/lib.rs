//! tern-stub: the program a restored process starts life as, and its protocol.
//!
//! The stub itself is `src/stub/main.rs`: a `#![no_std]`, `#![no_main]` static binary with its
//! own `_start` and raw syscalls (no libc, no dynamic loader, one loadable segment), compiled by
//! this crate's build script with the same rustc and embedded here as [`ELF`]. The engine runs it
//! from a memfd (`execveat(memfd, "", AT_EMPTY_PATH)`) in the child it cloned with the image's pid,
//! so no stub file has to be installed on the destination.
//!
//! [`protocol`] is the conversation between engine and stub (see its header).
#![no_std]

pub mod protocol;

/// The stub's executable (static ELF).
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern-stub"));
