//! Post-copy page pull: the destination fetches pages from the frozen original on the source.
//!
//! After the final freeze of a post-copy (or hybrid) migration the process runs at the
//! destination before all of its memory is there. The pages still at the source (`extents`: for
//! post-copy every data page, for hybrid the final dirty set) are registered lazy with a
//! userfaultfd (restore/lazy.rs); this module is where that lazy thread gets them from: a
//! [`PageSourceServer`] on the source host reads them out of the frozen original, a
//! [`RemotePages`] at the destination (a [`LazySource`]) asks for them.
//!
//! # The sequence
//!
//! ```text
//!  source host                                        destination host
//!  ───────────                                        ────────────────
//!  original frozen (ptrace-stopped, SIGSTOP under it: it must never run again)
//!  PageSourceServer::bind(addr, {id, token}, pid,
//!                         extents, options)
//!    accept thread (poll: listener + eventfd)
//!                                                     RemotePages::connect(addr, id, token,
//!                                                                          extents, options)
//!              ◀──── TCP + HELLO (60) ────────────────  FAULT connection        } both within
//!    conn thread: id + token compared in                                        } connect_timeout,
//!    constant time (both, always) ─── REPLY (8) ───▶                            } else PullError:
//!              ◀──── TCP + HELLO (60) ────────────────  BACKGROUND connection   } the restore fails
//!    conn thread ──────────────────── REPLY (8) ───▶                            } before its commit
//!                                                     background thread starts; restore commits;
//!                                                     the process runs
//!
//!  FAULT connection: one request at a time, latency first (the lazy thread's with_data,
//!  on the lazy thread itself: no hand-off between threads on the fault path)
//!              ◀──── REQUEST [addr, ≤ 64 KiB window, ≤ 4 MiB, clipped to the extent] ─────
//!    every request validated: aligned, in range, count 1..=1024, ENTIRELY inside extents
//!    (else STATUS NOT_SERVED / BAD_RANGE / ... and close); pages read with one
//!    process_vm_readv, /proc/PID/mem for what it could not read (PROT_NONE); a page never
//!    touched reads as zeros, which is its content
//!    ──── RESPONSE (same addr/count, pages, crc32c) ────────────────────────────────▶
//!                                                     matched to the request, checked, handed to
//!                                                     the caller (UFFDIO_COPY), marked fetched
//!
//!  BACKGROUND connection: pipelined, walks the extents from the lowest address
//!              ◀──── REQUEST × n (request_bytes each) ──────────────────────────────────
//!    ──── RESPONSE × n, in request order ──────────────────────────────────────────▶
//!                                                     into the "arrived" buffer (by source
//!                                                     address); next_ready() offers the oldest
//!                                                     arrived chunk; with_data() / consumed()
//!                                                     free it. At most prefetch_bytes requested
//!                                                     and not yet consumed; a fault moves the
//!                                                     walk to just after the faulting page
//!                                                     (faulted()); wraps; skips what was fetched
//!                                                     or requested; `bandwidth` (token bucket)
//!                                                     paces these requests only, never faults.
//!
//!  CONNECTION LOST (EOF, reset, io_timeout, a bad or unmatched record, a STATUS):
//!                                                     state Reconnecting; the link's owner
//!                                                     (fault: the with_data caller; background:
//!                                                     its thread) reconnects at once, then every
//!                                                     50 ms doubling to 1 s; a new HELLO; then
//!                                                     resends what was outstanding, in order
//!                                                     (responses received whole and verified are
//!                                                     kept, a half-received one is dropped)
//!              ◀──── TCP + HELLO ────────────────────  with_data callers just keep waiting
//!    ──── REPLY ───────────────────────────────────▶   a verified response ends the failure
//!              ◀──── REQUEST (resent) ───────────────  clock; once both links are up again the
//!                                                     state is Connected (reconnects and time
//!                                                     disconnected are counted)
//!                                                     give_up_after of continuous failure (no
//!                                                     verified response since the first error),
//!                                                     or a refusal that cannot change (wrong
//!                                                     token/id, NOT_SERVED, a malformed request):
//!                                                     state Failed, with_data returns Err, the
//!                                                     lazy thread kills the process (loud)
//!
//!  HOMED                                              every page home: the lazy thread calls
//!                                                     confirm_home(): on the FAULT connection (a
//!                                                     fresh one if it has none; reconnects and
//!              ◀──── HOMED ──────────────────────────  backs off as a fault does)
//!    homed = true once the OK is written whole
//!    ──── STATUS OK (totals served) ───────────────▶   Ok: the lazy thread reports Homed.
//!    both close                                       No OK within give_up_after (or the pull
//!                                                     already Failed): Err, the lazy thread
//!                                                     kills the process (see Why)
//!
//!  END                                                the lazy thread drops the source; the last
//!                                                     Arc's drop closes both connections and
//!                                                     joins the thread (Closed)
//!    conn threads see EOF and end                     the agent then kills the original and
//!    shutdown(): stop accepting, shut every           shuts the page source down
//!    connection, join every thread; returns
//!    the final stats
//! ```
//!
//! # Why
//!
//! - **Two connections.** A fault is the faulting thread's whole wait, ≈ one round trip when the
//!   link is idle; behind a pipelined background stream it would wait for up to prefetch_bytes of
//!   responses queued ahead of it (16 MiB ≈ 8 ms at 2 GB/s). So faults have their own connection
//!   and the background stream keeps its pipe full on the other; the source serves each
//!   connection on its own thread.
//! - **Pull, not push.** The destination knows where the process faults; the source does not.
//!   The background walk jumps to just after the latest fault (access locality: the next pages
//!   are likely next), as QEMU's postcopy does with its page requests.
//! - **Never zeros instead of data.** Every response is matched to its request and checksummed;
//!   with_data blocks rather than return anything unverified, and fails only when the source is
//!   gone for good: a process reading zeros where its data was would be silent corruption, a
//!   killed process is a loud failure.
//! - **Reconnect (QEMU's postcopy-recover).** The source process stays frozen and its pages do
//!   not change, so any copy of a page is as good as another: a connection can be dropped at any
//!   time and what was outstanding simply asked for again. [`RemotePages::redirect`] points later
//!   reconnects at a new address (a page source restarted elsewhere).
//! - **Abortive close on the source** (as in server.rs; both use net.rs): when a connection is
//!   ended because of an error the source writes STATUS, half-closes, drains briefly and closes
//!   with SO_LINGER 0, so the destination learns at once instead of waiting on a silent window.
//! - **HOMED, and what the source can tell alone.** When the coordinator loses the destination
//!   mid post-copy, only the source can say whether the original may resume. [`SourceServeStats`]
//!   `homed` (a HOMED answered OK; never reset): the copy has every page and may be running on
//!   its own: the original must never resume. Not homed and `idle_ms` (no pull connection open
//!   for that long) beyond the destination's give_up_after, plus a margin for a destination that
//!   noticed the loss later than the source: the copy is dead. A copy that is not home needs
//!   the source, and kills itself after give_up_after without it (or its guard kills it when its
//!   agent dies); one that has every page but cannot get the OK within give_up_after kills
//!   itself too (confirm_home → Err). The source records `homed` only once its OK is written:
//!   a destination that read the OK finds it set; one that did not retries or kills its copy.
//!   The worst case (OK sent, lost, the source unreachable after) loses both copies, never
//!   runs two. Decide on the stats [`PageSourceServer::shutdown`] returns: after the stop no
//!   HOMED is answered, so they are final.
//! - **The source reads the frozen process directly** (no page store on the source): the pages
//!   are already in memory, process_vm_readv runs at ~4 GB/s, and nothing is copied twice.

