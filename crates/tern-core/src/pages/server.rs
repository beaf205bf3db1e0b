//! The destination side of page streams: [`PageServer`].
//!
//! ```text
//! bind(addr, expected {migration_id, token})      → listening; port() tells the port (0 = any)
//!   accept thread (poll on listener + an eventfd for shutdown)
//!     └─ one thread per connection (at most max_connections at once; more get BUSY):
//!          hello (hello_timeout) → magic/version/flags, then migration id AND token compared in
//!          constant time (both always) → REPLY OK, or REPLY <reason> + close (counted as
//!          rejected; nothing else happens: a stranger cannot disturb a legitimate stream)
//!          records → validated → written into a fresh staging PageStore of this connection
//!          END valid → staging merged into the migration's store under the lock (a move when the
//!                      store is empty), event Completed, then STATUS OK (so OK = committed)
//!          any error → staging dropped (never half-applied), event Failed, STATUS <code>
//!                      (SHUTTING_DOWN when the server is stopping), short drain, abortive close
//!                      (RST): the source learns at once, even while blocked on a full window
//! wait(timeout)       → next event: Completed → (the store, taken out; stats) | Failed → error
//! wait_stream(timeout)→ next event without taking the store (pre-copy rounds: streams one after
//!                       another merge into the same store, later pages win); take_store() later
//! shutdown()          → stop accepting, shut every connection's read side (wakes its thread),
//!                       join all threads (each ends as above), drop store
//! ```
//!
//! Why the abortive close: a connection ended by the server while the source is still sending
//! must not close gracefully, or a source blocked on a full receive window could sit until its
//! io_timeout; with SO_LINGER 0 the close always sends a RST, which wakes a blocked send at once,
//! and the STATUS written before it stays readable (the whole story: net.rs, whose accept side,
//! hello check and abortive close this server shares with the post-copy page source).
//!
//! Streams of one migration may also overlap in time; each commits at its own END, so where two
//! streams carry the same page, the one whose END arrives last wins. The source must not run two
//! rounds at once. A failed stream does not undo earlier committed streams (each is complete and
//! verified on its own); the control plane decides whether to resend or abort.

use super::net::{self, accept_hello, bump, lock, Acceptor, Gate, Serve, StartError};
use super::sender::TransferStats;
use super::wire::{
    self, MigrationId, Record, RecordError, RecordReader, Status, Token, HELLO_LEN, MAX_DATA_PAGES,
};
use super::{PageSink, PageStore, PAGE_SIZE};
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The one migration a server accepts streams for.
#[derive(Debug, Clone)]
pub struct Expected {
    pub migration_id: MigrationId,
    pub token: Token,
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a new connection has to send its hello.
    pub hello_timeout: Duration,
    /// Longest silence inside a stream before it is dropped.
    pub io_timeout: Duration,
    /// Connections handled at once; more are refused with BUSY.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            hello_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            max_connections: 8,
        }
    }
}

