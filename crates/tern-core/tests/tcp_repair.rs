//! TCP repair of ESTABLISHED and half-closed connections, and the RFC 6069 peer nudge, on real
//! sockets. Every test runs in network namespaces it creates (unique names, deleted on drop, also
//! when the test fails), so its nftables rules and forged packets never leave them.
//!
//! Each half-closed test puts the "server" side of a loopback connection in the state, dumps it,
//! silences and closes it, rebuilds it on a fresh socket, checks the state (TCP_INFO) and the
//! queues, then lets both sides finish the close and checks that each sees all data then EOF.
//!
//! The nudge test: two namespaces joined by a veth pair; the server's traffic is dropped for
//! 1.5 s while the client sends (the client backs off), the server connection is migrated, the
//! drop is lifted, and the time until the restored server receives the data is measured with
//! and without `nudge_peers`. Run with `--nocapture` to see the figures.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tern_core::files::tcp;
use tern_core::image::fd::{
    FdImage, FdKindImage, InetAddr, InetFamily, TcpConnState, TcpRepairImage,
};

const ESTABLISHED: u8 = 1;
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const CLOSE: u8 = 7;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test run, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tern-tr-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run(&all);
    }

    /// Runs an nft script inside the namespace.
    fn nft(&self, script: &str) {
        run(&["ip", "netns", "exec", &self.name, "nft", script]);
    }

    /// Runs `f` on a thread that joined this namespace: sockets it creates live here.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("opening the netns file");
                // SAFETY: setns on a valid namespace fd; it moves only this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A drop rule in a netns's nftables, removed by [`Lock::lift`] (or with the namespace).
struct Lock<'a> {
    ns: &'a Netns,
}

impl<'a> Lock<'a> {
    /// Drops TCP packets matching `rule` (nft syntax, e.g. "tcp sport 4000") on input, except
    /// the packets Tern forges (marked).
    fn new(ns: &'a Netns, rules: &[&str]) -> Lock<'a> {
        ns.nft("add table inet ternlock");
        ns.nft(
            "add chain inet ternlock input { type filter hook input priority 0; policy accept; }",
        );
        ns.nft(
            "add chain inet ternlock output { type filter hook output priority 0; policy accept; }",
        );
        for r in rules {
            let (chain, r) = r.split_once(':').unwrap_or(("input", r));
            ns.nft(&format!(
                "add rule inet ternlock {chain} meta mark != {:#x} {r} drop",
                tcp::REPAIR_PACKET_MARK
            ));
        }
        Lock { ns }
    }

    fn lift(self) {
        self.ns.nft("delete table inet ternlock");
    }
}

fn state(fd: &impl AsFd) -> u8 {
    tcp::tcp_state(fd.as_fd()).expect("TCP_INFO")
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ioctl_int(fd: &impl AsFd, req: libc::c_ulong) -> i32 {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCOUTQ/SIOCOUTQNSD write one int.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, &mut v) };
    assert_eq!(rc, 0);
    v
}
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Tcp OutRsts of the calling thread's netns.
fn out_rsts() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let head: Vec<&str> = lines[0].split_whitespace().collect();
    let vals: Vec<&str> = lines[1].split_whitespace().collect();
    let i = head.iter().position(|h| *h == "OutRsts").unwrap();
    vals[i].parse().unwrap()
}

/// A loopback connection inside the current netns: (listener port, client, server side).
fn connect(v6: bool) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (client, server)
}

/// Whether a socket local -> peer is still in this netns's TCP tables. The test harness runs
/// tests on parallel threads and some spawn `ip`/`nft`: a child between fork and exec holds a
/// copy of every fd, so closing the silenced original does not destroy it at once, and a
/// repair-mode connect on the same 4-tuple would fail with EADDRNOTAVAIL until it is gone. (The
/// engine never meets this: the original lives on the source host.)
fn tuple_in_use(local: SocketAddr, peer: SocketAddr) -> bool {
    let want = format!(":{:04X}", local.port());
    let want_peer = format!(":{:04X}", peer.port());
    ["tcp", "tcp6"].iter().any(|t| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{t}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[2].ends_with(&want_peer)
            })
    })
}

