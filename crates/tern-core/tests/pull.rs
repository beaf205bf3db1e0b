//! Post-copy page pull against real processes: a fixture (tests/lazy/fixture.c: a region whose
//! every 8-byte word is a function of its page and position) is stopped with SIGSTOP, its region is
//! served by a PageSourceServer on 127.0.0.1, and RemotePages fetches it through the fault path
//! (with_data) and the prefetch path (next_ready / with_data / consumed, as the lazy thread does);
//! every byte is compared with a direct read of the process. Then the refusals (token, id, pages
//! outside the extents, malformed requests, busy), a connection cut through a proxy, a source that
//! is gone for good, the HOMED confirmation and the source's idle clock, and the throughput
//! against plain TCP (printed: run with --nocapture).
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tern_core::dirty::RangeSet;
use tern_core::pages::pull::{
    loopback_pull_throughput, PageSourceServer, PullError, PullOptions, RemotePages, RemoteState, SourceServerOptions,
};
use tern_core::pages::wire::{
    self, encode_hello_reply, EndTotals, Hello, HelloStatus, Kind, PageRequest, RecordError, Reply, Status, HELLO_REPLY_LEN,
};
use tern_core::pages::{Expected, MigrationId, PageServer, ServeError, Token, PAGE_SIZE};
use tern_core::restore::lazy::{LazySource, Ready};
use tern_core::sys::Pid;

const P: u64 = PAGE_SIZE as u64;

/// The tests measure time and throughput: one at a time (2 cores).
fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

fn fixture_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_fixture("lazy/fixture.c", "pull-fixture"))
}

/// A stopped fixture process and its patterned region.
struct Frozen {
    proc: support::OwnedProc,
    region: u64,
    len: u64,
}

impl Frozen {
    fn start(mib: u64) -> Frozen {
        let dir = support::scratch_dir("pull");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let status = dir.join(format!("f{n}.status"));
        let trigger = dir.join(format!("f{n}.never")); // never created: the fixture waits forever
        let (proc, s) = start_fixture(&status, &trigger, mib);
        let region = u64::from_str_radix(s["region"].trim_start_matches("0x"), 16).expect("region address");
        assert_eq!(support::num(&s, "pages"), mib * 256);
        // SAFETY: stopping a process this test started, by its pid.
        assert_eq!(unsafe { libc::kill(proc.pid, libc::SIGSTOP) }, 0);
        let t0 = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", proc.pid)).unwrap();
            let state = stat.rsplit_once(") ").map(|(_, r)| r.as_bytes()[0]);
            if state == Some(b'T') {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "the fixture did not stop: {stat}");
            std::thread::sleep(Duration::from_millis(2));
        }
        Frozen { proc, region, len: mib << 20 }
    }

    fn pid(&self) -> Pid {
        Pid::new(self.proc.pid).unwrap()
    }

    fn extents(&self) -> RangeSet {
        RangeSet::from_ranges([(self.region, self.region + self.len)])
    }

    /// The whole region, read directly (process_vm_readv).
    fn read_all(&self) -> Vec<u8> {
        tern_core::remote::read_memory(self.pid(), self.region, self.len as usize).unwrap()
    }
}

/// Starts tests/lazy/fixture.c in its "discard" mode with a region of `mib` MiB and waits until it
/// has filled it; it changes its memory once `trigger` exists.
fn start_fixture(status: &Path, trigger: &Path, mib: u64) -> (support::OwnedProc, support::Status) {
    let mut cmd = Command::new(fixture_bin());
    cmd.arg(status).arg(trigger).arg(mib.to_string()).arg("discard");
    support::start_with_status(&mut cmd, status, phase("ready"), "the fixture to fill its region", Duration::from_secs(60))
}

/// A status check: the fixture reports phase `p`.
fn phase(p: &'static str) -> impl Fn(&support::Status) -> bool {
    move |s| s.get("phase").is_some_and(|x| x == p)
}

/// The fixture's pattern (tests/lazy/fixture.c `word`).
fn word(page: u64, j: u64) -> u64 {
    page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j.wrapping_mul(0x100_0000_01b3) ^ 0x5a5a
}

fn check_pattern(page_index: u64, data: &[u8]) {
    for (j, w) in data.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(got, word(page_index, j as u64), "page {page_index} word {j}");
    }
}

fn expected() -> Expected {
    Expected { migration_id: MigrationId([0x11; 16]), token: Token::generate().unwrap() }
}

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A test's stage: the serial lock held, a frozen fixture of `mib` MiB, and a page source serving
/// its region to the migration `e`.
fn stage(mib: u64, opts: SourceServerOptions) -> (MutexGuard<'static, ()>, Frozen, Expected, PageSourceServer) {
    let g = serial();
    let f = Frozen::start(mib);
    let e = expected();
    let server = PageSourceServer::bind(lo(), e.clone(), f.pid(), f.extents(), opts).unwrap();
    (g, f, e, server)
}

