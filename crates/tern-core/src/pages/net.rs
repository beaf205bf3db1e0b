//! The TCP plumbing both page servers share: the push stream's destination
//! ([`super::server::PageServer`]) and the post-copy page source ([`super::pull::PageSourceServer`]).
//!
//! ```text
//! Acceptor::start(addr, shared)   → non-blocking listener + an eventfd for shutdown; accept thread:
//!   poll(listener, eventfd) → accept
//!     at most max_connections at once: more get REPLY BUSY (best effort, non-blocking) and a close
//!     └─ one thread per connection: Serve::serve(sock, peer), then its slot is freed
//! accept_hello(gate, sock)        → hello within hello_timeout: magic/version/flags, then migration
//!                                   id AND token compared in constant time (both always) → REPLY OK,
//!                                   or REPLY <reason> + close (counted as rejected)
//! refuse_and_reset(sock, status)  → STATUS, half-close, short drain, abortive close (RST)
//! Acceptor::stop(gate)            → stop flag, eventfd: the accept thread shuts every connection
//!                                   (Serve::TEARDOWN: the read side, or both), joins their threads
//!                                   and ends; stop joins it
//! ```
//!
//! Why the abortive close: a connection ended by the server while the peer is still sending must
//! not close gracefully. After `shutdown(SHUT_RD)` Linux stops sending window updates, so a peer
//! blocked on a full receive window stays blocked even once the queue is drained; a close with an
//! empty queue then sends only a FIN, and the orphaned socket (FIN-WAIT-2) keeps advertising a zero
//! window: the peer's zero-window probes carry no new data, so nothing ever provokes a RST and the
//! peer sits until its io_timeout (60 s by default for a page sender). With SO_LINGER 0 the close
//! always sends a RST, which wakes a blocked send at once; the STATUS written before it stays
//! readable in the peer's receive queue.