use super::net::{self, accept_hello, bump, lock, Acceptor, Gate, Serve, StartError};
use super::server::Expected;
use super::store::USER_ADDR_LIMIT;
use super::wire::{
    self, decode_hello_reply, EndTotals, Hello, HelloStatus, MigrationId, PageRequest, PullRecord, RecordError, Reply, Status,
    Token, HELLO_LEN, HELLO_REPLY_LEN, HEADER_LEN, MAX_DATA_PAGES,
};
use super::PAGE_SIZE;
use crate::dirty::RangeSet;
use crate::restore::lazy::{percentile, LazySource, LazySourceError, Ready, RemoteProbe};
use crate::sys::{Errno, Pid};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;
/// Largest request (and response payload): 4 MiB.
const MAX_REQUEST_BYTES: u64 = MAX_DATA_PAGES as u64 * PAGE;
/// Reconnect backoff: the first retry is immediate, then 50 ms doubling to 1 s.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Fault round-trip samples kept (the most recent ones).
const MAX_SAMPLES: usize = 8192;

// =============================================================================================
// Source side
// =============================================================================================

/// Source side options.
#[derive(Debug, Clone)]
pub struct SourceServerOptions {
    pub hello_timeout: Duration,
    /// Longest silence of a pull connection before the server drops it.
    pub io_timeout: Duration,
    pub max_connections: usize,
}

impl Default for SourceServerOptions {
    fn default() -> Self {
        SourceServerOptions { hello_timeout: Duration::from_secs(10), io_timeout: Duration::from_secs(600), max_connections: 8 }
    }
}

/// What the source has served so far.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceServeStats {
    /// Connections accepted (hello OK).
    pub connections: u64,
    /// Connections refused (bad hello, wrong id or token, busy, shutting down).
    pub rejected: u64,
    /// Requests answered with their pages.
    pub requests: u64,
    pub pages: u64,
    /// Page bytes sent (payloads).
    pub bytes: u64,
    /// Requests refused with a STATUS (malformed, outside the extents, unreadable).
    pub refused_requests: u64,
    /// Connections open now (0 once the destination dropped its RemotePages).
    pub active_connections: u64,
    /// The destination confirmed every page home (a HOMED answered OK). Once true it stays true:
    /// its copy may be running on its own memory and the original must never resume.
    pub homed: bool,
    /// None while any pull connection is open (one still in its hello included); else
    /// milliseconds since the last connection of this migration (hello accepted) closed, or
    /// since the server started if none ever did. Refused connections do not move it.
    pub idle_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullServeError {
    #[error("binding the page source on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("starting the page source thread: {0}")]
    Thread(std::io::Error),
    #[error("setting up the page source's listener: {0}")]
    Setup(std::io::Error),
}

/// The request counters (connections accepted and rejected are the gate's).
#[derive(Debug, Default)]
struct SrcCounters {
    requests: AtomicU64,
    pages: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug)]
struct SrcShared {
    gate: Gate,
    pid: Pid,
    extents: RangeSet,
    opts: SourceServerOptions,
    n: SrcCounters,
    /// A HOMED was received and answered OK (never reset).
    homed: AtomicBool,
    /// When the last connection whose hello was accepted closed (or the server started): with
    /// none open ([`Gate::open_connections`]) the start of [`SourceServeStats::idle_ms`].
    last_closed: Mutex<Instant>,
}

/// A connection whose hello was accepted: its close (also by a panic) restarts the idle clock.
/// Refused strangers do not move it.
struct AcceptedConn<'a>(&'a SrcShared);

impl Drop for AcceptedConn<'_> {
    fn drop(&mut self) {
        *lock(&self.0.last_closed) = Instant::now();
    }
}

impl Serve for SrcShared {
    const ACCEPT_THREAD: &'static str = "tern-pull-accept";
    const CONN_THREAD: &'static str = "tern-pull-conn";
    // Both ways: a thread may be blocked writing a response to a destination that does not read:
    // only a shut write side wakes it.
    const TEARDOWN: Shutdown = Shutdown::Both;

    fn gate(&self) -> &Gate {
        &self.gate
    }

    fn serve(&self, sock: TcpStream, _peer: SocketAddr) {
        src_serve_conn(self, sock);
    }
}

/// Serves the pages of `extents` of the frozen process `pid` to pull connections of one
/// migration. Runs its own threads until `shutdown` (or drop).
#[derive(Debug)]
pub struct PageSourceServer {
    shared: Arc<SrcShared>,
    acceptor: Acceptor,
}

impl PageSourceServer {
    /// Listens on `addr` (port 0: any) and serves at once. `pid` must stay frozen while this
    /// runs (its pages are read as they are when asked for).
    pub fn bind(
        addr: SocketAddr,
        expected: Expected,
        pid: Pid,
        extents: RangeSet,
        options: SourceServerOptions,
    ) -> Result<PageSourceServer, PullServeError> {
        let shared = Arc::new(SrcShared {
            gate: Gate::new(expected, options.hello_timeout, options.max_connections),
            pid,
            extents,
            opts: options,
            n: SrcCounters::default(),
            homed: AtomicBool::new(false),
            last_closed: Mutex::new(Instant::now()),
        });
        let acceptor = Acceptor::start(addr, shared.clone()).map_err(|e| match e {
            StartError::Bind(source) => PullServeError::Bind { addr, source },
            StartError::Setup(e) => PullServeError::Setup(e),
            StartError::Spawn(e) => PullServeError::Thread(e),
        })?;
        Ok(PageSourceServer { shared, acceptor })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    pub fn stats(&self) -> SourceServeStats {
        let n = &self.shared.n;
        let gate = &self.shared.gate;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let active = gate.open_connections();
        let idle_ms = (active == 0).then(|| lock(&self.shared.last_closed).elapsed().as_millis() as u64);
        SourceServeStats {
            connections: g(&gate.accepted),
            rejected: g(&gate.rejected),
            requests: g(&n.requests),
            pages: g(&n.pages),
            bytes: g(&n.bytes),
            refused_requests: g(&n.refused),
            active_connections: active as u64,
            homed: self.shared.homed.load(Ordering::SeqCst),
            idle_ms,
        }
    }

    /// Stops accepting, closes every connection, joins the threads; returns the final figures.
    /// `homed` can no longer change then: whoever decides between resuming the original and
    /// killing it reads it here (a HOMED answered before the stop is in it; after the stop none
    /// is answered), not from a [`Self::stats`] taken earlier.
    pub fn shutdown(self) -> SourceServeStats {
        self.acceptor.stop(&self.shared.gate);
        self.stats()
    }
}

impl Drop for PageSourceServer {
    fn drop(&mut self) {
        self.acceptor.stop(&self.shared.gate);
    }
}

/// How a served connection ended.
enum ConnEnd {
    /// The destination closed it (its normal way to end).
    Closed,
    /// The connection broke (nothing useful to say to the peer).
    Broken,
    /// A refusal to report with a STATUS before closing.
    Refuse(u32),
}

fn src_serve_conn(sh: &SrcShared, sock: TcpStream) {
    if accept_hello(&sh.gate, &sock).is_none() {
        return;
    }
    let _accepted = AcceptedConn(sh);
    let _ = sock.set_read_timeout(Some(sh.opts.io_timeout));
    let _ = sock.set_write_timeout(Some(sh.opts.io_timeout));
    // Requests are 24 bytes and pipelined: read them in bulk.
    let mut rd = BufReader::with_capacity(4096, &sock);
    let mut out: Vec<u8> = Vec::new();
    let mut mem: Option<File> = None;
    let mut served = EndTotals::default();
    let end = loop {
        if sh.gate.stopping() {
            break ConnEnd::Refuse(wire::status::SHUTTING_DOWN);
        }
        let req = match wire::read_pull_record(&mut rd) {
            Ok(Some(PullRecord::Request(req))) => req,
            Ok(Some(PullRecord::Homed)) => {
                // Every page is home at the destination. Recorded only once the OK is written
                // whole: a destination that read it finds `homed` set (its connection counts as
                // open until then); one that did not retries, or gives up and kills its copy.
                let ok = Status { code: wire::status::OK, totals: served };
                if (&sock).write_all(&ok.encode_record()).is_err() {
                    break ConnEnd::Broken;
                }
                sh.homed.store(true, Ordering::SeqCst);
                break ConnEnd::Closed;
            }
            Ok(None) => break ConnEnd::Closed,
            Err(RecordError::Io(_)) | Err(RecordError::Truncated { .. }) if sh.gate.stopping() => {
                break ConnEnd::Refuse(wire::status::SHUTTING_DOWN)
            }
            Err(RecordError::Io(_)) => break ConnEnd::Broken,
            Err(e) => break ConnEnd::Refuse(e.status_code()),
        };
        // Entirely inside the pages this migration may serve, or not at all.
        if sh.extents.intersect_range(req.vaddr(), req.end()) != [(req.vaddr(), req.end())] {
            break ConnEnd::Refuse(wire::status::NOT_SERVED);
        }
        let len = req.len() as usize;
        out.resize(HEADER_LEN + len, 0);
        if read_pages(sh.pid, &mut mem, req.vaddr(), &mut out[HEADER_LEN..]).is_err() {
            break ConnEnd::Refuse(wire::status::SOURCE_READ);
        }
        let h = req.response_header(&out[HEADER_LEN..]);
        out[..HEADER_LEN].copy_from_slice(&h);
        if (&sock).write_all(&out).is_err() {
            break ConnEnd::Broken;
        }
        served.records += 1;
        served.data_pages += u64::from(req.page_count());
        bump(&sh.n.requests, 1);
        bump(&sh.n.pages, u64::from(req.page_count()));
        bump(&sh.n.bytes, req.len());
    };
    drop(rd);
    match end {
        ConnEnd::Closed | ConnEnd::Broken => {}
        ConnEnd::Refuse(code) => {
            if code != wire::status::SHUTTING_DOWN {
                bump(&sh.n.refused, 1);
            }
            let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
            // Let the STATUS reach the destination, then make whatever it still sends meet a RST
            // (see net.rs: a graceful close could leave it waiting on a silent window).
            net::refuse_and_reset(&sock, Status { code, totals: served });
        }
    }
    let _ = sock.shutdown(Shutdown::Both);
}

/// Reads `out.len()` bytes at `vaddr` of `pid`: one process_vm_readv, then /proc/PID/mem (kept
/// open in `mem`) for whatever it could not read (PROT_NONE pages, for instance).
fn read_pages(pid: Pid, mem: &mut Option<File>, vaddr: u64, out: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() };
    let remote = libc::iovec { iov_base: vaddr as *mut libc::c_void, iov_len: out.len() };
    // SAFETY: `local` describes `out`, exclusively borrowed for the call; the kernel writes at
    // most its length. `remote` is only interpreted in the target's address space.
    let n = unsafe { libc::process_vm_readv(pid.as_raw(), &local, 1, &remote, 1, 0) };
    let done = Errno::result(n).map(|n| n as usize).unwrap_or(0);
    if done >= out.len() {
        return Ok(());
    }
    if mem.is_none() {
        *mem = Some(File::open(format!("/proc/{}/mem", pid.as_raw()))?);
    }
    let file = mem.as_ref().expect("opened above");
    file.read_exact_at(&mut out[done..], vaddr + done as u64)
}