/// Live counters (readable at any time, e.g. by the agent's progress reporting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerProgress {
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub streams_active: u64,
    pub streams_completed: u64,
    pub streams_failed: u64,
    /// Validated pages received so far, including streams still in flight (and failed ones).
    pub data_pages_received: u64,
    pub zero_pages_received: u64,
    pub wire_bytes_received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("page server: binding {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("page server: setting up the listener failed")]
    Setup(#[source] io::Error),
    #[error("page server: starting its thread failed")]
    Spawn(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("page server: no stream completed within {0:?}")]
    Timeout(Duration),
    #[error("page server: the stream from {peer} failed and its pages were discarded")]
    StreamFailed {
        peer: SocketAddr,
        #[source]
        error: RecordError,
    },
    #[error("page server: shut down")]
    ShutDown,
}

#[derive(Debug)]
enum Event {
    Completed(TransferStats),
    Failed {
        peer: SocketAddr,
        error: RecordError,
    },
}

#[derive(Debug, Default)]
struct State {
    store: PageStore,
    events: VecDeque<Event>,
}

/// The stream counters (connections accepted and rejected are the gate's).
#[derive(Debug, Default)]
struct Counters {
    active: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    data_pages: AtomicU64,
    zero_pages: AtomicU64,
    wire_bytes: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    gate: Gate,
    opts: ServerOptions,
    state: Mutex<State>,
    cond: Condvar,
    n: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Serve for Shared {
    const ACCEPT_THREAD: &'static str = "tern-page-accept";
    const CONN_THREAD: &'static str = "tern-page-conn";
    // Only the read side is shut: a thread blocked in a read returns at once and can still write
    // its STATUS (SHUTTING_DOWN) before it closes the connection with a RST (see the module
    // header).
    const TEARDOWN: Shutdown = Shutdown::Read;

    fn gate(&self) -> &Gate {
        &self.gate
    }

    fn serve(&self, sock: TcpStream, peer: SocketAddr) {
        serve_conn(self, sock, peer);
    }
}

/// Receives page streams for one migration. See the module header.
#[derive(Debug)]
pub struct PageServer {
    shared: Arc<Shared>,
    acceptor: Acceptor,
}

impl PageServer {
    pub fn bind(addr: SocketAddr, expected: Expected) -> Result<PageServer, BindError> {
        PageServer::bind_with(addr, expected, ServerOptions::default())
    }

    pub fn bind_with(
        addr: SocketAddr,
        expected: Expected,
        opts: ServerOptions,
    ) -> Result<PageServer, BindError> {
        let shared = Arc::new(Shared {
            gate: Gate::new(expected, opts.hello_timeout, opts.max_connections),
            opts,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            n: Counters::default(),
        });
        let acceptor = Acceptor::start(addr, shared.clone()).map_err(|e| match e {
            StartError::Bind(source) => BindError::Bind { addr, source },
            StartError::Setup(e) => BindError::Setup(e),
            StartError::Spawn(e) => BindError::Spawn(e),
        })?;
        Ok(PageServer { shared, acceptor })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn progress(&self) -> ServerProgress {
        let n = &self.shared.n;
        let gate = &self.shared.gate;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerProgress {
            connections_accepted: g(&gate.accepted),
            connections_rejected: g(&gate.rejected),
            streams_active: g(&n.active),
            streams_completed: g(&n.completed),
            streams_failed: g(&n.failed),
            data_pages_received: g(&n.data_pages),
            zero_pages_received: g(&n.zero_pages),
            wire_bytes_received: g(&n.wire_bytes),
        }
    }

    fn next_event(&self, timeout: Duration) -> Result<(MutexGuard<'_, State>, Event), ServeError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if self.shared.gate.stopping() {
                return Err(ServeError::ShutDown);
            }
            if let Some(ev) = st.events.pop_front() {
                return Ok((st, ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ServeError::Timeout(timeout));
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the next stream to end. A valid END → the store (taken out of the server: a later
    /// stream starts a new one) and that stream's stats; a failed stream → its error.
    /// Connections refused at hello are not events and do not end the wait.
    pub fn wait(&self, timeout: Duration) -> Result<(PageStore, TransferStats), ServeError> {
        match self.next_event(timeout)? {
            (mut st, Event::Completed(stats)) => Ok((std::mem::take(&mut st.store), stats)),
            (_, Event::Failed { peer, error }) => Err(ServeError::StreamFailed { peer, error }),
        }
    }

    /// Like [`PageServer::wait`] but leaves the store in place, so that the next stream merges
    /// into it (pre-copy rounds). Take it with [`PageServer::take_store`].
    pub fn wait_stream(&self, timeout: Duration) -> Result<TransferStats, ServeError> {
        match self.next_event(timeout)? {
            (_, Event::Completed(stats)) => Ok(stats),
            (_, Event::Failed { peer, error }) => Err(ServeError::StreamFailed { peer, error }),
        }
    }

    /// The pages committed so far (leaves an empty store behind).
    pub fn take_store(&self) -> PageStore {
        std::mem::take(&mut self.shared.lock().store)
    }

    /// Stops accepting, breaks every connection, joins every thread and drops all pages.
    /// Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.acceptor.stop(&self.shared.gate);
        let mut st = self.shared.lock();
        st.store.clear();
        st.events.clear();
        drop(st);
        self.shared.cond.notify_all();
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve_conn(sh: &Shared, sock: TcpStream, peer: SocketAddr) {
    let Some(hb) = accept_hello(&sh.gate, &sock) else {
        return;
    };
    bump(&sh.n.active, 1);
    let started = Instant::now();
    let _ = sock.set_read_timeout(Some(sh.opts.io_timeout));
    let mut reader = RecordReader::new(BufReader::with_capacity(256 << 10, &sock), &hb);
    let mut staging = PageStore::new();
    let mut buf = Vec::with_capacity(MAX_DATA_PAGES as usize * PAGE_SIZE);
    let mut last_wire = HELLO_LEN as u64;
    bump(&sh.n.wire_bytes, last_wire);
    let outcome = loop {
        let r = match reader.next_record(&mut buf) {
            Ok(Record::Data { vaddr, data }) => {
                bump(&sh.n.data_pages, (data.len() / PAGE_SIZE) as u64);
                staging.put_pages(vaddr, data).map_err(RecordError::from)
            }
            Ok(Record::Zero { vaddr, count }) => {
                bump(&sh.n.zero_pages, count);
                staging
                    .put_zero_pages(vaddr, count)
                    .map_err(RecordError::from)
            }
            Ok(Record::End(totals)) => break Ok(totals),
            Err(RecordError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(RecordError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data from the source for {:?}", sh.opts.io_timeout),
                )))
            }
            Err(e) => Err(e),
        };
        let w = reader.wire_bytes();
        bump(&sh.n.wire_bytes, w - last_wire);
        last_wire = w;
        if let Err(e) = r {
            break Err(e);
        }
    };
    sh.n.active.fetch_sub(1, Ordering::Relaxed);
    let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
    match outcome {
        Ok(totals) => {
            let stats = TransferStats::new(&totals, reader.wire_bytes(), started.elapsed());
            drop(reader);
            let committed = {
                let mut st = sh.lock();
                if sh.gate.stopping() {
                    false
                } else {
                    staging.compact();
                    st.store.merge_from(staging);
                    st.events.push_back(Event::Completed(stats));
                    true
                }
            };
            let code = if committed {
                bump(&sh.n.completed, 1);
                sh.cond.notify_all();
                wire::status::OK
            } else {
                wire::status::SHUTTING_DOWN
            };
            let _ = (&sock).write_all(&Status { code, totals }.encode_record());
        }
        Err(error) => {
            drop(staging);
            let totals = reader.totals();
            drop(reader);
            // A stream cut by shutdown() reads as EOF here: tell the source why.
            let code = if sh.gate.stopping() {
                wire::status::SHUTTING_DOWN
            } else {
                error.status_code()
            };
            // Let the STATUS reach the source, then make whatever it still sends meet a RST, not
            // a silent zero window (see the module header).
            net::refuse_and_reset(&sock, Status { code, totals });
            bump(&sh.n.failed, 1);
            sh.lock().events.push_back(Event::Failed { peer, error });
            sh.cond.notify_all();
        }
    }
    let _ = sock.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::{PageSender, SenderOptions};

    /// shutdown() right after the source has filled the pipe, then the source sends on: it must
    /// learn within a moment, not at its io_timeout. Before the abortive close this hung now and
    /// then, more often under CPU load (the server's socket drained after SHUT_RD without a window
    /// update, closed with a FIN, and its orphan advertised a zero window until the source gave
    /// up); timing-dependent, so it catches a regression only sometimes.
    #[test]
    fn shutdown_mid_stream_reaches_the_sender_at_once() {
        let chunk = vec![0x5au8; 4 << 20];
        for i in 0..10u64 {
            let expected = Expected {
                migration_id: MigrationId([7; 16]),
                token: Token([0xab; 32]),
            };
            let srv = PageServer::bind("127.0.0.1:0".parse().unwrap(), expected.clone()).unwrap();
            let opts = SenderOptions {
                io_timeout: Duration::from_secs(20),
                ..SenderOptions::default()
            };
            let mut tx = PageSender::connect(
                srv.local_addr(),
                expected.migration_id,
                expected.token,
                opts,
            )
            .unwrap();
            tx.put_pages(0x1000, &chunk).unwrap();
            srv.shutdown();
            let t0 = Instant::now();
            let r = (|| {
                for n in 1..64u64 {
                    tx.put_pages(0x1000 + n * (4 << 20), &chunk)?;
                }
                tx.finish().map(|_| ())
            })();
            let late = t0.elapsed();
            assert!(
                r.is_err(),
                "iteration {i}: the stream cannot have completed"
            );
            assert!(
                late < Duration::from_secs(3),
                "iteration {i}: the sender learned only after {late:?}: {r:?}"
            );
        }
    }
}
