//! The source side of a page stream: [`PageSender`] (a [`PageSink`] over TCP).
//!
//! ```text
//! connect(addr, migration_id, token, opts)
//!   TCP connect (connect_timeout) → HELLO → wait HELLO REPLY (io_timeout) → TCP_CORK on
//! put_pages / put_zero_pages           (no syscall per page)
//!   small puts (≤ 64 KiB) are copied into a 4 MiB send buffer; a put that continues the last
//!   buffered record (next address, same kind, under the record cap) extends that record instead
//!   of starting a new one. A large put is sent straight from the caller's memory: one
//!   sendmsg(MSG_NOSIGNAL) carries [pending buffer, header, ≤4 MiB payload, header, ...] (up to
//!   IOV_MAX iovecs), so the payload is never copied in user space.
//! bandwidth limit
//!   a token bucket (burst 50 ms of the rate, 64 KiB..4 MiB) in front of every sendmsg; each call
//!   sends at most what the bucket grants, sleeping for the rest.
//! finish()
//!   END (totals + rolling crc) → TCP_CORK off (pushes the tail) → wait STATUS (io_timeout)
//!   → OK only if the destination committed and its totals equal ours.
//! ```
//!
//! Any write failure poisons the sender (the stream is broken; every later call fails). The
//! sender then tries, for a short while, to read the STATUS the destination sends when it drops a
//! stream, so that the error says why (checksum, range, ...) rather than just "broken pipe".

use super::net::setsockopt;
use super::store::USER_ADDR_LIMIT;
use super::wire::{
    self, crc32c, crc32c_append, decode_hello_reply, EndTotals, Hello, HelloStatus, Kind,
    MigrationId, RecordHeader, Status, Token, HEADER_LEN, HELLO_REPLY_LEN, MAX_DATA_PAGES,
    MAX_ZERO_PAGES,
};
use super::{PageRun, PageSink, PageStore, PAGE_SIZE};
use serde::Serialize;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;
/// Puts up to this size are copied into the send buffer; bigger ones go out zero-copy.
const SMALL_PUT: usize = 64 << 10;
/// The send buffer is flushed when it reaches this size.
const BUF_FLUSH: usize = 4 << 20;
/// Most iovecs in one sendmsg (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// Cap on bytes per second on the wire (headers included); `None` = as fast as possible.
    pub bandwidth_limit_bytes_per_sec: Option<u64>,
    pub connect_timeout: Duration,
    /// Longest wait for the hello reply, for one blocked write, and for the final STATUS.
    pub io_timeout: Duration,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            bandwidth_limit_bytes_per_sec: None,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of one finished stream (the sender's or the server's view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferStats {
    pub data_pages: u64,
    pub zero_pages: u64,
    /// DATA + ZERO records.
    pub records: u64,
    /// Page data bytes (data_pages × 4096).
    pub payload_bytes: u64,
    /// Everything on the wire in the source → destination direction, hello and END included.
    pub wire_bytes: u64,
    pub elapsed_secs: f64,
    /// wire_bytes / elapsed_secs.
    pub throughput_bytes_per_sec: f64,
}

impl TransferStats {
    pub(crate) fn new(totals: &EndTotals, wire_bytes: u64, elapsed: Duration) -> TransferStats {
        let secs = elapsed.as_secs_f64();
        TransferStats {
            data_pages: totals.data_pages,
            zero_pages: totals.zero_pages,
            records: totals.records,
            payload_bytes: totals.data_pages * PAGE,
            wire_bytes,
            elapsed_secs: secs,
            throughput_bytes_per_sec: if secs > 0.0 {
                wire_bytes as f64 / secs
            } else {
                0.0
            },
        }
    }
}

/// Why connecting a page stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("page stream: connecting to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("page stream: setting up the socket to {addr} failed")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("page stream: sending the hello to {addr} failed")]
    Hello {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("page stream: no hello reply from {addr}")]
    NoReply {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("page stream: {addr} is not a TERN page server (bad reply magic)")]
    NotAPageServer { addr: SocketAddr },
    #[error("page stream: {addr} refused the stream: {status}")]
    Refused {
        addr: SocketAddr,
        status: HelloStatus,
    },
}