// =============================================================================================
// Destination side
// =============================================================================================

/// Destination side options.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// TCP connect + hello reply, for the first connect and every reconnect attempt.
    pub connect_timeout: Duration,
    /// Longest wait for a response that is due.
    pub io_timeout: Duration,
    /// After the connection is lost, keep trying this long before giving up for good.
    pub give_up_after: Duration,
    /// Bytes per background (prefetch) request (rounded to pages, at most 4 MiB).
    pub request_bytes: u64,
    /// Background bytes requested and not yet consumed, at most.
    pub prefetch_bytes: u64,
    /// Background pull rate limit (bytes/s); faults are never limited.
    pub bandwidth: Option<u64>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            give_up_after: Duration::from_secs(30),
            request_bytes: 1 << 20,
            prefetch_bytes: 16 << 20,
            bandwidth: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum RemoteState {
    #[default]
    Connected,
    /// The connection dropped; faulting threads wait while it is re-established.
    Reconnecting,
    /// The last `Arc<RemotePages>` was dropped (every page home, or the restore is over) and
    /// the connections closed.
    Closed,
    /// The source could not be reached for `give_up_after`, or refused in a way no retry can
    /// change (wrong token or id, pages it does not serve): no more pages, ever.
    Failed,
}

/// The pull connection's state and figures (in the lazy stats).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStats {
    pub state: RemoteState,
    pub reconnects: u64,
    /// Total time spent without a connection.
    pub disconnected_ns: u64,
    pub fault_requests: u64,
    pub fault_pages: u64,
    pub prefetch_pages: u64,
    /// Page bytes received (fault and background).
    pub bytes: u64,
    /// Fault request round trip (request sent → data received).
    pub request_p50_ns: u64,
    pub request_p99_ns: u64,
    pub last_error: Option<String>,
    /// Background bytes arrived and not yet consumed (memory held).
    pub arrived_bytes: u64,
    /// Background bytes requested and not yet arrived.
    pub inflight_bytes: u64,
    /// Bytes of the extents neither fetched nor requested yet.
    pub unrequested_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("connecting to the page source {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("page pull: extent {start:#x}-{end:#x} is not page-aligned or beyond the user address space")]
    BadExtent { start: u64, end: u64 },
    #[error("page pull: starting the background thread: {0}")]
    Thread(std::io::Error),
}

/// Why a link failed (for `last_error` and for deciding whether retrying can help).
#[derive(Debug, Clone)]
struct Failure {
    detail: String,
    /// Retrying cannot change the answer (wrong token, request refused as outside the extents).
    permanent: bool,
}

impl Failure {
    fn transient(detail: String) -> Failure {
        Failure { detail, permanent: false }
    }
}

/// Opens one pull connection: TCP connect, HELLO, HELLO REPLY (each within `timeout`).
fn dial(addr: SocketAddr, hello: &[u8; HELLO_LEN], timeout: Duration, io_timeout: Duration) -> Result<TcpStream, Failure> {
    let sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| Failure::transient(format!("TCP connect to {addr} failed: {e}")))?;
    let setup = (|| -> io::Result<()> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        (&sock).write_all(hello)
    })();
    setup.map_err(|e| Failure::transient(format!("sending the hello to {addr} failed: {e}")))?;
    let mut reply = [0u8; HELLO_REPLY_LEN];
    let got = wire::read_full(&mut &sock, &mut reply)
        .map_err(|e| Failure::transient(format!("no hello reply from {addr}: {e}")))?;
    if got < HELLO_REPLY_LEN {
        return Err(Failure::transient(format!(
            "{addr} closed the connection after {got} of {HELLO_REPLY_LEN} hello reply bytes"
        )));
    }
    match decode_hello_reply(&reply) {
        None => Err(Failure { detail: format!("{addr} is not a TERN page source (bad reply magic)"), permanent: true }),
        Some((HelloStatus::Ok, _)) => {
            let _ = sock.set_read_timeout(Some(io_timeout));
            let _ = sock.set_write_timeout(Some(io_timeout));
            Ok(sock)
        }
        Some((status, _)) => Err(Failure {
            detail: format!("{addr} refused the pull connection: {status}"),
            // Busy and shutting down may pass; a wrong id, token or protocol will not.
            permanent: !matches!(status, HelloStatus::Busy | HelloStatus::ShuttingDown | HelloStatus::Other(_)),
        }),
    }
}

/// What a STATUS from the source means for us.
fn status_failure(code: u32) -> Failure {
    use wire::status::*;
    Failure {
        detail: format!("the page source refused: {} (status {code})", describe(code)),
        // The same request would be refused again: our extents or our encoder disagree with
        // the source's, which no reconnect fixes.
        permanent: matches!(code, NOT_SERVED | BAD_RANGE | MALFORMED_HEADER | UNEXPECTED_KIND | UNKNOWN_KIND),
    }
}

/// Which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Fault = 0,
    Background = 1,
}

#[derive(Debug, Clone, Copy)]
struct LinkHealth {
    up: bool,
    /// First failure since the last verified response (the give-up clock).
    failing_since: Option<Instant>,
}