/// Dumps the server side, round-trips the image through msgpack, silences and closes the
/// original and rebuilds the connection on a fresh socket (the whole source + destination path).
fn migrate(server: TcpStream) -> (TcpStream, TcpRepairImage) {
    let local = server.local_addr().unwrap();
    let peer = server.peer_addr().unwrap();
    let server: OwnedFd = server.into();
    let image = tcp::dump_connection(server.as_fd()).expect("dump");
    let bytes = rmp_serde::to_vec_named(&image).unwrap();
    let image: TcpRepairImage = rmp_serde::from_slice(&bytes).unwrap();
    tcp::silence(server.as_fd()).expect("silence");
    drop(server);
    wait_for(
        "the original socket to be gone",
        Duration::from_secs(5),
        || !tuple_in_use(local, peer),
    );
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: integers only; the fd is owned at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fresh = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Err(e) = tcp::restore_connection(&fresh, &local, &peer, false, &image) {
        let ss = Command::new("ss").args(["-tanoi"]).output().unwrap();
        panic!(
            "restore of {local} <-> {peer} ({:?}): {e}\nsockets here:\n{}",
            image.state,
            String::from_utf8_lossy(&ss.stdout)
        );
    }
    let restored = TcpStream::from(fresh);
    restored
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (restored, image)
}

fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("reading to EOF");
    all
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read_exact");
    buf
}

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root (netns, nftables, TCP_REPAIR, raw sockets)");
        return true;
    }
    false
}

fn established(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("est");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        client.write_all(b"client->server unread").unwrap();
        (&server).write_all(b"server->client unread").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let rsts = out_rsts();
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::Established);
        assert_eq!(state(&restored), ESTABLISHED);
        assert_eq!(read_n(&mut restored, 21), b"client->server unread");
        assert_eq!(read_n(&mut client, 21), b"server->client unread");
        client.write_all(b"ping").unwrap();
        assert_eq!(read_n(&mut restored, 4), b"ping");
        restored.write_all(b"pong").unwrap();
        drop(restored);
        assert_eq!(read_to_eof(&mut client), b"pong");
        assert_eq!(out_rsts(), rsts, "a reset was sent");
    });
}

#[test]
fn established_v4() {
    established(false);
}

#[test]
fn established_v6() {
    established(true);
}

/// CLOSE_WAIT: the peer sent data then its FIN; the process has read neither. Restored, the
/// process reads the data then EOF, writes more and closes: the peer gets everything then EOF.
fn close_wait(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("cw");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        client.write_all(b"last words").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        (&server).write_all(b"unread reply").unwrap();
        wait_for("CLOSE_WAIT", Duration::from_secs(2), || {
            state(&server) == CLOSE_WAIT
        });
        let rsts = out_rsts();
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::CloseWait);
        assert_eq!(image.recv_queue.0, b"last words");
        assert_eq!(state(&restored), CLOSE_WAIT);
        assert_eq!(read_to_eof(&mut restored), b"last words");
        restored.write_all(b" and more").unwrap();
        drop(restored);
        assert_eq!(read_to_eof(&mut client), b"unread reply and more");
        assert_eq!(out_rsts(), rsts, "a reset was sent");
    });
}

#[test]
fn close_wait_v4() {
    close_wait(false);
}

#[test]
fn close_wait_v6() {
    close_wait(true);
}

/// FIN_WAIT2: the process shut down writing, the peer acked the FIN and keeps sending. Restored,
/// the process reads the peer's data; the peer's later close arrives as EOF.
fn fin_wait2(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("fw2");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        (&server).write_all(b"bye").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_to_eof(&mut client), b"bye");
        wait_for("FIN_WAIT2", Duration::from_secs(2), || {
            state(&server) == FIN_WAIT2
        });
        client.write_all(b"still talking").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::FinWait2);
        assert!(image.send_queue.0.is_empty());
        assert_eq!(image.recv_queue.0, b"still talking");
        assert_eq!(state(&restored), FIN_WAIT2);
        assert_eq!(read_n(&mut restored, 13), b"still talking");
        client.write_all(b", goodbye").unwrap();
        drop(client);
        assert_eq!(read_to_eof(&mut restored), b", goodbye");
    });
}

#[test]
fn fin_wait2_v4() {
    fin_wait2(false);
}

#[test]
fn fin_wait2_v6() {
    fin_wait2(true);
}

/// FIN_WAIT1 with the FIN transmitted but not acked (the peer's ACKs are dropped). Restored, the
/// FIN sits in the send queue as sent; once the drop is lifted it is retransmitted, acked
/// (-> FIN_WAIT2), and the peer's close arrives as EOF.
fn fin_wait1_sent(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("fw1");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        let cport = client.local_addr().unwrap().port();
        let lock = Lock::new(&ns, &[&format!("tcp sport {cport}")]);
        (&server).write_all(b"unacked goodbye").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        wait_for("the FIN on the wire", Duration::from_secs(2), || {
            ioctl_int(&server, SIOCOUTQNSD) == 0
        });
        assert_eq!(state(&server), FIN_WAIT1);
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::FinWait1);
        assert!(!image.fin_unsent);
        assert_eq!(image.send_queue.0, b"unacked goodbye");
        assert_eq!(image.unsent, 0);
        assert_eq!(state(&restored), FIN_WAIT1);
        lock.lift();
        assert_eq!(read_to_eof(&mut client), b"unacked goodbye");
        wait_for(
            "FIN_WAIT2 after the retransmission",
            Duration::from_secs(5),
            || state(&restored) == FIN_WAIT2,
        );
        drop(client);
        assert_eq!(read_to_eof(&mut restored), b"");
    });
}