use super::server::Expected;
use super::wire::{self, ct_eq, encode_hello_reply, Hello, HelloStatus, Status, HELLO_LEN};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Locks `m`, taking the data of a poisoned lock: a panicking connection thread must not take the
/// server (or the process a pull feeds) down with it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Sets a socket option to `value` (passed by pointer with its exact size).
pub(super) fn setsockopt<T>(sock: &TcpStream, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: a socket we hold, and a pointer to a live `T` with its exact size; the kernel only
    // reads it during the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The live connections of a server: a clone of each socket (to shut it on stop) and the threads.
#[derive(Debug, Default)]
struct Conns {
    socks: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

/// What the accept side of one server knows: whom it accepts, how many at once, whether it is
/// stopping, and its connection counts.
#[derive(Debug)]
pub(super) struct Gate {
    expected: Expected,
    hello_timeout: Duration,
    max_connections: usize,
    stop: AtomicBool,
    /// Connections whose hello was answered OK.
    pub(super) accepted: AtomicU64,
    /// Connections refused: bad or missing hello, wrong id or token, busy, shutting down.
    pub(super) rejected: AtomicU64,
    conns: Mutex<Conns>,
}

impl Gate {
    pub(super) fn new(expected: Expected, hello_timeout: Duration, max_connections: usize) -> Gate {
        Gate {
            expected,
            hello_timeout,
            max_connections,
            stop: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            conns: Mutex::new(Conns::default()),
        }
    }

    /// True once [`Acceptor::stop`] began.
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Connections being served now.
    pub(super) fn open_connections(&self) -> usize {
        lock(&self.conns).socks.len()
    }
}

/// A connection's place in [`Gate::open_connections`], freed when its thread ends, also by a
/// panic in `serve` (a slot left behind would count as open forever and take a connection of
/// `max_connections`).
struct Slot<S: Serve> {
    sh: Arc<S>,
    id: u64,
}

impl<S: Serve> Drop for Slot<S> {
    fn drop(&mut self) {
        lock(&self.sh.gate().conns).socks.remove(&self.id);
    }
}

/// A server behind an [`Acceptor`].
pub(super) trait Serve: Send + Sync + 'static {
    const ACCEPT_THREAD: &'static str;
    const CONN_THREAD: &'static str;
    /// How the accept thread shuts the live connections when the server stops (which wakes their
    /// threads), before joining them.
    const TEARDOWN: Shutdown;
    fn gate(&self) -> &Gate;
    /// Serves one accepted connection on its own thread (start with [`accept_hello`]).
    fn serve(&self, sock: TcpStream, peer: SocketAddr);
}

#[derive(Debug)]
pub(super) enum StartError {
    Bind(io::Error),
    Setup(io::Error),
    Spawn(io::Error),
}

/// A listening socket and its accept thread.
#[derive(Debug)]
pub(super) struct Acceptor {
    local: SocketAddr,
    wake: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Acceptor {
    /// Listens on `addr` (port 0: any) and accepts at once for `shared`.
    pub(super) fn start<S: Serve>(addr: SocketAddr, shared: Arc<S>) -> Result<Acceptor, StartError> {
        let listener = TcpListener::bind(addr).map_err(StartError::Bind)?;
        listener.set_nonblocking(true).map_err(StartError::Setup)?;
        let local = listener.local_addr().map_err(StartError::Setup)?;
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(StartError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh eventfd that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake_raw = wake.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name(S::ACCEPT_THREAD.into())
            .spawn(move || accept_loop(shared, listener, wake_raw))
            .map_err(StartError::Spawn)?;
        Ok(Acceptor { local, wake, thread: Mutex::new(Some(thread)) })
    }

    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting, wakes the accept thread and joins it (it shuts and joins every connection
    /// thread first). Idempotent.
    pub(super) fn stop(&self, gate: &Gate) {
        gate.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A failure (counter full) is
        // harmless: the accept thread is already woken.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn accept_loop<S: Serve>(sh: Arc<S>, listener: TcpListener, wake: RawFd) {
    let gate = sh.gate();
    let mut next_id = 0u64;
    while !gate.stopping() {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfd and we pass its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 || gate.stopping() {
            break;
        }
        let (sock, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // EMFILE and the like: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let mut c = lock(&gate.conns);
        c.threads.retain(|t| !t.is_finished());
        if c.socks.len() >= gate.max_connections {
            drop(c);
            bump(&gate.rejected, 1);
            let _ = sock.set_nonblocking(true);
            let _ = (&sock).write(&encode_hello_reply(HelloStatus::Busy));
            continue;
        }
        let Ok(clone) = sock.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        c.socks.insert(id, clone);
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new().name(S::CONN_THREAD.into()).spawn(move || {
            let slot = Slot { sh: sh2, id };
            slot.sh.serve(sock, peer);
        });
        match spawned {
            Ok(h) => c.threads.push(h),
            Err(_) => {
                c.socks.remove(&id);
            }
        }
    }
    // Teardown: wake every connection thread (S::TEARDOWN says how, and why), then join them
    // (without holding the lock).
    let threads = {
        let mut c = lock(&gate.conns);
        for s in c.socks.values() {
            let _ = s.shutdown(S::TEARDOWN);
        }
        std::mem::take(&mut c.threads)
    };
    for t in threads {
        let _ = t.join();
    }
}

/// The start of every served connection: blocking mode, TCP_NODELAY, hello_timeout both ways; the
/// hello read and checked; the reply. Some(hello bytes) when it was answered OK (counted as
/// accepted; the timeouts are still hello_timeout: the caller sets its own). None when the
/// connection is refused or broke before a whole hello (counted as rejected; the connection is
/// shut): the caller just returns, nothing else happens, so a stranger cannot disturb a legitimate
/// stream.
pub(super) fn accept_hello(gate: &Gate, sock: &TcpStream) -> Option<[u8; HELLO_LEN]> {
    let setup = (|| -> io::Result<()> {
        sock.set_nonblocking(false)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(gate.hello_timeout))?;
        sock.set_write_timeout(Some(gate.hello_timeout))
    })();
    let mut hb = [0u8; HELLO_LEN];
    if setup.is_err() || !matches!(wire::read_full(&mut &*sock, &mut hb), Ok(HELLO_LEN)) {
        bump(&gate.rejected, 1);
        return None;
    }
    let status = match Hello::decode(&hb) {
        Err(e) => e.status(),
        Ok(h) => {
            // Both comparisons always run, each in constant time.
            let id_ok = ct_eq(&h.migration_id.0, &gate.expected.migration_id.0);
            let token_ok = h.token.ct_eq(&gate.expected.token);
            if !id_ok {
                HelloStatus::UnknownMigration
            } else if !token_ok {
                HelloStatus::BadToken
            } else if gate.stopping() {
                HelloStatus::ShuttingDown
            } else {
                HelloStatus::Ok
            }
        }
    };
    // Counted before the reply: whoever reads the reply sees the count.
    bump(if status == HelloStatus::Ok { &gate.accepted } else { &gate.rejected }, 1);
    let _ = (&*sock).write_all(&encode_hello_reply(status));
    if status != HelloStatus::Ok {
        let _ = sock.shutdown(Shutdown::Both);
        return None;
    }
    Some(hb)
}

/// Ends a connection the server gives up on while the peer may still be sending: `status` is
/// written (within the socket's write timeout), the write side shut, what is in flight drained
/// for a moment (returns at once after a stop), and the last close made abortive, so that
/// whatever the peer still sends meets a RST, not a silent zero window (see the module header).
/// The caller still shuts the socket.
pub(super) fn refuse_and_reset(sock: &TcpStream, status: Status) {
    let _ = (&*sock).write_all(&status.encode_record());
    // Let the STATUS reach the peer before the close turns into a reset: stop sending, then
    // drain.
    let _ = sock.shutdown(Shutdown::Write);
    drain(sock, Duration::from_millis(200));
    set_abortive_close(sock);
}

/// Makes the last close of `sock` (and of its clone in the connection table: SO_LINGER belongs to
/// the socket, not the descriptor) send a RST instead of a FIN. Best effort: if it fails, the
/// close is graceful as before.
fn set_abortive_close(sock: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let _ = setsockopt(sock, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

fn drain(sock: &TcpStream, for_: Duration) {
    let until = Instant::now() + for_;
    let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
    let mut junk = vec![0u8; 256 << 10];
    while Instant::now() < until {
        match (&*sock).read(&mut junk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}