/// Background bytes at hand: `buf[off..off + len]` holds the pages at the key address.
#[derive(Debug, Clone)]
struct Piece {
    buf: Arc<Vec<u8>>,
    off: usize,
    len: usize,
    /// Arrival order (next_ready offers the oldest).
    seq: u64,
}

/// Disjoint `[start, end)` ranges not yet requested nor fetched.
#[derive(Debug, Default)]
struct Todo {
    map: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Todo {
    fn new(set: &RangeSet) -> Todo {
        let mut t = Todo::default();
        for (s, e) in set.iter() {
            t.map.insert(s, e);
            t.bytes += e - s;
        }
        t
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn remove(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, u64)> =
            self.map.range(..end).rev().take_while(|(_, &e)| e > start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in hit {
            self.map.remove(&s);
            self.bytes -= e - s;
            if s < start {
                self.map.insert(s, start);
                self.bytes += start - s;
            }
            if e > end {
                self.map.insert(end, e);
                self.bytes += e - end;
            }
        }
    }

    /// The first piece at or after `cursor` (wrapping around), at most `max` bytes.
    fn next_from(&self, cursor: u64, max: u64) -> Option<(u64, u64)> {
        let containing = self.map.range(..=cursor).next_back().filter(|(_, &e)| e > cursor);
        let (s, e) = containing
            .or_else(|| self.map.range(cursor..).next())
            .or_else(|| self.map.iter().next())
            .map(|(&s, &e)| (s, e))?;
        let lo = if (s..e).contains(&cursor) { cursor } else { s };
        Some((lo, (e - lo).min(max)))
    }
}

/// A token bucket pacing background requests: a request may go when the balance is not
/// negative, and takes its bytes (the balance may go below zero: one request of debt).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, request: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket { rate, burst: (rate / 20.0).max(request as f64), tokens: 0.0, last: Instant::now() }
    }

    /// Takes `n` bytes and returns None, or how long until a request may go.
    fn take(&mut self, n: u64) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 0.0 {
            self.tokens -= n as f64;
            None
        } else {
            Some(Duration::from_secs_f64(-self.tokens / self.rate).max(Duration::from_micros(100)))
        }
    }
}

#[derive(Debug)]
struct State {
    state: RemoteState,
    todo: Todo,
    /// Where the background walk continues.
    cursor: u64,
    /// Background requests sent (or to resend) and not answered, in order.
    inflight: VecDeque<PageRequest>,
    inflight_bytes: u64,
    arrived: BTreeMap<u64, Piece>,
    arrived_bytes: u64,
    next_seq: u64,
    /// Response buffers to reuse (no fresh, unfaulted memory per response).
    pool: Vec<Vec<u8>>,
    links: [LinkHealth; 2],
    down_since: Option<Instant>,
    disconnected: Duration,
    reconnects: u64,
    fault_requests: u64,
    fault_pages: u64,
    prefetch_pages: u64,
    bytes: u64,
    samples: Vec<u64>,
    next_sample: usize,
    last_error: Option<String>,
}

impl State {
    /// Connected, nothing requested yet: `todo` is what there is to fetch, the walk starts at
    /// `cursor`.
    fn new(todo: Todo, cursor: u64) -> State {
        State {
            state: RemoteState::Connected,
            todo,
            cursor,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            arrived: BTreeMap::new(),
            arrived_bytes: 0,
            next_seq: 0,
            pool: Vec::new(),
            links: [LinkHealth { up: true, failing_since: None }; 2],
            down_since: None,
            disconnected: Duration::ZERO,
            reconnects: 0,
            fault_requests: 0,
            fault_pages: 0,
            prefetch_pages: 0,
            bytes: 0,
            samples: Vec::new(),
            next_sample: 0,
            last_error: None,
        }
    }

    /// The arrived piece holding `addr`: (its address, piece).
    fn piece_at(&self, addr: u64) -> Option<(u64, &Piece)> {
        self.arrived.range(..=addr).next_back().filter(|(&a, p)| a + p.len as u64 > addr).map(|(&a, p)| (a, p))
    }

    /// Takes `[start, end)` out of the arrived pieces (splitting them), returning the parts.
    fn carve(&mut self, start: u64, end: u64) -> Vec<(u64, Piece)> {
        let hit: Vec<u64> = self
            .arrived
            .range(..end)
            .rev()
            .take_while(|(&a, p)| a + p.len as u64 > start)
            .map(|(&a, _)| a)
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for a in hit.into_iter().rev() {
            let p = self.arrived.remove(&a).expect("listed above");
            let pend = a + p.len as u64;
            if a < start {
                let head = Piece { len: (start - a) as usize, ..p.clone() };
                self.arrived.insert(a, head);
            }
            if pend > end {
                let tail = Piece { off: p.off + (end - a) as usize, len: (pend - end) as usize, ..p.clone() };
                self.arrived.insert(end, tail);
            }
            let (lo, hi) = (a.max(start), pend.min(end));
            self.arrived_bytes -= hi - lo;
            out.push((lo, Piece { off: p.off + (lo - a) as usize, len: (hi - lo) as usize, ..p }));
        }
        out
    }

    /// Gives a buffer back to the pool if nothing else refers to it.
    fn recycle(&mut self, buf: Arc<Vec<u8>>, cap: usize) {
        if let Ok(v) = Arc::try_unwrap(buf) {
            if self.pool.len() < cap {
                self.pool.push(v);
            }
        }
    }

