//! The image model: one versioned, serde-serialisable description of a frozen process.
//!
//! Everything the destination needs to rebuild the process, except the pages themselves (those
//! travel as a page stream, see [`crate::pages`]). msgpack on the wire and on disk (rmp-serde,
//! named fields, so TypeScript reads it with msgpackr as plain objects); `migrate image show FILE`
//! prints one, like CRIU's crit.
//!
//! Ownership of the parts while the engine is being built:
//! - `task.rs` (process-wide state), `mm.rs` (address space), `thread.rs` (per-thread state):
//!   the dump/restore core.
//! - `fd.rs` (open files): the files work.

pub mod fd;
pub mod mm;
pub mod task;
pub mod thread;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of the model; a reader refuses other versions.
pub const IMAGE_VERSION: u32 = 1;

/// A whole frozen process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessImage {
    pub version: u32,
    pub source: SourceInfo,
    pub task: task::TaskImage,
    pub mm: mm::MmImage,
    pub threads: Vec<thread::ThreadImage>,
    pub fds: Vec<fd::FdImage>,
}

/// Where and when the image was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    /// Kernel release of the source (restore refuses a different vdso ABI, not a different string).
    pub kernel_release: String,
    /// The pid in the engine's namespace on the source and in the process's own pid namespace.
    pub pid: i32,
    pub ns_pid: i32,
    /// Clock ticks since boot at process start (with the pid, names this incarnation).
    pub start_time: u64,
    pub dumped_at_unix_ms: u64,
}