/// Why sending pages (or finishing the stream) failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("page stream: refusing to send {pages} page(s) at {vaddr:#x}: address not page-aligned or beyond the user address space")]
    BadRange { vaddr: u64, pages: u64 },
    #[error("page stream: data length {len} at {vaddr:#x} is not a whole number of pages")]
    PartialPage { vaddr: u64, len: usize },
    #[error("page stream: writing to the destination failed")]
    Write(#[source] io::Error),
    #[error("page stream: the destination dropped the stream: {} (status {code})", wire::status::describe(*.code))]
    Rejected { code: u32 },
    #[error("page stream: no valid STATUS from the destination after END")]
    NoStatus(#[source] wire::RecordError),
    #[error(
        "page stream: destination's totals differ from ours (ours {ours:?}, theirs {theirs:?})"
    )]
    TotalsMismatch { ours: EndTotals, theirs: EndTotals },
    #[error("page stream: an earlier write failed; the stream is broken")]
    Poisoned,
}

/// A token bucket: `rate` bytes/s, at most `burst` bytes at once.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).clamp(64.0 * 1024.0, 4.0 * 1024.0 * 1024.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Blocks until up to `want` bytes may be sent; returns how many (≥ 1).
    fn grant(&mut self, want: usize) -> usize {
        let n = (want as f64).min(self.burst).max(1.0);
        self.refill();
        if self.tokens < n {
            std::thread::sleep(Duration::from_secs_f64((n - self.tokens) / self.rate));
            self.refill();
        }
        // Oversleeping gives nothing back beyond the burst; undersleeping leaves a small debt.
        self.tokens -= n;
        n as usize
    }
}

/// The record at the end of the send buffer, still growable.
#[derive(Debug)]
struct OpenRecord {
    kind: Kind,
    /// Offset of its header in the send buffer.
    at: usize,
    vaddr: u64,
    pages: u32,
    crc: u32,
}

/// Streams pages to a [`super::PageServer`]. Blocking; use it from a worker thread.
#[derive(Debug)]
pub struct PageSender {
    sock: TcpStream,
    peer: SocketAddr,
    opts: SenderOptions,
    bucket: Option<TokenBucket>,
    buf: Vec<u8>,
    open: Option<OpenRecord>,
    totals: EndTotals,
    wire_bytes: u64,
    started: Instant,
    poisoned: bool,
}

fn set_cork(sock: &TcpStream, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    setsockopt(sock, libc::IPPROTO_TCP, libc::TCP_CORK, &v)
}