fn connect(addr: SocketAddr, e: &Expected, f: &Frozen, opts: PullOptions) -> Arc<RemotePages> {
    RemotePages::connect(addr, e.migration_id, e.token.clone(), f.extents(), opts).unwrap()
}

/// `[addr, addr + len)` through with_data (as many calls as it takes), copied into `dest`
/// (offsets from `base`).
fn fetch(src: &RemotePages, base: u64, addr: u64, len: u64, dest: &mut [u8]) {
    let mut done = 0u64;
    while done < len {
        let at = addr + done;
        let mut n = 0;
        let had = src
            .with_data(at, len - done, &mut |d| {
                let off = (at - base) as usize;
                dest[off..off + d.len()].copy_from_slice(d);
                n = d.len() as u64;
            })
            .unwrap();
        assert!(had && n > 0);
        done += n;
    }
}

/// The lazy thread's background loop, copying into `dest` (offsets from `base`): until nothing
/// remains. Returns the number of chunks taken.
fn drain_prefetch(src: &RemotePages, base: u64, dest: &mut [u8], mut on_chunk: impl FnMut(u64)) -> usize {
    let mut chunks = 0;
    let t0 = Instant::now();
    loop {
        match src.next_ready() {
            Ready::At { addr, len } => {
                on_chunk(addr);
                fetch(src, base, addr, len, dest);
                src.consumed(addr, len);
                chunks += 1;
            }
            Ready::Wait => std::thread::sleep(Duration::from_micros(100)),
            Ready::Anywhere => return chunks,
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "prefetch stalled: {:?}", src.remote_stats());
    }
}

fn assert_same(got: &[u8], want: &[u8], base: u64) {
    if let Some(i) = (0..want.len()).step_by(PAGE_SIZE).find(|&i| got[i..i + PAGE_SIZE] != want[i..i + PAGE_SIZE]) {
        panic!("page at {:#x} differs from the process's memory", base + i as u64);
    }
}

/// The whole region through the prefetch path, into a fresh buffer, checked against `want`.
/// Returns the number of chunks taken.
fn prefetch_all(src: &RemotePages, f: &Frozen, want: &[u8], on_chunk: impl FnMut(u64)) -> usize {
    let mut got = vec![0u8; f.len as usize];
    let chunks = drain_prefetch(src, f.region, &mut got, on_chunk);
    assert_same(&got, want, f.region);
    chunks
}

