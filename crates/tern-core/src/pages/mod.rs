//! Pages: where dumped memory goes and where restore takes it from.
//!
//! The dump reads a frozen process's present pages in large batches and hands them to a
//! [`PageSink`]: a local [`PageStore`] (tests, same-host restore) or a [`PageSender`] that streams
//! them to the destination's [`PageServer`] (see [`wire`] for the protocol). Zero pages travel as
//! markers only. Restore reads a [`PageStore`] range by range.
//!
//! - [`store`]: the in-memory page store (large runs, later writes win).
//! - [`wire`]: the TERN page stream format and its validating decoder.
//! - [`sender`]: the source side (batched, corked, vectored writes; bandwidth limit).
//! - [`server`]: the destination side (own threads; stages per connection, commits on END).
//! - [`pull`]: post-copy: the source serves the pages it kept, the destination pulls them.
//! - `net`: the accept side (listener, hello check, connection slots) and abortive close that
//!   the page server and the page source share.
//! - [`bench`]: page stream vs plain TCP throughput over loopback.

pub mod bench;
mod net;
pub mod pull;
pub mod sender;
pub mod server;
pub mod store;
pub mod wire;

pub use sender::{PageSender, SendError, SenderOptions, TransferStats};
pub use server::{Expected, PageServer, ServeError, ServerOptions, ServerProgress};
pub use store::{PageRef, PageRun, PageStore, StoreError, StoreStats};
pub use wire::{MigrationId, Token};

/// Size of a base page on x86_64.
pub const PAGE_SIZE: usize = 4096;

/// What a dump writes pages into. Addresses are page-aligned virtual addresses in the target.
pub trait PageSink {
    type Error: std::error::Error + Send + Sync + 'static;
    /// `data.len()` is a whole number of pages, starting at `vaddr`.
    fn put_pages(&mut self, vaddr: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// `count` pages of zeros starting at `vaddr` (sent as a marker, never as data).
    fn put_zero_pages(&mut self, vaddr: u64, count: u64) -> Result<(), Self::Error>;
}