    fn sample(&mut self, ns: u64) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(ns);
        } else {
            self.samples[self.next_sample] = ns;
            self.next_sample = (self.next_sample + 1) % MAX_SAMPLES;
        }
    }

    fn disconnected_now(&self) -> Duration {
        self.disconnected + self.down_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

struct Shared {
    addr: Mutex<SocketAddr>,
    /// The encoded HELLO (it holds the token: never printed).
    hello: [u8; HELLO_LEN],
    opts: PullOptions,
    extents: RangeSet,
    stop: AtomicBool,
    st: Mutex<State>,
    /// Wakes the background thread (room in the window, stop) and backoff sleeps (stop).
    cond: Condvar,
    /// A clone of the background connection, to break it on drop.
    bg_sock: Mutex<Option<TcpStream>>,
    pool_cap: usize,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("addr", &*lock(&self.addr))
            .field("opts", &self.opts)
            .field("extents", &self.extents)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Connects `link` again. A link that is failing waits for a connection no longer than the
    /// time left before it gives up: a silent source (SYNs dropped) must not stretch
    /// `give_up_after` to `connect_timeout`.
    fn dial(&self, link: Link) -> Result<TcpStream, Failure> {
        let addr = *lock(&self.addr);
        let left = lock(&self.st).links[link as usize]
            .failing_since
            .map(|t| (t + self.opts.give_up_after).saturating_duration_since(Instant::now()));
        let timeout = left.map_or(self.opts.connect_timeout, |l| l.clamp(Duration::from_millis(50), self.opts.connect_timeout));
        dial(addr, &self.hello, timeout, self.opts.io_timeout)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records a failure of `link`; true when the pull has failed for good (now or before).
    fn link_failed(&self, link: Link, f: &Failure) -> bool {
        let mut st = lock(&self.st);
        let now = Instant::now();
        let l = &mut st.links[link as usize];
        l.up = false;
        let since = *l.failing_since.get_or_insert(now);
        if st.down_since.is_none() {
            st.down_since = Some(now);
        }
        st.last_error = Some(f.detail.clone());
        if st.state == RemoteState::Connected {
            st.state = RemoteState::Reconnecting;
        }
        if st.state == RemoteState::Failed {
            return true;
        }
        if f.permanent || now.duration_since(since) >= self.opts.give_up_after {
            st.state = RemoteState::Failed;
            if let Some(t) = st.down_since.take() {
                st.disconnected += now.duration_since(t);
            }
            st.last_error = Some(if f.permanent {
                f.detail.clone()
            } else {
                format!("{} (no page from the source for {:?}: given up)", f.detail, now.duration_since(since))
            });
            drop(st);
            self.cond.notify_all();
            return true;
        }
        false
    }

    /// `link` is connected again.
    fn link_up(&self, link: Link) {
        let mut st = lock(&self.st);
        st.links[link as usize].up = true;
        st.reconnects += 1;
        if st.links.iter().all(|l| l.up) {
            if let Some(t) = st.down_since.take() {
                st.disconnected += t.elapsed();
            }
            if st.state == RemoteState::Reconnecting {
                st.state = RemoteState::Connected;
            }
        }
    }

    /// How long to sleep before the next attempt: the backoff, but not past the give-up time.
    fn backoff_sleep(&self, link: Link, backoff: Duration) {
        let st = lock(&self.st);
        let left = st.links[link as usize]
            .failing_since
            .map_or(backoff, |t| (t + self.opts.give_up_after).saturating_duration_since(Instant::now()));
        let d = backoff.min(left).max(Duration::from_millis(1));
        let until = Instant::now() + d;
        let mut st = st;
        while !self.stopping() && st.state != RemoteState::Failed {
            let now = Instant::now();
            if now >= until {
                break;
            }
            st = self.cond.wait_timeout(st, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn failed_error(&self, addr: u64) -> LazySourceError {
        let st = lock(&self.st);
        let why = st.last_error.clone().unwrap_or_else(|| "no reason recorded".into());
        let detail = match st.state {
            RemoteState::Failed => format!("the page source {} is lost: {why}", *lock(&self.addr)),
            _ => format!("the page pull is closed ({why})"),
        };
        LazySourceError { addr, detail }
    }
}

/// The reconnect pace of one link: the first attempt at once, then [`BACKOFF_MIN`] doubling to
/// [`BACKOFF_MAX`] (a new `Retry` once the link is up again).
#[derive(Debug)]
struct Retry {
    link: Link,
    /// The pause before the next attempt; None before the first.
    next: Option<Duration>,
}

impl Retry {
    fn new(link: Link) -> Retry {
        Retry { link, next: None }
    }

    /// Before each attempt: pauses as the backoff says (never past the give-up time, and not at
    /// all before the first attempt).
    fn pause(&mut self, sh: &Shared) {
        if let Some(d) = self.next {
            sh.backoff_sleep(self.link, d);
        }
        self.next = Some(self.next.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX)));
    }
}

/// The fault connection and its response buffer (used by one with_data at a time).
#[derive(Debug, Default)]
struct FaultLink {
    sock: Option<TcpStream>,
    buf: Vec<u8>,
}

/// The destination's view of the source's pages (a [`LazySource`]).
///
/// API for the glue: [`RemotePages::connect`] (before the commit point; an error fails the
/// restore), hand the `Arc` to the lazy restore as its source (or as `Layered::remote`), read
/// [`LazySource::remote_stats`] for progress; dropping the last `Arc` closes everything.
#[derive(Debug)]
pub struct RemotePages {
    shared: Arc<Shared>,
    fault: Mutex<FaultLink>,
    background: Mutex<Option<JoinHandle<()>>>,
}

impl RemotePages {
    /// Opens both connections (each must succeed within `connect_timeout`) and starts the
    /// background pull of `extents` (page-aligned user ranges: the pages the source serves).
    pub fn connect(
        addr: SocketAddr,
        migration_id: MigrationId,
        token: Token,
        extents: RangeSet,
        options: PullOptions,
    ) -> Result<Arc<RemotePages>, PullError> {
        for (s, e) in extents.iter() {
            if s % PAGE != 0 || e % PAGE != 0 || e > USER_ADDR_LIMIT {
                return Err(PullError::BadExtent { start: s, end: e });
            }
        }
        let hello = Hello::new(migration_id, token).encode();
        let connect = |what: &str| {
            dial(addr, &hello, options.connect_timeout, options.io_timeout)
                .map_err(|f| PullError::Connect { addr, detail: format!("{what} connection: {}", f.detail) })
        };
        let fault = connect("fault")?;
        let bg = connect("background")?;
        let request = options.request_bytes.clamp(PAGE, MAX_REQUEST_BYTES) & !(PAGE - 1);
        let pool_cap = (options.prefetch_bytes / request) as usize + 4;
        let cursor = extents.iter().next().map_or(0, |r| r.0);
        let shared = Arc::new(Shared {
            addr: Mutex::new(addr),
            hello,
            extents: extents.clone(),
            stop: AtomicBool::new(false),
            st: Mutex::new(State::new(Todo::new(&extents), cursor)),
            cond: Condvar::new(),
            bg_sock: Mutex::new(bg.try_clone().ok()),
            opts: PullOptions { request_bytes: request, ..options },
            pool_cap,
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tern-pull-bg".into())
            .spawn(move || background(sh, bg))
            .map_err(PullError::Thread)?;
        Ok(Arc::new(RemotePages {
            shared,
            fault: Mutex::new(FaultLink { sock: Some(fault), buf: Vec::new() }),
            background: Mutex::new(Some(thread)),
        }))
    }

    /// Later reconnects go to `addr` (the page source was restarted elsewhere). Connections
    /// that work are kept.
    pub fn redirect(&self, addr: SocketAddr) {
        *lock(&self.shared.addr) = addr;
    }

    /// The pages this source serves.
    pub fn extents(&self) -> &RangeSet {
        &self.shared.extents
    }

    /// Asks the FAULT connection for `req`, reconnecting as needed; the response's pages are in
    /// `link.buf` on success.
    fn fault_fetch(&self, link: &mut FaultLink, req: PageRequest) -> Result<(), LazySourceError> {
        let sh = &*self.shared;
        let ns = self.on_fault_link(link, |sock, buf| {
            let t0 = Instant::now();
            exchange(sock, &req, buf)?;
            Ok(t0.elapsed().as_nanos() as u64)
        });
        let ns = ns.map_err(|()| sh.failed_error(req.vaddr()))?;
        let mut st = lock(&sh.st);
        st.sample(ns);
        st.fault_requests += 1;
        st.fault_pages += u64::from(req.page_count());
        st.bytes += req.len();
        st.todo.remove(req.vaddr(), req.end());
        Ok(())
    }

    /// Runs `op` (one exchange) on the FAULT connection until it succeeds: connects it when
    /// there is none, drops it when `op` fails and tries again with the backoff, until the pull
    /// has failed for good (give_up_after of continuous failure, a permanent refusal) or is
    /// stopping: then Err (see [`Shared::failed_error`]). A success ends the link's failure clock.
    fn on_fault_link<T>(
        &self,
        link: &mut FaultLink,
        mut op: impl FnMut(&TcpStream, &mut Vec<u8>) -> Result<T, Failure>,
    ) -> Result<T, ()> {
        let sh = &*self.shared;
        let mut retry = Retry::new(Link::Fault);
        loop {
            {
                let st = lock(&sh.st);
                if sh.stopping() || st.state == RemoteState::Failed {
                    return Err(());
                }
            }
            if link.sock.is_none() {
                retry.pause(sh);
                match sh.dial(Link::Fault) {
                    Ok(s) => {
                        link.sock = Some(s);
                        sh.link_up(Link::Fault);
                    }
                    Err(f) => {
                        sh.link_failed(Link::Fault, &f);
                        continue;
                    }
                }
            }
            let sock = link.sock.as_ref().expect("connected above");
            match op(sock, &mut link.buf) {
                Ok(v) => {
                    lock(&sh.st).links[Link::Fault as usize].failing_since = None;
                    return Ok(v);
                }
                Err(f) => {
                    link.sock = None;
                    sh.link_failed(Link::Fault, &f);
                }
            }
        }
    }

    /// Tells the source that every page is home (HOMED) and waits for its OK, on the FAULT
    /// connection (a fresh one if it has none), reconnecting and retrying as a fault would: Err
    /// after give_up_after without an OK, or at once if the pull has already failed for good.
    /// The source closes the connection after its answer; a later fault would reconnect.
    ///
    /// Why (see the module header): until the source has this, it may resume the original once
    /// the destination is silent for longer than give_up_after; after it, never. So on Err the
    /// caller must kill its copy (the lazy thread does): at most one copy may run.
    pub fn confirm_home(&self) -> Result<(), LazySourceError> {
        let mut link = lock(&self.fault);
        let got = self.on_fault_link(&mut link, confirm_exchange);
        link.sock = None;
        drop(link);
        got.map_err(|()| {
            let e = self.shared.failed_error(0);
            LazySourceError { addr: 0, detail: format!("telling the source every page is home: {}", e.detail) }
        })
    }
}

/// HOMED and its OK on a pull connection.
fn confirm_exchange(sock: &TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    (&*sock).write_all(&wire::encode_homed()).map_err(|e| Failure::transient(format!("sending HOMED failed: {e}")))?;
    match wire::read_reply(&mut &*sock, buf) {
        Ok(Reply::Status(s)) if s.code == wire::status::OK => Ok(()),
        Ok(Reply::Status(s)) => Err(status_failure(s.code)),
        Ok(Reply::Response { vaddr, page_count }) => Err(Failure::transient(format!(
            "the source answered HOMED with {page_count} page(s) at {vaddr:#x}"
        ))),
        Err(e) => Err(Failure::transient(format!("answer to HOMED: {}", describe_record_error(&e)))),
    }
}

/// One request and its response on the fault connection.
fn exchange(sock: &TcpStream, req: &PageRequest, buf: &mut Vec<u8>) -> Result<(), Failure> {
    (&*sock).write_all(&req.encode()).map_err(|e| Failure::transient(format!("sending a fault request failed: {e}")))?;
    match wire::read_reply(&mut &*sock, buf) {
        Ok(Reply::Response { vaddr, page_count }) if vaddr == req.vaddr() && page_count == req.page_count() => Ok(()),
        Ok(Reply::Response { vaddr, page_count }) => Err(Failure::transient(format!(
            "the source answered {page_count} page(s) at {vaddr:#x} to a request for {} at {:#x}",
            req.page_count(),
            req.vaddr()
        ))),
        Ok(Reply::Status(s)) => Err(status_failure(s.code)),
        Err(e) => Err(Failure::transient(format!("fault response: {}", describe_record_error(&e)))),
    }
}

fn describe_record_error(e: &RecordError) -> String {
    match e {
        RecordError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            "no answer within io_timeout".into()
        }
        RecordError::Io(io) => format!("{e}: {io}"),
        e => e.to_string(),
    }
}

impl LazySource for RemotePages {
    fn confirm_home(&self) -> Result<(), LazySourceError> {
        RemotePages::confirm_home(self)
    }

    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.shared.extents.intersect_range(start, end).into_iter().map(|(s, e)| (s, e - s)).collect()
    }

    fn with_data(&self, addr: u64, max_len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool, LazySourceError> {
        let sh = &*self.shared;
        if max_len == 0 || !sh.extents.contains(addr) {
            return Ok(false);
        }
        let page = addr & !(PAGE - 1);
        // The end of the extent holding addr, as far as one request can reach (extents are
        // page-aligned and coalesced, so the first range is the one holding addr).
        let end = sh.extents.intersect_range(addr, page + MAX_REQUEST_BYTES).first().map_or(addr, |r| r.1);
        let skip = (addr - page) as usize;
        // Arrived in the background: hand it over and free it.
        let mut req_end = {
            let mut st = lock(&sh.st);
            if st.state == RemoteState::Failed {
                drop(st);
                return Err(sh.failed_error(addr));
            }
            if let Some((a, p)) = st.piece_at(addr) {
                let n = (a + p.len as u64 - addr).min(max_len);
                let mut parts = st.carve(addr, addr + n);
                drop(st);
                debug_assert_eq!(parts.len(), 1);
                let (_, piece) = parts.pop().expect("one piece holds addr");
                f(&piece.buf[piece.off..piece.off + piece.len]);
                let mut st = lock(&sh.st);
                st.recycle(piece.buf, sh.pool_cap);
                drop(st);
                sh.cond.notify_all();
                return Ok(true);
            }
            // Up to the next arrived piece: that part is here already.
            st.arrived.range(addr..).next().map_or(end, |(&a, _)| a.min(end))
        };
        req_end = req_end.min(addr.saturating_add(max_len)).min(page + MAX_REQUEST_BYTES);
        let pages = (req_end - page).div_ceil(PAGE) as u32;
        let req = PageRequest::new(page, pages).map_err(|e| LazySourceError { addr, detail: format!("bad request: {e}") })?;
        let mut link = lock(&self.fault);
        self.fault_fetch(&mut link, req)?;
        let want = ((req_end - addr) as usize).min(link.buf.len() - skip);
        f(&link.buf[skip..skip + want]);
        Ok(true)
    }

    fn next_ready(&self) -> Ready {
        let st = lock(&self.shared.st);
        if matches!(st.state, RemoteState::Failed | RemoteState::Closed) {
            // with_data will tell the truth (an error) wherever the fill goes next.
            return Ready::Anywhere;
        }
        if let Some((&addr, p)) = st.arrived.iter().min_by_key(|(_, p)| p.seq) {
            return Ready::At { addr, len: p.len as u64 };
        }
        if !st.todo.is_empty() || !st.inflight.is_empty() {
            return Ready::Wait;
        }
        Ready::Anywhere
    }

    fn faulted(&self, addr: u64) {
        let mut st = lock(&self.shared.st);
        st.cursor = (addr & !(PAGE - 1)).saturating_add(PAGE);
    }

    fn consumed(&self, addr: u64, len: u64) {
        let sh = &*self.shared;
        let mut st = lock(&sh.st);
        for (_, p) in st.carve(addr, addr.saturating_add(len)) {
            st.recycle(p.buf, sh.pool_cap);
        }
        drop(st);
        sh.cond.notify_all();
    }

    fn remote_stats(&self) -> Option<RemoteStats> {
        Some(stats_of(&self.shared))
    }

    fn remote_probe(&self) -> Option<RemoteProbe> {
        // The counters only: holding them keeps no connection open.
        let shared = self.shared.clone();
        Some(Arc::new(move || stats_of(&shared)))
    }
}

/// A snapshot of the pull's state and figures.
fn stats_of(shared: &Shared) -> RemoteStats {
    let st = lock(&shared.st);
    let mut sorted = st.samples.clone();
    let mut s = RemoteStats {
        state: st.state,
        reconnects: st.reconnects,
        disconnected_ns: st.disconnected_now().as_nanos() as u64,
        fault_requests: st.fault_requests,
        fault_pages: st.fault_pages,
        prefetch_pages: st.prefetch_pages,
        bytes: st.bytes,
        request_p50_ns: 0,
        request_p99_ns: 0,
        last_error: st.last_error.clone(),
        arrived_bytes: st.arrived_bytes,
        inflight_bytes: st.inflight_bytes,
        unrequested_bytes: st.todo.bytes,
    };
    drop(st);
    sorted.sort_unstable();
    s.request_p50_ns = percentile(&sorted, 0.5);
    s.request_p99_ns = percentile(&sorted, 0.99);
    s
}

impl Drop for RemotePages {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.stop.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&sh.bg_sock).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        sh.cond.notify_all();
        if let Some(t) = lock(&self.background).take() {
            let _ = t.join();
        }
        if let Some(s) = lock(&self.fault).sock.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let mut st = lock(&sh.st);
        if let Some(t) = st.down_since.take() {
            st.disconnected += t.elapsed();
        }
        if st.state != RemoteState::Failed {
            st.state = RemoteState::Closed;
        }
        st.arrived.clear();
        st.arrived_bytes = 0;
        st.pool.clear();
    }
}

/// The background connection of the pull thread.
struct BgConn {
    sock: TcpStream,
    rd: BufReader<TcpStream>,
}

impl BgConn {
    fn new(sock: TcpStream) -> io::Result<BgConn> {
        let rd = BufReader::with_capacity(64 << 10, sock.try_clone()?);
        Ok(BgConn { sock, rd })
    }
}

/// Picks the next background requests that the window and the bucket allow, records them as in
/// flight and returns them, with how long to wait when the bucket held one back.
fn plan(st: &mut State, opts: &PullOptions, bucket: &mut Option<Bucket>) -> (Vec<PageRequest>, Option<Duration>) {
    let mut out = Vec::new();
    loop {
        let Some((addr, len)) = st.todo.next_from(st.cursor, opts.request_bytes) else {
            return (out, None);
        };
        let held = st.inflight_bytes + st.arrived_bytes;
        if held > 0 && held + len > opts.prefetch_bytes {
            return (out, None);
        }
        if let Some(b) = bucket.as_mut() {
            if let Some(wait) = b.take(len) {
                return (out, Some(wait));
            }
        }
        let Ok(req) = PageRequest::new(addr, (len / PAGE) as u32) else {
            // Cannot happen (extents were checked at connect); never loop on it.
            st.todo.remove(addr, addr + len);
            continue;
        };
        st.todo.remove(addr, addr + len);
        st.cursor = addr + len;
        st.inflight.push_back(req);
        st.inflight_bytes += len;
        out.push(req);
    }
}

fn send_requests(sock: &TcpStream, reqs: &[PageRequest]) -> Result<(), Failure> {
    if reqs.is_empty() {
        return Ok(());
    }
    let mut b = Vec::with_capacity(reqs.len() * HEADER_LEN);
    for r in reqs {
        b.extend_from_slice(&r.encode());
    }
    (&*sock).write_all(&b).map_err(|e| Failure::transient(format!("sending background requests failed: {e}")))
}

/// The background thread: keeps the prefetch window full, receives into the arrived buffer,
/// reconnects when the connection breaks.
fn background(sh: Arc<Shared>, first: TcpStream) {
    let mut conn = match BgConn::new(first) {
        Ok(c) => Some(c),
        Err(e) => {
            sh.link_failed(Link::Background, &Failure::transient(format!("background connection setup: {e}")));
            None
        }
    };
    let mut bucket = sh.opts.bandwidth.map(|r| Bucket::new(r, sh.opts.request_bytes));
    let mut retry = Retry::new(Link::Background);
    let mut spare: Option<Vec<u8>> = None;
    loop {
        if sh.stopping() || lock(&sh.st).state == RemoteState::Failed {
            break;
        }
        let Some(c) = conn.as_mut() else {
            retry.pause(&sh);
            if sh.stopping() {
                break;
            }
            let attempt = sh.dial(Link::Background).and_then(|s| {
                let c = BgConn::new(s).map_err(|e| Failure::transient(format!("background connection setup: {e}")))?;
                // Resend what was outstanding, in order (responses come back in this order).
                let resend: Vec<PageRequest> = lock(&sh.st).inflight.iter().copied().collect();
                send_requests(&c.sock, &resend)?;
                Ok(c)
            });
            match attempt {
                Ok(c) => {
                    *lock(&sh.bg_sock) = c.sock.try_clone().ok();
                    if sh.stopping() {
                        break;
                    }
                    sh.link_up(Link::Background);
                    conn = Some(c);
                    retry = Retry::new(Link::Background);
                }
                Err(f) => {
                    if sh.link_failed(Link::Background, &f) {
                        break;
                    }
                }
            }
            continue;
        };
        // Fill the window.
        let (batch, wait, idle, done) = {
            let mut st = lock(&sh.st);
            let (batch, wait) = plan(&mut st, &sh.opts, &mut bucket);
            let idle = st.inflight.is_empty();
            (batch, wait, idle, idle && st.todo.is_empty())
        };
        if done {
            // Everything was requested and has arrived: this connection has no more to do.
            break;
        }
        if let Err(f) = send_requests(&c.sock, &batch) {
            conn = None;
            if sh.link_failed(Link::Background, &f) {
                break;
            }
            continue;
        }
        if idle {
            // Window full of arrived data, or the bucket says wait: until consumed() or stop.
            let st = lock(&sh.st);
            if !sh.stopping() {
                let _ = sh.cond.wait_timeout(st, wait.unwrap_or(Duration::from_millis(200)).min(Duration::from_millis(200)));
            }
            continue;
        }
        // Receive the oldest outstanding response.
        let mut buf = spare.take().or_else(|| lock(&sh.st).pool.pop()).unwrap_or_default();
        let got = wire::read_reply(&mut c.rd, &mut buf);
        let failure = {
            let mut st = lock(&sh.st);
            match got {
                Ok(Reply::Response { vaddr, page_count }) => match st.inflight.front().copied() {
                    Some(r) if r.vaddr() == vaddr && r.page_count() == page_count => {
                        st.inflight.pop_front();
                        st.inflight_bytes -= r.len();
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        let len = buf.len();
                        // Each address is requested once (resends replace a lost answer), so
                        // nothing is there already; if it were, the newer copy is as good.
                        if let Some(old) = st.arrived.insert(vaddr, Piece { buf: Arc::new(buf), off: 0, len, seq }) {
                            st.arrived_bytes -= old.len as u64;
                        }
                        st.arrived_bytes += r.len();
                        st.prefetch_pages += u64::from(page_count);
                        st.bytes += r.len();
                        st.links[Link::Background as usize].failing_since = None;
                        None
                    }
                    other => {
                        spare = Some(buf);
                        Some(Failure::transient(format!(
                            "the source answered {page_count} page(s) at {vaddr:#x}, expected {}",
                            other.map_or("nothing".into(), |r| format!("{} at {:#x}", r.page_count(), r.vaddr()))
                        )))
                    }
                },
                Ok(Reply::Status(s)) => {
                    spare = Some(buf);
                    Some(status_failure(s.code))
                }
                Err(e) => {
                    spare = Some(buf);
                    Some(Failure::transient(format!("background response: {}", describe_record_error(&e))))
                }
            }
        };
        if let Some(f) = failure {
            if sh.stopping() {
                break;
            }
            conn = None;
            if sh.link_failed(Link::Background, &f) {
                break;
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.sock.shutdown(Shutdown::Both);
    }
    lock(&sh.bg_sock).take();
}

// =============================================================================================
// Throughput (bench)
// =============================================================================================

/// Background pull of a process's pages against a plain TCP copy of the same bytes, over
/// loopback, in the same run.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PullBenchReport {
    pub bytes: u64,
    /// connect → every page arrived and copied out (next_ready / with_data / consumed loop).
    pub pull_secs: f64,
    pub pull_mib_per_sec: f64,
    /// write_all of the same bytes in 4 MiB writes, read into the same destination buffer.
    pub plain_tcp_secs: f64,
    pub plain_tcp_mib_per_sec: f64,
    pub remote: Option<RemoteStatsLite>,
}

/// The few remote figures the bench reports.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStatsLite {
    pub prefetch_pages: u64,
    pub fault_requests: u64,
    pub reconnects: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PullBenchError {
    #[error("pull bench: page source: {0}")]
    Serve(#[from] PullServeError),
    #[error("pull bench: {0}")]
    Pull(#[from] PullError),
    #[error("pull bench: lazy source: {0}")]
    Source(#[from] LazySourceError),
    #[error("pull bench: plain TCP copy: {0}")]
    Io(#[from] io::Error),
    #[error("pull bench: reading the process's memory: {0}")]
    Memory(#[from] crate::remote::MemoryError),
    #[error("pull bench: pulled bytes differ from the process's memory at {addr:#x}")]
    Mismatch { addr: u64 },
    #[error("pull bench: the pull stalled ({0})")]
    Stalled(String),
}

/// Offset of `addr` in the concatenation of `set`'s ranges.
fn offset_in(set: &[(u64, u64, usize)], addr: u64) -> Option<usize> {
    let i = set.partition_point(|r| r.1 <= addr);
    set.get(i).filter(|r| r.0 <= addr).map(|r| r.2 + (addr - r.0) as usize)
}

/// Pulls every page of `extents` of the (frozen) process `pid` through a [`PageSourceServer`]
/// and [`RemotePages`] on loopback with the background path only (next_ready / with_data /
/// consumed, as the lazy thread does, copying into one destination buffer), checks the bytes
/// against a direct read, then copies the same bytes over a plain TCP connection into the same
/// buffer.
pub fn loopback_pull_throughput(pid: Pid, extents: RangeSet, options: PullOptions) -> Result<PullBenchReport, PullBenchError> {
    let mut layout = Vec::new();
    let mut total = 0usize;
    for (s, e) in extents.iter() {
        layout.push((s, e, total));
        total += (e - s) as usize;
    }
    let expected = {
        let mut v = Vec::with_capacity(total);
        for (s, e) in extents.iter() {
            v.extend_from_slice(&crate::remote::read_memory(pid, s, (e - s) as usize)?);
        }
        v
    };
    let mut dest = vec![0u8; total];
    dest.iter_mut().step_by(PAGE_SIZE).for_each(|b| *b = 1); // fault the destination in
    let id = MigrationId([0x70; 16]);
    let token = Token::generate()?;
    let server = PageSourceServer::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Expected { migration_id: id, token: token.clone() },
        pid,
        extents.clone(),
        SourceServerOptions::default(),
    )?;
    let t0 = Instant::now();
    let remote = RemotePages::connect(server.local_addr(), id, token, extents, options)?;
    let mut got = 0usize;
    let mut last = Instant::now();
    while got < total {
        match remote.next_ready() {
            Ready::At { addr, len } => {
                let mut n = 0usize;
                remote.with_data(addr, len, &mut |d| {
                    if let Some(off) = offset_in(&layout, addr) {
                        dest[off..off + d.len()].copy_from_slice(d);
                        n = d.len();
                    }
                })?;
                remote.consumed(addr, len);
                got += n;
                last = Instant::now();
            }
            Ready::Wait => {
                if last.elapsed() > Duration::from_secs(30) {
                    return Err(PullBenchError::Stalled(format!("{:?}", remote.remote_stats())));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Ready::Anywhere => return Err(PullBenchError::Stalled(format!("{got} of {total} bytes: {:?}", remote.remote_stats()))),
        }
    }
    let pull_secs = t0.elapsed().as_secs_f64();
    let rs = remote.remote_stats().map(|s| RemoteStatsLite {
        prefetch_pages: s.prefetch_pages,
        fault_requests: s.fault_requests,
        reconnects: s.reconnects,
    });
    drop(remote);
    server.shutdown();
    if let Some(i) = (0..total).step_by(PAGE_SIZE).find(|&i| dest[i..i + PAGE_SIZE] != expected[i..i + PAGE_SIZE]) {
        let addr = layout.iter().rev().find(|r| r.2 <= i).map_or(0, |r| r.0 + (i - r.2) as u64);
        return Err(PullBenchError::Mismatch { addr });
    }

    // Plain TCP: the same bytes from memory, into the same destination buffer.
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let to = listener.local_addr()?;
    let t1 = Instant::now();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let s = TcpStream::connect(to)?;
        for chunk in expected.chunks(4 << 20) {
            (&s).write_all(chunk)?;
        }
        Ok(())
    });
    let (s, _) = listener.accept()?;
    (&s).read_exact(&mut dest)?;
    let plain_tcp_secs = t1.elapsed().as_secs_f64();
    writer.join().map_err(|_| io::Error::other("plain TCP writer panicked"))??;
    let mib = total as f64 / (1u64 << 20) as f64;
    Ok(PullBenchReport {
        bytes: total as u64,
        pull_secs,
        pull_mib_per_sec: mib / pull_secs,
        plain_tcp_secs,
        plain_tcp_mib_per_sec: mib / plain_tcp_secs,
        remote: rs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE;

    #[test]
    fn todo_removes_and_walks_with_wrap() {
        let mut t = Todo::new(&RangeSet::from_ranges([(0x1000, 0x9000), (0x20_000, 0x22_000)]));
        assert_eq!(t.bytes, 10 * P);
        t.remove(0x3000, 0x5000);
        assert_eq!(t.bytes, 8 * P);
        assert_eq!(t.next_from(0, 16 * P), Some((0x1000, 2 * P)));
        assert_eq!(t.next_from(0x3000, 16 * P), Some((0x5000, 4 * P)));
        assert_eq!(t.next_from(0x6000, 2 * P), Some((0x6000, 2 * P)));
        assert_eq!(t.next_from(0x9000, 16 * P), Some((0x20_000, 2 * P)));
        assert_eq!(t.next_from(0x30_000, 16 * P), Some((0x1000, 2 * P)), "wraps");
        t.remove(0, 1 << 40);
        assert!(t.is_empty() && t.bytes == 0);
        assert_eq!(t.next_from(0, P), None);
    }

    fn state() -> State {
        State::new(Todo::default(), 0)
    }

    #[test]
    fn arrived_pieces_split_and_free() {
        let mut st = state();
        let buf: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8).collect();
        st.arrived.insert(0x10_000, Piece { buf: Arc::new(buf), off: 0, len: 4 * PAGE_SIZE, seq: 0 });
        st.arrived_bytes = 4 * P;
        assert_eq!(st.piece_at(0x12_000).map(|p| p.0), Some(0x10_000));
        assert!(st.piece_at(0x14_000).is_none() && st.piece_at(0xf_000).is_none());
        // Take the third page: head and tail stay, sharing the buffer.
        let got = st.carve(0x12_000, 0x13_000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 0x12_000);
        assert_eq!(got[0].1.buf[got[0].1.off], 2);
        assert_eq!(st.arrived_bytes, 3 * P);
        assert_eq!(st.arrived.keys().copied().collect::<Vec<_>>(), vec![0x10_000, 0x13_000]);
        let tail = &st.arrived[&0x13_000];
        assert_eq!((tail.buf[tail.off], tail.len), (3, PAGE_SIZE));
        // Free everything: the buffer goes back to the pool once its last piece is gone.
        for (_, p) in got {
            st.recycle(p.buf, 4);
        }
        assert!(st.pool.is_empty());
        for (_, p) in st.carve(0, 1 << 40) {
            st.recycle(p.buf, 4);
        }
        assert_eq!((st.arrived_bytes, st.pool.len()), (0, 1));
    }

    #[test]
    fn plan_honours_window_cursor_and_bucket() {
        let mut st = state();
        st.todo = Todo::new(&RangeSet::from_ranges([(0x100_000, 0x200_000)]));
        st.cursor = 0x100_000;
        let opts = PullOptions { request_bytes: 64 << 10, prefetch_bytes: 256 << 10, ..PullOptions::default() };
        let (reqs, wait) = plan(&mut st, &opts, &mut None);
        assert_eq!(wait, None);
        assert_eq!(reqs.len(), 4, "256 KiB window of 64 KiB requests");
        assert_eq!(reqs[0].vaddr(), 0x100_000);
        assert_eq!(st.inflight_bytes, 256 << 10);
        assert!(plan(&mut st, &opts, &mut None).0.is_empty(), "window full");
        // A fault far ahead: the walk jumps there once there is room.
        st.inflight.pop_front();
        st.inflight_bytes -= 64 << 10;
        st.cursor = 0x1c0_000 + P;
        let (reqs, _) = plan(&mut st, &opts, &mut None);
        assert_eq!(reqs.iter().map(|r| r.vaddr()).collect::<Vec<_>>(), vec![0x1c1_000]);
        // A bucket of 1 MB/s lets one request through, then asks to wait.
        let mut st2 = state();
        st2.todo = Todo::new(&RangeSet::from_ranges([(0x100_000, 0x200_000)]));
        let mut b = Some(Bucket::new(1_000_000, 64 << 10));
        let (reqs, wait) = plan(&mut st2, &opts, &mut b);
        assert_eq!(reqs.len(), 1);
        assert!(wait.is_some_and(|w| w > Duration::from_millis(30)), "{wait:?}");
    }

    #[test]
    fn status_codes_that_cannot_change_fail_fast() {
        assert!(status_failure(wire::status::NOT_SERVED).permanent);
        assert!(status_failure(wire::status::BAD_RANGE).permanent);
        assert!(!status_failure(wire::status::SHUTTING_DOWN).permanent);
        assert!(!status_failure(wire::status::SOURCE_READ).permanent);
        assert!(status_failure(wire::status::NOT_SERVED).detail.contains("outside"));
    }
}