/// Waits (at most 3 s) until the server has no connection open.
fn wait_all_closed(server: &PageSourceServer) {
    let t0 = Instant::now();
    while server.stats().active_connections > 0 {
        assert!(t0.elapsed() < Duration::from_secs(3), "connections left open: {:?}", server.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_page_arrives_by_fault_and_by_prefetch() {
    let (_g, f, e, server) = stage(32, SourceServerOptions::default());
    let want = f.read_all();
    for p in [0, 1, 4095, 8191] {
        check_pattern(p, &want[(p * P) as usize..((p + 1) * P) as usize]);
    }

    let pull = |opts| connect(server.local_addr(), &e, &f, opts);

    // Fault path only: a bandwidth of 1 byte/s lets one background request through, no more.
    let faults = pull(PullOptions { bandwidth: Some(1), request_bytes: 64 << 10, ..PullOptions::default() });
    let mut got = vec![0u8; f.len as usize];
    let windows = f.len / (64 << 10);
    // A scattered order (a stride coprime to the window count), like faults of a running process.
    for k in 0..windows {
        let w = (k * 97) % windows;
        fetch(&faults, f.region, f.region + w * (64 << 10), 64 << 10, &mut got);
    }
    assert_same(&got, &want, f.region);
    // A partial page window in the middle of a page-aligned run, and a length that is not a page
    // multiple: the caller gets exactly what it asked for.
    let mut n = 0;
    assert!(faults.with_data(f.region + 3 * P, P + 100, &mut |d| n = d.len()).unwrap());
    assert_eq!(n, PAGE_SIZE + 100);
    // Outside the extents: nothing (and no request).
    assert!(!faults.with_data(f.region + f.len, P, &mut |_| panic!("no data outside")).unwrap());
    assert!(!faults.with_data(f.region - P, P, &mut |_| panic!("no data outside")).unwrap());
    assert_eq!(faults.data_extents(0, u64::MAX >> 1), vec![(f.region, f.len)]);
    let s = faults.remote_stats().unwrap();
    eprintln!("fault path: {}", support::remote_summary(&s));
    assert!(s.fault_requests >= windows - 1, "{s:?}");
    assert!(s.prefetch_pages <= 16, "the bucket let through more than one request: {s:?}");
    assert_eq!((s.state, s.reconnects), (RemoteState::Connected, 0));
    drop(faults);

    // Prefetch path: everything, in arrival order, through the arrived buffer.
    let pre = pull(PullOptions { request_bytes: 256 << 10, prefetch_bytes: 2 << 20, ..PullOptions::default() });
    let chunks = prefetch_all(&pre, &f, &want, |_| {});
    let s = pre.remote_stats().unwrap();
    assert_eq!(s.prefetch_pages, f.len / P, "{s:?}");
    assert_eq!((s.fault_requests, s.arrived_bytes, s.inflight_bytes, s.unrequested_bytes), (0, 0, 0, 0), "{s:?}");
    assert!(chunks >= (f.len / (256 << 10)) as usize);
    drop(pre);

    // The walk jumps to just after a fault, then wraps to what it skipped.
    let jump = pull(PullOptions { request_bytes: 64 << 10, prefetch_bytes: 256 << 10, ..PullOptions::default() });
    let fault_at = f.region + 20 * (1 << 20) + 5 * P;
    jump.faulted(fault_at);
    let mut order = Vec::new();
    prefetch_all(&jump, &f, &want, |a| order.push(a));
    let first_after = order.iter().position(|&a| a == fault_at + P).expect("a chunk right after the fault");
    assert!(first_after <= 5, "the walk did not jump: {:x?}", &order[..8]);
    assert!(order[first_after..].iter().any(|&a| a == f.region + (1 << 20)), "the walk did not wrap");
    drop(jump);

    // Dropping the last Arc closed its connections.
    wait_all_closed(&server);
    let st = server.stats();
    eprintln!("source: {st:?}");
    assert_eq!((st.connections, st.rejected, st.refused_requests), (6, 0, 0));
    server.shutdown();
}

/// Waits (at most 3 s) until the server reports `homed`: it records it right after writing its
/// OK, which the destination may read first.
fn wait_homed(server: &PageSourceServer) {
    let t0 = Instant::now();
    while !server.stats().homed {
        assert!(t0.elapsed() < Duration::from_secs(3), "the source never recorded HOMED: {:?}", server.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A raw pull connection (hello done) for sending hand-made records.
fn raw_conn(addr: SocketAddr, e: &Expected) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(&Hello::new(e.migration_id, e.token.clone()).encode()).unwrap();
    let mut r = [0u8; HELLO_REPLY_LEN];
    (&s).read_exact(&mut r).unwrap();
    assert_eq!(r, encode_hello_reply(HelloStatus::Ok));
    s
}

/// Sends `record`, expects a STATUS with `code`, then the end of the connection.
fn refused_with(addr: SocketAddr, e: &Expected, record: &[u8], code: u32) {
    let s = raw_conn(addr, e);
    (&s).write_all(record).unwrap();
    let mut buf = Vec::new();
    match wire::read_reply(&mut &s, &mut buf) {
        Ok(Reply::Status(st)) => assert_eq!(st.code, code, "{}", wire::status::describe(st.code)),
        other => panic!("expected STATUS {code}, got {other:?}"),
    }
    let mut rest = [0u8; 16];
    assert!(matches!((&s).read(&mut rest), Ok(0) | Err(_)), "the connection must end");
}

fn header(kind: u8, page_count: u32, vaddr: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0] = kind;
    b[4..8].copy_from_slice(&page_count.to_le_bytes());
    b[8..16].copy_from_slice(&vaddr.to_le_bytes());
    let hc = wire::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&hc.to_le_bytes());
    b
}

#[test]
fn strangers_and_requests_outside_the_extents_are_refused() {
    let (_g, f, e, server) = stage(4, SourceServerOptions { max_connections: 2, ..SourceServerOptions::default() });
    let addr = server.local_addr();
    let quick = PullOptions { connect_timeout: Duration::from_secs(2), ..PullOptions::default() };

    let wrong_token = RemotePages::connect(addr, e.migration_id, Token([0; 32]), f.extents(), quick.clone());
    match wrong_token {
        Err(PullError::Connect { detail, .. }) => assert!(detail.contains("wrong token"), "{detail}"),
        other => panic!("a wrong token must be refused: {:?}", other.map(|_| ())),
    }
    let wrong_id = RemotePages::connect(addr, MigrationId([0x22; 16]), e.token.clone(), f.extents(), quick.clone());
    match wrong_id {
        Err(PullError::Connect { detail, .. }) => assert!(detail.contains("no such migration"), "{detail}"),
        other => panic!("a wrong migration id must be refused: {:?}", other.map(|_| ())),
    }
    assert_eq!(server.stats().rejected, 2);
    assert_eq!(server.stats().connections, 0);
    // Misaligned extents never reach the wire.
    let bad = RangeSet::from_ranges([(f.region + 1, f.region + P)]);
    assert!(matches!(
        RemotePages::connect(addr, e.migration_id, e.token.clone(), bad, quick.clone()),
        Err(PullError::BadExtent { .. })
    ));

    let end = f.region + f.len;
    let req = |vaddr, pages| PageRequest::new(vaddr, pages).unwrap().encode();
    // Outside, straddling either end, far away.
    refused_with(addr, &e, &req(end, 1), wire::status::NOT_SERVED);
    refused_with(addr, &e, &req(end - P, 2), wire::status::NOT_SERVED);
    refused_with(addr, &e, &req(f.region - P, 2), wire::status::NOT_SERVED);
    refused_with(addr, &e, &req(0x1000, 1), wire::status::NOT_SERVED);
    // Malformed requests (header checksum correct).
    refused_with(addr, &e, &header(4, 1, f.region + 8), wire::status::BAD_RANGE);
    refused_with(addr, &e, &header(4, 0, f.region), wire::status::BAD_RANGE);
    refused_with(addr, &e, &header(4, 1025, f.region), wire::status::BAD_RANGE);
    refused_with(addr, &e, &header(1, 1, f.region), wire::status::UNEXPECTED_KIND);
    let mut flipped = req(f.region, 1);
    flipped[12] ^= 1;
    refused_with(addr, &e, &flipped, wire::status::HEADER_CHECKSUM);
    // A valid request after valid ones is still served, in order, on the same connection.
    let s = raw_conn(addr, &e);
    (&s).write_all(&[req(f.region, 2), req(end - P, 1)].concat()).unwrap();
    let want = f.read_all();
    let mut buf = Vec::new();
    assert_eq!(wire::read_reply(&mut &s, &mut buf).unwrap(), Reply::Response { vaddr: f.region, page_count: 2 });
    assert_eq!(buf[..], want[..2 * PAGE_SIZE]);
    assert_eq!(wire::read_reply(&mut &s, &mut buf).unwrap(), Reply::Response { vaddr: end - P, page_count: 1 });
    assert_eq!(buf[..], want[want.len() - PAGE_SIZE..]);
    // Busy: this connection and one more are all the server takes.
    let second = raw_conn(addr, &e);
    let third = TcpStream::connect(addr).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = [0u8; HELLO_REPLY_LEN];
    (&third).read_exact(&mut r).unwrap();
    assert_eq!(wire::decode_hello_reply(&r).map(|x| x.0), Some(HelloStatus::Busy));
    drop((s, second, third));

    let st = server.stats();
    eprintln!("source: {st:?}");
    assert_eq!(st.refused_requests, 9, "{st:?}");
    assert_eq!(st.requests, 2);
    assert_eq!(st.rejected, 3);
    server.shutdown();
}

/// confirm_home against a live source: Ok, and the source says homed (and stays so). The raw
/// exchange: HOMED after a REQUEST is answered with the OK STATUS carrying what the connection
/// served, then the connection ends.
#[test]
fn confirm_home_tells_the_source() {
    let (_g, f, e, server) = stage(4, SourceServerOptions::default());
    let want = f.read_all();
    let src = connect(server.local_addr(), &e, &f, PullOptions { request_bytes: 64 << 10, ..PullOptions::default() });
    let mut got = vec![0u8; f.len as usize];
    fetch(&src, f.region, f.region, 64 << 10, &mut got);
    assert_same(&got[..64 << 10], &want[..64 << 10], f.region);
    assert!(!server.stats().homed);
    let t0 = Instant::now();
    src.confirm_home().unwrap();
    let took = t0.elapsed();
    wait_homed(&server);
    eprintln!("confirm_home against a live source: {:.2} ms", took.as_secs_f64() * 1e3);
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Through the trait too (what the lazy thread calls), on a fresh connection: the source
    // closed the one the first HOMED went on.
    LazySource::confirm_home(&*src).unwrap();
    let s = src.remote_stats().unwrap();
    assert_eq!(s.state, RemoteState::Connected, "{s:?}");
    drop(src);
    wait_all_closed(&server);
    assert!(server.stats().homed, "homed stays true after the destination is gone");

    let s = raw_conn(server.local_addr(), &e);
    let req = PageRequest::new(f.region + P, 2).unwrap();
    (&s).write_all(&[&req.encode()[..], &wire::encode_homed()[..]].concat()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(wire::read_reply(&mut &s, &mut buf).unwrap(), Reply::Response { vaddr: f.region + P, page_count: 2 });
    assert_eq!(buf[..], want[PAGE_SIZE..3 * PAGE_SIZE]);
    let st = Status { code: wire::status::OK, totals: EndTotals { data_pages: 2, records: 1, ..EndTotals::default() } };
    assert_eq!(wire::read_reply(&mut &s, &mut buf).unwrap(), Reply::Status(st));
    let mut rest = [0u8; 16];
    assert!(matches!((&s).read(&mut rest), Ok(0) | Err(_)), "the connection must end");
    let st = server.shutdown();
    eprintln!("source: {st:?}");
    assert!(st.homed && st.refused_requests == 0, "{st:?}");
}

/// Small requests, and a pull that gives up after 1 s of continuous failure (500 ms connects).
fn gives_up_after_a_second() -> PullOptions {
    PullOptions {
        connect_timeout: Duration::from_millis(500),
        give_up_after: Duration::from_secs(1),
        request_bytes: 64 << 10,
        prefetch_bytes: 256 << 10,
        ..PullOptions::default()
    }
}

/// confirm_home with the source gone: retried as a fault would be, then Err after give_up_after
/// (the lazy thread kills the copy); the source never recorded it.
#[test]
fn confirm_home_fails_after_give_up_when_the_source_is_gone() {
    let (_g, f, e, server) = stage(4, SourceServerOptions::default());
    let opts = gives_up_after_a_second();
    let src = connect(server.local_addr(), &e, &f, opts);
    assert!(src.with_data(f.region, P, &mut |_| {}).unwrap());
    let st = server.shutdown();
    assert!(!st.homed, "{st:?}");
    let t0 = Instant::now();
    let err = src.confirm_home().expect_err("the source is gone");
    let took = t0.elapsed();
    eprintln!("confirm_home, source gone: error after {:.2} s: {err}", took.as_secs_f64());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
    assert!(err.detail.contains("every page is home"), "{err}");
    let s = src.remote_stats().unwrap();
    assert_eq!(s.state, RemoteState::Failed, "{s:?}");
    // Failed for good: the next attempt answers at once.
    let t0 = Instant::now();
    assert!(src.confirm_home().is_err());
    assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
}

/// idle_ms: counts from the start while nobody connected, None while a pull connection is open,
/// counts again from when the last one closed; a refused connection does not reset it.
#[test]
fn idle_ms_counts_from_the_last_pull_connection() {
    let (_g, f, e, server) = stage(4, SourceServerOptions::default());
    std::thread::sleep(Duration::from_millis(150));
    let s0 = server.stats();
    assert!(s0.idle_ms.is_some_and(|ms| ms >= 100), "idle since the start: {s0:?}");
    assert!(!s0.homed);
    let src = connect(server.local_addr(), &e, &f, PullOptions::default());
    assert!(src.with_data(f.region, P, &mut |_| {}).unwrap());
    std::thread::sleep(Duration::from_millis(150));
    let s1 = server.stats();
    assert_eq!(s1.idle_ms, None, "connected: {s1:?}");
    drop(src);
    wait_all_closed(&server);
    // The clock is read under the same lock the connection threads update: once no connection
    // is open it reads Some.
    let t_closed = Instant::now();
    let a = server.stats().idle_ms.expect("no connection open");
    assert!(a < 2000, "{a} ms right after the close");
    std::thread::sleep(Duration::from_millis(300));
    // A stranger is refused and does not move the clock.
    let bad = RemotePages::connect(
        server.local_addr(),
        e.migration_id,
        Token([0; 32]),
        f.extents(),
        PullOptions { connect_timeout: Duration::from_secs(2), ..PullOptions::default() },
    );
    assert!(bad.is_err());
    wait_all_closed(&server);
    let b = server.stats().idle_ms.expect("no connection open");
    eprintln!("idle after the close: {a} ms, then {b} ms ({:?} later)", t_closed.elapsed());
    assert!(b >= a + 250, "idle_ms must keep growing: {a} then {b}");
    assert!(b < 5000, "{b}");
    assert!(!server.stats().homed);
    server.shutdown();
}

/// A HOMED on a push stream (the destination's PageServer) is refused like a REQUEST.
#[test]
fn homed_on_a_push_stream_is_refused() {
    let _g = serial();
    let e = expected();
    let srv = PageServer::bind(lo(), e.clone()).unwrap();
    let s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(&Hello::new(e.migration_id, e.token.clone()).encode()).unwrap();
    let mut r = [0u8; HELLO_REPLY_LEN];
    (&s).read_exact(&mut r).unwrap();
    assert_eq!(r, encode_hello_reply(HelloStatus::Ok));
    (&s).write_all(&wire::encode_homed()).unwrap();
    let st = Status::read_from(&mut &s).expect("a STATUS before the close");
    assert_eq!(st.code, wire::status::UNEXPECTED_KIND, "{}", wire::status::describe(st.code));
    match srv.wait(Duration::from_secs(10)) {
        Err(ServeError::StreamFailed { error: RecordError::UnexpectedKind(Kind::Homed), .. }) => {}
        other => panic!("expected the stream to fail on HOMED, got {:?}", other.map(|_| ())),
    }
    assert!(srv.take_store().is_empty());
}

/// A TCP proxy that can drop every connection and refuse new ones.
struct Proxy {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(lo()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let blocked = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (b, s, v) = (blocked.clone(), stop.clone(), socks.clone());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                if b.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(upstream) else { continue };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                v.lock().unwrap().extend([client.try_clone().unwrap(), up.try_clone().unwrap()]);
                let pump = |from: TcpStream, to: TcpStream| {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 << 10];
                        loop {
                            match (&from).read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if (&to).write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    })
                };
                pump(client.try_clone().unwrap(), up.try_clone().unwrap());
                pump(up, client);
            }
        });
        Proxy { addr, blocked, stop, socks, accept: Some(accept) }
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn allow(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_cut_connection_is_recovered_without_losing_a_page() {
    let (_g, f, e, server) = stage(32, SourceServerOptions::default());
    let want = f.read_all();
    let proxy = Arc::new(Proxy::start(server.local_addr()));
    let opts = PullOptions {
        connect_timeout: Duration::from_secs(1),
        io_timeout: Duration::from_secs(5),
        give_up_after: Duration::from_secs(20),
        request_bytes: 256 << 10,
        prefetch_bytes: 1 << 20,
        bandwidth: None,
    };
    let src = connect(proxy.addr, &e, &f, opts);
    let mut got = vec![0u8; f.len as usize];
    fetch(&src, f.region, f.region + (8 << 20), 64 << 10, &mut got);
    // Let the background fill its window, and take one chunk so it has requests in flight.
    std::thread::sleep(Duration::from_millis(100));

    proxy.cut();
    let cut_at = Instant::now();
    let p2 = proxy.clone();
    let healer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        p2.allow();
    });
    // A fault during the cut: blocks, then completes with the right data.
    let far = f.region + (30 << 20);
    fetch(&src, f.region, far, 64 << 10, &mut got);
    let waited = cut_at.elapsed();
    assert!(waited >= Duration::from_millis(1900), "with_data returned during the cut ({waited:?})");
    assert!(waited < Duration::from_secs(5), "with_data took {waited:?} after a 2 s cut");
    let off = (far - f.region) as usize;
    assert_same(&got[off..off + (64 << 10)], &want[off..off + (64 << 10)], far);
    healer.join().unwrap();

    // Everything else, through the prefetch path (its connection was cut too).
    drain_prefetch(&src, f.region, &mut got, |_| {});
    // What the prefetch skipped because the faults fetched it: fetch it the way the lazy thread
    // would (its pending pages), then compare everything.
    fetch(&src, f.region, f.region + (8 << 20), 64 << 10, &mut got);
    assert_same(&got, &want, f.region);
    let s = src.remote_stats().unwrap();
    eprintln!(
        "after a 2 s cut: waited {:.2} s; reconnects {}, disconnected {:.2} s, state {:?}, last error {:?}",
        waited.as_secs_f64(),
        s.reconnects,
        s.disconnected_ns as f64 / 1e9,
        s.state,
        s.last_error
    );
    assert!(s.reconnects >= 1, "{s:?}");
    assert!(s.disconnected_ns >= 1_900_000_000, "{s:?}");
    assert_eq!(s.state, RemoteState::Connected, "{s:?}");
    drop(src);
    drop(proxy);
    server.shutdown();
}

