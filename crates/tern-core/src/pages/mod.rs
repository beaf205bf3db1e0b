//! Pages: where dumped memory goes and where restore takes it from.
//!
//! The dump reads a frozen process's present pages in large batches and hands them to a
//! [`PageSink`]: a local [`PageStore`] (tests, same-host restore) or a network sender that streams
//! them to the destination's page server (see the transfer module). Zero pages travel as markers only.
//! Restore reads a [`PageStore`] range by range.

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