#[test]
fn fin_wait1_sent_v4() {
    fin_wait1_sent(false);
}

#[test]
fn fin_wait1_sent_v6() {
    fin_wait1_sent(true);
}

/// FIN_WAIT1 with the FIN still queued behind unsent data (the peer's window is full). Restored,
/// the unsent data is written after repair mode and the FIN follows it.
#[test]
fn fin_wait1_unsent_v4() {
    if skip() {
        return;
    }
    let ns = Netns::new("fw1u");
    ns.enter(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = socket2_small_rcvbuf(listener.local_addr().unwrap());
        let (server, _) = listener.accept().unwrap();
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        server.set_nonblocking(true).unwrap();
        let mut sent = Vec::new();
        let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        while sent.len() < 256 << 10 {
            match (&server).write(&block) {
                Ok(n) => sent.extend_from_slice(&block[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        server.set_nonblocking(false).unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(state(&server), FIN_WAIT1);
        assert!(ioctl_int(&server, SIOCOUTQNSD) > 1, "no unsent data");
        let (restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::FinWait1);
        assert!(image.fin_unsent);
        assert!(image.unsent > 0);
        // What the client's small window took is acked; the rest is the queue.
        assert!(sent.ends_with(&image.send_queue.0));
        assert_eq!(state(&restored), FIN_WAIT1);
        assert!(
            read_to_eof(&mut client) == sent,
            "the peer did not get the stream then EOF"
        );
        drop(restored);
    });
}

/// A client whose receive buffer is tiny, so the server's data stays unsent.
fn socket2_small_rcvbuf(to: SocketAddr) -> TcpStream {
    // SAFETY: integers only; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size: libc::c_int = 2048;
    // SAFETY: SO_RCVBUF reads one int from `size`.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let SocketAddr::V4(v4) = to else { panic!() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the kernel reads a sockaddr_in from `sin`, alive for the call.
    let rc = unsafe {
        libc::connect(
            raw,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    TcpStream::from(fd)
}

/// LAST_ACK: the peer closed first, then the process replied and closed; its FIN is not acked
/// yet (the peer's ACKs are dropped). Restored: LAST_ACK, EOF readable; once the drop is lifted
/// the FIN is retransmitted and acked (-> CLOSE), the peer gets the reply then EOF.
fn last_ack(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("la");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        wait_for("CLOSE_WAIT", Duration::from_secs(2), || {
            state(&server) == CLOSE_WAIT
        });
        let cport = client.local_addr().unwrap().port();
        let lock = Lock::new(&ns, &[&format!("tcp sport {cport}")]);
        (&server).write_all(b"final reply").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        wait_for("the FIN on the wire", Duration::from_secs(2), || {
            ioctl_int(&server, SIOCOUTQNSD) == 0
        });
        assert_eq!(state(&server), LAST_ACK);
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::LastAck);
        assert_eq!(image.send_queue.0, b"final reply");
        assert_eq!(state(&restored), LAST_ACK);
        assert_eq!(read_to_eof(&mut restored), b"");
        lock.lift();
        assert_eq!(read_to_eof(&mut client), b"final reply");
        wait_for(
            "CLOSE after the FIN is acked",
            Duration::from_secs(5),
            || state(&restored) == CLOSE,
        );
    });
}

#[test]
fn last_ack_v4() {
    last_ack(false);
}

#[test]
fn last_ack_v6() {
    last_ack(true);
}

/// CLOSING: both sides closed at once; the process got the peer's FIN but its own FIN and data
/// were lost (server -> client dropped). Restored: CLOSING; once the drop is lifted the data
/// and FIN are retransmitted and the peer reads them then EOF.
fn closing(v6: bool) {
    if skip() {
        return;
    }
    let ns = Netns::new("cl");
    ns.enter(|| {
        let (mut client, server) = connect(v6);
        let sport = server.local_addr().unwrap().port();
        let lock = Lock::new(&ns, &[&format!("tcp sport {sport}")]);
        (&server).write_all(b"crossing").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        client.write_all(b"crossed").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        wait_for("CLOSING", Duration::from_secs(2), || {
            state(&server) == CLOSING
        });
        let (mut restored, image) = migrate(server);
        assert_eq!(image.state, TcpConnState::Closing);
        assert_eq!(image.send_queue.0, b"crossing");
        assert_eq!(image.recv_queue.0, b"crossed");
        assert_eq!(state(&restored), CLOSING);
        assert_eq!(read_to_eof(&mut restored), b"crossed");
        lock.lift();
        assert_eq!(read_to_eof(&mut client), b"crossing");
    });
}

#[test]
fn closing_v4() {
    closing(false);
}

#[test]
fn closing_v6() {
    closing(true);
}

/// A listener with a connection the process has not accept()ed yet is refused by `migrate
/// check` (tcp-state blocker) and by the dump, with the reason. The process is a `sleep` this
/// test starts holding the listener as fd 3.
#[test]
fn listener_with_pending_connection_is_refused() {
    use std::os::unix::process::CommandExt;
    if skip() {
        return;
    }
    let ns = Netns::new("bl");
    ns.enter(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let lfd = listener.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("30")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: dup2 is async-signal-safe; the closure only makes the listener fd 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(lfd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let pid = tern_core::sys::Pid::from_raw(child.id() as i32);
        wait_for("the child to exec", Duration::from_secs(5), || {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.to_string_lossy().contains("sleep"))
                .unwrap_or(false)
        });
        // Kill the child even when an assertion fails.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let inventory = tern_core::proc::inspect(pid).expect("inspect");
            let report = tern_core::check::check(&inventory);
            let blocker = report
                .blockers
                .iter()
                .find(|b| b.subject == "fd 3")
                .expect("no blocker for the listener");
            assert_eq!(blocker.kind, "tcp-state");
            assert!(
                blocker.reason.contains("not yet accept()ed"),
                "{}",
                blocker.reason
            );
            let err = tern_core::files::dump::dump_fds(pid, &inventory)
                .expect_err("a listener with a pending connection was dumped");
            assert!(err.to_string().contains("accept queue"), "{err}");
        }));
        let _ = child.kill();
        let _ = child.wait();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The peer nudge.

struct Pair {
    a: Netns,
    b: Netns,
}

/// Two namespaces joined by a veth pair: a = 10.77.0.1 / fd77::1, b = 10.77.0.2 / fd77::2.
fn pair() -> Pair {
    let a = Netns::new("na");
    let b = Netns::new("nb");
    a.ip(&[
        "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "10.77.0.1/24", "dev", "va"]);
    b.ip(&["addr", "add", "10.77.0.2/24", "dev", "vb"]);
    a.ip(&["addr", "add", "fd77::1/64", "dev", "va", "nodad"]);
    b.ip(&["addr", "add", "fd77::2/64", "dev", "vb", "nodad"]);
    a.ip(&["link", "set", "va", "up"]);
    b.ip(&["link", "set", "vb", "up"]);
    Pair { a, b }
}

/// Client (in b) sends while the server's (in a) traffic is dropped for `freeze`; the server
/// connection is migrated meanwhile; after the drop is lifted and the connection restored,
/// returns how long the restored server waited for the data, and the nudge report.
fn frozen_send(
    v6: bool,
    nudge: bool,
    after_retransmit: Duration,
) -> (Duration, Option<tcp::NudgeReport>) {
    let p = pair();
    let server_ip = if v6 { "[fd77::1]" } else { "10.77.0.1" };
    let listener =
        p.a.enter(|| TcpListener::bind(format!("{server_ip}:0")).unwrap());
    let addr = listener.local_addr().unwrap();
    let mut client = p.b.enter(|| TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    drop(listener);
    // A few round trips so both sides have an RTT estimate (RTO near its 200 ms floor).
    for _ in 0..5 {
        client.write_all(b"ping").unwrap();
        let mut b4 = [0u8; 4];
        (&server).read_exact(&mut b4).unwrap();
        (&server).write_all(b"pong").unwrap();
        client.read_exact(&mut b4).unwrap();
    }
    let port = addr.port();
    let lock = Lock::new(
        &p.a,
        &[
            &format!("tcp dport {port}"),
            &format!("output:tcp sport {port}"),
        ],
    );
    let t0 = Instant::now();
    client.write_all(b"sent during the freeze").unwrap();
    // The switchover: dump under the lock, silence, close, rebuild after the lock.
    std::thread::sleep(Duration::from_millis(50));
    let local = server.local_addr().unwrap();
    let peer = server.peer_addr().unwrap();
    let server: OwnedFd = server.into();
    let image = tcp::dump_connection(server.as_fd()).expect("dump");
    tcp::silence(server.as_fd()).unwrap();
    drop(server);
    // Lift the lock `after_retransmit` after the client's third retransmission (its RTO then
    // is 8 x base, ~1.6 s), so both runs see the same timer: ~`freeze` in all.
    wait_for(
        "the client's third retransmission",
        Duration::from_secs(10),
        || client_info(&client).0 >= 3,
    );
    let third = t0.elapsed();
    std::thread::sleep(after_retransmit);
    let (backoff, rto_us) = client_info(&client);
    lock.lift();
    eprintln!(
        "  lock lifted {:?} after the client's first send; 3rd retransmission at {third:?}; client backoff {backoff}, rto {} ms",
        t0.elapsed(),
        rto_us / 1000
    );
    let (mut restored, report, waited) = p.a.enter(|| {
        wait_for(
            "the original socket to be gone",
            Duration::from_secs(5),
            || !tuple_in_use(local, peer),
        );
        // SAFETY: integers only; the fd is owned at once.
        let raw = unsafe {
            libc::socket(
                if v6 { libc::AF_INET6 } else { libc::AF_INET },
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fresh = unsafe { OwnedFd::from_raw_fd(raw) };
        tcp::restore_connection(&fresh, &local, &peer, false, &image).expect("restore");
        let restored_at = Instant::now();
        let mut restored = TcpStream::from(fresh);
        restored
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // The nudge runs beside the read (a thread started here shares this netns), so the
        // figure is the arrival time, not the length of the nudge call.
        let nudger = nudge.then(|| {
            // As the agent would: the targets come from the image's fds.
            let inet = |a: SocketAddr| InetAddr {
                address: a.ip().to_string(),
                port: a.port(),
                scope_id: 0,
            };
            let fds = [FdImage {
                fd: 3,
                cloexec: false,
                flags: libc::O_RDWR as u32,
                kind: FdKindImage::TcpEstablished {
                    family: if v6 {
                        InetFamily::Inet6
                    } else {
                        InetFamily::Inet
                    },
                    local: inet(local),
                    peer: inet(peer),
                    options: Default::default(),
                    repair: image.clone(),
                },
            }];
            let targets = tcp::nudge_targets(&fds);
            assert_eq!(targets.len(), 1);
            assert_eq!((targets[0].local, targets[0].peer), (local, peer));
            assert_eq!(targets[0].seqs[0], image.recv_seq);
            std::thread::spawn(move || {
                tcp::nudge_peers(&targets, tcp::NudgeOptions::default()).expect("nudge")
            })
        });
        assert_eq!(read_n(&mut restored, 22), b"sent during the freeze");
        let waited = restored_at.elapsed();
        (restored, nudger.map(|t| t.join().unwrap()), waited)
    });
    restored.write_all(b"ok").unwrap();
    let mut b2 = [0u8; 2];
    client.read_exact(&mut b2).unwrap();
    (waited, report)
}

/// The client's (tcpi_backoff, tcpi_rto in µs) from TCP_INFO.
fn client_info(s: &TcpStream) -> (u8, u32) {
    let mut buf = [0u8; 104];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes to `buf`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    (buf[4], u32::from_ne_bytes(buf[8..12].try_into().unwrap()))
}

fn nudge(v6: bool) {
    if skip() {
        return;
    }
    let after = Duration::from_millis(300);
    let (plain, _) = frozen_send(v6, false, after);
    let (nudged, report) = frozen_send(v6, true, after);
    let report = report.unwrap();
    eprintln!(
        "nudge {}: lock lifted {:?} after the client's 3rd retransmission (~1.7 s freeze); data reached the restored server {:?} after restore without the nudge, {:?} with it ({} ICMP{} errors sent, failures {:?})",
        if v6 { "IPv6" } else { "IPv4" },
        after,
        plain,
        nudged,
        report.sent,
        if v6 { "v6" } else { "" },
        report.failures
    );
    assert!(report.sent > 0 && report.failures.is_empty());
    assert!(
        plain > Duration::from_millis(800),
        "without the nudge the peer retransmitted after {plain:?}: the freeze did not back it off"
    );
    assert!(
        nudged < Duration::from_millis(100) && nudged * 5 < plain,
        "the nudge did not speed up the retransmission: {nudged:?} vs {plain:?}"
    );
}

#[test]
fn nudge_v4() {
    nudge(false);
}

#[test]
fn nudge_v6() {
    nudge(true);
}