/// confirm_home through a cut connection: it reconnects like a fault does and gets its OK once
/// the source is reachable again.
#[test]
fn confirm_home_waits_out_a_cut() {
    let (_g, f, e, server) = stage(4, SourceServerOptions::default());
    let proxy = Arc::new(Proxy::start(server.local_addr()));
    let opts = PullOptions {
        connect_timeout: Duration::from_secs(1),
        io_timeout: Duration::from_secs(5),
        give_up_after: Duration::from_secs(20),
        ..PullOptions::default()
    };
    let src = connect(proxy.addr, &e, &f, opts);
    assert!(src.with_data(f.region, P, &mut |_| {}).unwrap());
    proxy.cut();
    let cut_at = Instant::now();
    let p2 = proxy.clone();
    let healer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        p2.allow();
    });
    src.confirm_home().unwrap();
    let waited = cut_at.elapsed();
    healer.join().unwrap();
    wait_homed(&server);
    let s = src.remote_stats().unwrap();
    eprintln!("confirm_home through a 1 s cut: {:.2} s, {} reconnects", waited.as_secs_f64(), s.reconnects);
    assert!(waited >= Duration::from_millis(900), "confirmed during the cut ({waited:?})");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(s.reconnects >= 1, "{s:?}");
    drop(src);
    drop(proxy);
    assert!(server.shutdown().homed);
}