/// One sendmsg(MSG_NOSIGNAL) of `parts` (no SIGPIPE if the peer is gone: EPIPE instead).
fn send_iov(sock: &TcpStream, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: msghdr is plain data; all-zero is a valid empty header (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    // SAFETY: every iovec points into a slice borrowed for the duration of the call, with its
    // exact length; the kernel only reads them. `iov` and `msg` outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl PageSender {
    pub fn connect(
        addr: SocketAddr,
        migration_id: MigrationId,
        token: Token,
        opts: SenderOptions,
    ) -> Result<PageSender, ConnectError> {
        let sock = TcpStream::connect_timeout(&addr, opts.connect_timeout)
            .map_err(|source| ConnectError::Connect { addr, source })?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nodelay(false)?;
            s.set_read_timeout(Some(opts.io_timeout))?;
            s.set_write_timeout(Some(opts.io_timeout))
        };
        setup(&sock).map_err(|source| ConnectError::Socket { addr, source })?;
        let hello = Hello::new(migration_id, token).encode();
        let started = Instant::now();
        send_all_plain(&sock, &hello).map_err(|source| ConnectError::Hello { addr, source })?;
        let mut reply = [0u8; HELLO_REPLY_LEN];
        let got = wire::read_full(&mut &sock, &mut reply)
            .map_err(|source| ConnectError::NoReply { addr, source })?;
        if got < HELLO_REPLY_LEN {
            return Err(ConnectError::NoReply {
                addr,
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {got} of {HELLO_REPLY_LEN} reply bytes"),
                ),
            });
        }
        match decode_hello_reply(&reply) {
            None => return Err(ConnectError::NotAPageServer { addr }),
            Some((HelloStatus::Ok, _)) => {}
            Some((status, _)) => return Err(ConnectError::Refused { addr, status }),
        }
        set_cork(&sock, true).map_err(|source| ConnectError::Socket { addr, source })?;
        Ok(PageSender {
            sock,
            peer: addr,
            bucket: opts.bandwidth_limit_bytes_per_sec.map(TokenBucket::new),
            opts,
            buf: Vec::with_capacity(BUF_FLUSH + SMALL_PUT + 2 * HEADER_LEN),
            open: None,
            totals: EndTotals {
                stream_crc: crc32c(&hello),
                ..EndTotals::default()
            },
            wire_bytes: 0,
            started,
            poisoned: false,
        })
        .map(|mut s| {
            s.wire_bytes = hello.len() as u64;
            s
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Counters so far (records still buffered are not counted yet).
    pub fn stats(&self) -> TransferStats {
        TransferStats::new(&self.totals, self.wire_bytes, self.started.elapsed())
    }

    /// Accounts a finished record header (in stream order).
    fn account(&mut self, hb: &[u8; HEADER_LEN], kind: Kind, pages: u32) {
        self.totals.stream_crc = wire::roll(self.totals.stream_crc, hb);
        self.totals.records += 1;
        match kind {
            Kind::Data => self.totals.data_pages += u64::from(pages),
            _ => self.totals.zero_pages += u64::from(pages),
        }
    }

    /// Writes the final header of the open record into the buffer.
    fn seal(&mut self) {
        if let Some(o) = self.open.take() {
            let hb = RecordHeader {
                kind: o.kind,
                page_count: o.pages,
                vaddr: o.vaddr,
                payload_crc: o.crc,
            }
            .encode();
            self.buf[o.at..o.at + HEADER_LEN].copy_from_slice(&hb);
            self.account(&hb, o.kind, o.pages);
        }
    }

    fn open_record(&mut self, kind: Kind, vaddr: u64) {
        self.seal();
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        self.open = Some(OpenRecord {
            kind,
            at,
            vaddr,
            pages: 0,
            crc: 0,
        });
    }

    /// Sends all of `parts` (gathered), honouring the bandwidth limit.
    fn send_all(&mut self, parts: &[&[u8]]) -> Result<(), SendError> {
        if self.poisoned {
            return Err(SendError::Poisoned);
        }
        let (mut i, mut off) = (0usize, 0usize);
        let mut slices: Vec<&[u8]> = Vec::with_capacity(parts.len().min(IOV_MAX));
        while i < parts.len() {
            let remaining: usize = parts[i..].iter().map(|p| p.len()).sum::<usize>() - off;
            if remaining == 0 {
                break;
            }
            let mut budget = match &mut self.bucket {
                Some(b) => b.grant(remaining),
                None => remaining,
            };
            slices.clear();
            let (mut j, mut o) = (i, off);
            while budget > 0 && j < parts.len() && slices.len() < IOV_MAX {
                let take = (parts[j].len() - o).min(budget);
                if take > 0 {
                    slices.push(&parts[j][o..o + take]);
                }
                budget -= take;
                if o + take == parts[j].len() {
                    j += 1;
                    o = 0;
                } else {
                    o += take;
                }
            }
            let mut n = match send_iov(&self.sock, &slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(self.broken(e)),
            };
            self.wire_bytes += n as u64;
            // Advance (i, off) by n bytes.
            while n > 0 {
                let left = parts[i].len() - off;
                if n >= left {
                    n -= left;
                    i += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
            while i < parts.len() && parts[i].len() == off {
                i += 1;
                off = 0;
            }
        }
        Ok(())
    }

    /// A write failed: poison, and try to learn from the destination why.
    fn broken(&mut self, e: io::Error) -> SendError {
        self.poisoned = true;
        let timeout = Some(Duration::from_millis(500));
        if self.sock.set_read_timeout(timeout).is_ok() {
            if let Ok(st) = Status::read_from(&mut &self.sock) {
                if st.code != wire::status::OK {
                    return SendError::Rejected { code: st.code };
                }
            }
        }
        if e.kind() == io::ErrorKind::WouldBlock {
            return SendError::Write(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "destination accepted no data for {:?}",
                    self.opts.io_timeout
                ),
            ));
        }
        SendError::Write(e)
    }

    fn flush_buf(&mut self) -> Result<(), SendError> {
        self.seal();
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.send_all(&[&buf]);
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    /// Sends everything buffered and pushes it out of the kernel now (uncork + recork).
    pub fn flush(&mut self) -> Result<(), SendError> {
        self.flush_buf()?;
        set_cork(&self.sock, false)
            .and_then(|()| set_cork(&self.sock, true))
            .map_err(|e| self.broken(e))
    }

    /// Streams every run of `store` (e.g. a same-host dump) in address order.
    pub fn send_store(&mut self, store: &PageStore) -> Result<(), SendError> {
        for (vaddr, run) in store.ranges() {
            match run {
                PageRun::Data(d) => self.put_pages(vaddr, d)?,
                PageRun::Zero { count } => self.put_zero_pages(vaddr, count)?,
            }
        }
        Ok(())
    }

    /// Sends END, waits for the destination's STATUS and checks its totals against ours.
    pub fn finish(mut self) -> Result<TransferStats, SendError> {
        self.flush_buf()?;
        let end = self.totals.encode_record();
        self.send_all(&[&end])?;
        set_cork(&self.sock, false).map_err(|e| self.broken(e))?;
        let _ = self.sock.set_read_timeout(Some(self.opts.io_timeout));
        let st = Status::read_from(&mut &self.sock).map_err(SendError::NoStatus)?;
        if st.code != wire::status::OK {
            return Err(SendError::Rejected { code: st.code });
        }
        if st.totals != self.totals {
            return Err(SendError::TotalsMismatch {
                ours: self.totals,
                theirs: st.totals,
            });
        }
        Ok(TransferStats::new(
            &self.totals,
            self.wire_bytes,
            self.started.elapsed(),
        ))
    }
}

fn send_all_plain(sock: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        match send_iov(sock, &[b]) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn check_range(vaddr: u64, pages: u64) -> Result<(), SendError> {
    let ok = vaddr & (PAGE - 1) == 0
        && pages
            .checked_mul(PAGE)
            .and_then(|l| vaddr.checked_add(l))
            .is_some_and(|e| e <= USER_ADDR_LIMIT);
    if ok {
        Ok(())
    } else {
        Err(SendError::BadRange { vaddr, pages })
    }
}

impl PageSink for PageSender {
    type Error = SendError;

    fn put_pages(&mut self, vaddr: u64, data: &[u8]) -> Result<(), SendError> {
        if data.len() & (PAGE_SIZE - 1) != 0 {
            return Err(SendError::PartialPage {
                vaddr,
                len: data.len(),
            });
        }
        let pages = (data.len() / PAGE_SIZE) as u64;
        check_range(vaddr, pages)?;
        if self.poisoned {
            return Err(SendError::Poisoned);
        }
        if data.is_empty() {
            return Ok(());
        }
        if data.len() <= SMALL_PUT {
            let extend = matches!(&self.open, Some(o) if o.kind == Kind::Data
                && o.vaddr + u64::from(o.pages) * PAGE == vaddr
                && u64::from(o.pages) + pages <= u64::from(MAX_DATA_PAGES));
            if !extend {
                self.open_record(Kind::Data, vaddr);
            }
            let o = self.open.as_mut().expect("open record");
            o.pages += pages as u32;
            o.crc = crc32c_append(o.crc, data);
            self.buf.extend_from_slice(data);
            if self.buf.len() >= BUF_FLUSH {
                self.flush_buf()?;
            }
            return Ok(());
        }
        // Large: one record (≤ 4 MiB) per sendmsg, payload straight from `data`, the pending
        // buffer in front of the first. The checksum of each record is computed just before it is
        // sent, so the bytes are cache-hot for the kernel's copy and the receiver is kept busy
        // (checksumming everything first would stall the pipe for the whole put).
        self.seal();
        let chunk = MAX_DATA_PAGES as usize * PAGE_SIZE;
        let mut pending = std::mem::take(&mut self.buf);
        let mut result = Ok(());
        for (k, c) in data.chunks(chunk).enumerate() {
            let pages = (c.len() / PAGE_SIZE) as u32;
            let h = RecordHeader {
                kind: Kind::Data,
                page_count: pages,
                vaddr: vaddr + (k * chunk) as u64,
                payload_crc: crc32c(c),
            }
            .encode();
            let r = if pending.is_empty() {
                self.send_all(&[&h, c])
            } else {
                self.send_all(&[&pending, &h, c])
            };
            pending.clear();
            if let Err(e) = r {
                result = Err(e);
                break;
            }
            self.account(&h, Kind::Data, pages);
        }
        self.buf = pending;
        result
    }

    fn put_zero_pages(&mut self, vaddr: u64, count: u64) -> Result<(), SendError> {
        check_range(vaddr, count)?;
        if self.poisoned {
            return Err(SendError::Poisoned);
        }
        let (mut vaddr, mut count) = (vaddr, count);
        while count > 0 {
            let room = match &self.open {
                Some(o) if o.kind == Kind::Zero && o.vaddr + u64::from(o.pages) * PAGE == vaddr => {
                    u64::from(MAX_ZERO_PAGES - o.pages)
                }
                _ => 0,
            };
            let room = if room == 0 {
                self.open_record(Kind::Zero, vaddr);
                u64::from(MAX_ZERO_PAGES)
            } else {
                room
            };
            let n = count.min(room);
            self.open.as_mut().expect("open record").pages += n as u32;
            vaddr += n * PAGE;
            count -= n;
        }
        if self.buf.len() >= BUF_FLUSH {
            self.flush_buf()?;
        }
        Ok(())
    }
}