#[test]
fn a_source_gone_for_good_is_a_loud_error() {
    let (_g, f, e, server) = stage(4, SourceServerOptions::default());
    let opts = gives_up_after_a_second();
    let src = connect(server.local_addr(), &e, &f, opts);
    assert!(src.with_data(f.region, P, &mut |_| {}).unwrap());
    server.shutdown();
    let t0 = Instant::now();
    let r = src.with_data(f.region + f.len - P, P, &mut |_| panic!("no data from a dead source"));
    let took = t0.elapsed();
    let err = r.expect_err("the source is gone");
    eprintln!("source gone: error after {:.2} s: {err}", took.as_secs_f64());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    let s = src.remote_stats().unwrap();
    assert_eq!(s.state, RemoteState::Failed, "{s:?}");
    assert!(s.last_error.is_some());
    // Everything after is an error at once, and the fill is told to go on (to meet the error).
    let t0 = Instant::now();
    assert!(src.with_data(f.region + P, P, &mut |_| {}).is_err());
    assert!(t0.elapsed() < Duration::from_millis(500), "{:?}", t0.elapsed());
    assert_eq!(src.next_ready(), Ready::Anywhere);
}

#[test]
fn background_pull_throughput_against_plain_tcp() {
    let _g = serial();
    let f = Frozen::start(256);
    let mut opts = PullOptions::default();
    if let Some(v) = std::env::var("PULL_REQUEST_KIB").ok().and_then(|v| v.parse::<u64>().ok()) {
        opts.request_bytes = v << 10;
    }
    if let Some(v) = std::env::var("PULL_PREFETCH_MIB").ok().and_then(|v| v.parse::<u64>().ok()) {
        opts.prefetch_bytes = v << 20;
    }
    let r = loopback_pull_throughput(f.pid(), f.extents(), opts).unwrap();
    eprintln!(
        "background pull of {} MiB over loopback: {:.0} MiB/s ({:.3} s); plain TCP copy of the same bytes: {:.0} MiB/s ({:.3} s); {:?}",
        r.bytes >> 20,
        r.pull_mib_per_sec,
        r.pull_secs,
        r.plain_tcp_mib_per_sec,
        r.plain_tcp_secs,
        r.remote
    );
    assert_eq!(r.bytes, 256 << 20);
    assert!(r.remote.is_some_and(|s| s.prefetch_pages == 256 * 256 && s.fault_requests == 0));
}

/// Copies of a dead process's pages, mapped at their own addresses in this test process, so that
/// a PageSourceServer serving THIS process stands in for the frozen original (whose pid the
/// restored process needs: both cannot exist at once in one pid namespace).
struct Stand {
    ranges: Vec<(u64, u64)>,
}

impl Stand {
    /// None when one of the addresses is taken in this process (then the test cannot run here).
    fn copy_from(pid: Pid, ranges: &[(u64, u64)]) -> Option<Stand> {
        let mut stand = Stand { ranges: Vec::new() };
        for &(s, e) in ranges {
            let len = (e - s) as usize;
            // SAFETY: a fresh private anonymous mapping at an address nothing of ours uses
            // (MAP_FIXED_NOREPLACE fails instead of replacing anything).
            let p = unsafe {
                libc::mmap(
                    s as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED || p as u64 != s {
                return None;
            }
            stand.ranges.push((s, e));
            let data = tern_core::remote::read_memory(pid, s, len).unwrap();
            // SAFETY: [s, e) was just mapped read-write for us, `data` has exactly `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), s as *mut u8, len) };
        }
        Some(stand)
    }
}

impl Drop for Stand {
    fn drop(&mut self) {
        for &(s, e) in &self.ranges {
            // SAFETY: unmapping exactly the ranges this Stand mapped.
            unsafe { libc::munmap(s as *mut libc::c_void, (e - s) as usize) };
        }
    }
}

/// The whole thing with the real lazy thread: a process restored with its private anonymous
/// pages left on the "source" runs on pages pulled over TCP (faults + background), then changes
/// its memory (MADV_DONTNEED, munmap, mremap) before they are all home and verifies every page,
/// before and after homing.
#[test]
fn a_restored_process_runs_on_pulled_pages() {
    use tern_core::dump::{PagePolicy, SourceSession};
    use tern_core::files::RecreateOptions;
    use tern_core::pages::PageStore;
    use tern_core::restore::{self, LazyState};
    let _g = serial();
    let dir = support::scratch_dir("pull");
    let status = dir.join("e2e.status");
    let trigger = dir.join("e2e.go");
    let _ = std::fs::remove_file(&trigger);
    let _ = std::fs::remove_file(dir.join("e2e.go.2"));
    let (proc, _) = start_fixture(&status, &trigger, 64);
    let pid = Pid::new(proc.pid).unwrap();

    let session = SourceSession::freeze(pid).unwrap();
    let mut store = PageStore::new();
    let (image, stats) = session.dump_with(&mut store, PagePolicy::LeaveOnSource).unwrap();
    let remote = RangeSet::from_ranges(image.mm.remote_pages.iter().copied());
    assert!(remote.pages() >= 64 * 256, "{} pages left on the source", remote.pages());
    let Some(stand) = Stand::copy_from(pid, &image.mm.remote_pages) else {
        session.abort().unwrap();
        eprintln!("SKIPPED: an address of the fixture is taken in the test process");
        return;
    };
    session.commit().unwrap();
    // SAFETY: reaping our own child by pid.
    unsafe { libc::waitpid(proc.pid, std::ptr::null_mut(), 0) };

    let e = expected();
    let me = Pid::new(std::process::id() as i32).unwrap();
    let server = PageSourceServer::bind(lo(), e.clone(), me, remote.clone(), SourceServerOptions::default()).unwrap();
    let pull = RemotePages::connect(
        server.local_addr(),
        e.migration_id,
        e.token.clone(),
        remote,
        PullOptions { bandwidth: Some(200 << 20), ..PullOptions::default() },
    )
    .unwrap();
    let (restored, handle) =
        restore::restore_with_files_remote(&image, Arc::new(store), Some(pull), &RecreateOptions::default(), true).unwrap();
    let handle = handle.expect("lazy memory");
    assert_eq!(restored.pid.as_raw(), proc.pid);
    std::fs::write(&trigger, b"").unwrap();
    support::wait_for_status(&status, phase("changed"), "the fixture to change and verify its memory", Duration::from_secs(60));
    let ls = handle.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(ls.state, LazyState::Homed);
    // The lazy thread told the source before it reported Homed.
    wait_homed(&server);
    let rs = ls.remote.clone().expect("remote stats");
    eprintln!("restored on pulled pages ({} left on the source): {}", stats.remote_pages, support::lazy_summary(&ls));
    assert!(rs.fault_requests + rs.prefetch_pages > 0, "{rs:?}");
    std::fs::write(dir.join("e2e.go.2"), b"").unwrap();
    support::wait_for_status(&status, phase("verified"), "the fixture to verify after homing", Duration::from_secs(60));
    // The lazy thread dropped its source: both connections are closed.
    wait_all_closed(&server);
    let st = server.shutdown();
    assert!(st.homed && st.idle_ms.is_some(), "{st:?}");
    drop(stand);
}

/// Pages process_vm_readv cannot read (PROT_NONE) come through /proc/PID/mem; pages never touched
/// read as zeros. Served from this test process's own memory (it is the "source" here).
#[test]
fn unreadable_and_untouched_pages_are_served() {
    let _g = serial();
    let len = 8 * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(base, libc::MAP_FAILED);
    let b = base as u64;
    // Pages 0..4 written, 4..8 never touched; page 2 then made PROT_NONE.
    // SAFETY: [base, base + 4 pages) is ours and writable.
    unsafe { std::ptr::write_bytes(base as *mut u8, 0xa5, 4 * PAGE_SIZE) };
    // SAFETY: changing the protection of a page of our own mapping, which nothing reads meanwhile.
    assert_eq!(unsafe { libc::mprotect((b + 2 * P) as *mut libc::c_void, PAGE_SIZE, libc::PROT_NONE) }, 0);
    let e = expected();
    let me = Pid::new(std::process::id() as i32).unwrap();
    let extents = RangeSet::from_ranges([(b, b + len as u64)]);
    let server = PageSourceServer::bind(lo(), e.clone(), me, extents.clone(), SourceServerOptions::default()).unwrap();
    let src = RemotePages::connect(server.local_addr(), e.migration_id, e.token.clone(), extents, PullOptions::default()).unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < 8 * P {
        let at = b + got.len() as u64;
        assert!(src.with_data(at, 8 * P - got.len() as u64, &mut |d| got.extend_from_slice(d)).unwrap());
    }
    assert!(got[..4 * PAGE_SIZE].iter().all(|&x| x == 0xa5), "written pages, the PROT_NONE one included");
    assert!(got[4 * PAGE_SIZE..].iter().all(|&x| x == 0), "untouched pages read as zeros");
    drop(src);
    server.shutdown();
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(base, len) };
}

/// `bandwidth` paces the background pull; faults go at once.
#[test]
fn bandwidth_limits_the_background_only() {
    let (_g, f, e, server) = stage(8, SourceServerOptions::default());
    let want = f.read_all();
    let rate = 16u64 << 20;
    let src = connect(
        server.local_addr(),
        &e,
        &f,
        PullOptions { bandwidth: Some(rate), request_bytes: 256 << 10, ..PullOptions::default() },
    );
    let t0 = Instant::now();
    // A fault at the far end while the background is being paced.
    let mut fault_took = Duration::ZERO;
    let mut got = vec![0u8; f.len as usize];
    let far = f.region + f.len - (64 << 10);
    std::thread::sleep(Duration::from_millis(50));
    let t1 = Instant::now();
    assert!(src
        .with_data(far, 64 << 10, &mut |d| {
            fault_took = t1.elapsed();
            got[(far - f.region) as usize..][..d.len()].copy_from_slice(d);
        })
        .unwrap());
    drain_prefetch(&src, f.region, &mut got, |_| {});
    let took = t0.elapsed();
    assert_same(&got, &want, f.region);
    let s = src.remote_stats().unwrap();
    let bytes = s.prefetch_pages * P;
    let expect = Duration::from_secs_f64(bytes as f64 / rate as f64);
    eprintln!(
        "background {} KiB at {} MiB/s: {:.3} s (ideal {:.3} s); a fault meanwhile: {:.0} µs",
        bytes >> 10,
        rate >> 20,
        took.as_secs_f64(),
        expect.as_secs_f64(),
        fault_took.as_secs_f64() * 1e6
    );
    assert!(took >= expect.mul_f64(0.8), "the background was not paced: {took:?} for {bytes} bytes");
    assert!(took <= expect.mul_f64(1.5) + Duration::from_millis(300), "paced too much: {took:?}");
    assert!(fault_took < Duration::from_millis(100), "a fault waited for the bucket: {fault_took:?}");
    drop(src);
    server.shutdown();
}
