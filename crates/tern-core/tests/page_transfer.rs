//! Page streams over loopback: PageSender → PageServer, and raw clients that speak the protocol
//! badly on purpose.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tern_core::pages::bench::patterned;
use tern_core::pages::sender::ConnectError;
use tern_core::pages::wire::{
    self, crc32c, decode_hello_reply, roll, EndTotals, Hello, HelloStatus, Kind, RecordError,
    RecordHeader, Status, HELLO_REPLY_LEN,
};
use tern_core::pages::{
    Expected, MigrationId, PageRun, PageSender, PageServer, PageSink, PageStore, SendError,
    SenderOptions, ServeError, Token, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE as u64;
const MIB: usize = 1 << 20;

fn lo() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn server() -> (PageServer, MigrationId, Token) {
    let id = MigrationId::from_hex("0123456789abcdef0123456789abcdef").unwrap();
    let token = Token::generate().unwrap();
    let s = PageServer::bind(
        lo(),
        Expected {
            migration_id: id,
            token: token.clone(),
        },
    )
    .unwrap();
    assert_ne!(s.port(), 0);
    (s, id, token)
}

/// Concatenates the store's content over [start, end) with zero runs expanded; None for holes.
fn content(store: &PageStore, start: u64, end: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut at = start;
    for (s, run) in store.range(start, end) {
        if s != at {
            return None;
        }
        match run {
            PageRun::Data(d) => out.extend_from_slice(d),
            PageRun::Zero { count } => out.resize(out.len() + (count * P) as usize, 0),
        }
        at = s + run.pages() * P;
    }
    (at == end).then_some(out)
}

#[test]
fn streams_256_mib_byte_identical() {
    let (srv, id, token) = server();
    // Region A: 128 MiB in 1 MiB puts (zero-copy path), then a zero run.
    // Region B: 120 MiB in 8 MiB puts, with every 16th 4 MiB chunk replaced by a zero run, then
    // 8 MiB in single-page puts with every 7th page a zero page (buffered, merging path).
    let a_start = 0x5555_0000_0000u64;
    let a = patterned(128 * MIB, 0xa);
    let b_start = 0x7f00_0000_0000u64;
    let mut b = patterned(128 * MIB, 0xb);
    let a_zero_pages = 10_000u64;
    let opts = SenderOptions::default();
    let mut tx = PageSender::connect(srv.local_addr(), id, token, opts).unwrap();
    for (i, c) in a.chunks(MIB).enumerate() {
        tx.put_pages(a_start + (i * MIB) as u64, c).unwrap();
    }
    let a_end = a_start + a.len() as u64;
    tx.put_zero_pages(a_end, a_zero_pages).unwrap();
    let mut zero_expected = a_zero_pages;
    for (i, c) in b[..120 * MIB].chunks_mut(4 * MIB).enumerate() {
        if i % 16 == 3 {
            c.fill(0);
        }
    }
    for (i, c) in b[..120 * MIB].chunks(8 * MIB).enumerate() {
        let at = b_start + (i * 8 * MIB) as u64;
        // Split around zeroed 4 MiB halves.
        for (j, h) in c.chunks(4 * MIB).enumerate() {
            let hat = at + (j * 4 * MIB) as u64;
            if h.iter().all(|&x| x == 0) {
                tx.put_zero_pages(hat, (h.len() / PAGE_SIZE) as u64)
                    .unwrap();
                zero_expected += (h.len() / PAGE_SIZE) as u64;
            } else {
                tx.put_pages(hat, h).unwrap();
            }
        }
    }
    for (k, pg) in b[120 * MIB..].chunks_mut(PAGE_SIZE).enumerate() {
        let at = b_start + (120 * MIB + k * PAGE_SIZE) as u64;
        if k % 7 == 0 {
            pg.fill(0);
            tx.put_zero_pages(at, 1).unwrap();
            zero_expected += 1;
        } else {
            tx.put_pages(at, pg).unwrap();
        }
    }
    let sent = tx.finish().unwrap();
    let (store, got) = srv.wait(Duration::from_secs(60)).unwrap();
    println!("sender {sent:?}\nserver {got:?}\nstore {:?}", store.stats());
    assert_eq!(sent.data_pages, got.data_pages);
    assert_eq!(sent.zero_pages, got.zero_pages);
    assert_eq!(sent.records, got.records);
    assert_eq!(sent.wire_bytes, got.wire_bytes);
    assert_eq!(sent.zero_pages, zero_expected);
    assert_eq!(store.stats().zero_pages, zero_expected);
    assert_eq!(
        store.stats().data_pages + zero_expected,
        (256 * MIB) as u64 / P + a_zero_pages
    );
    // Buffered single-page puts were merged into few records (not one per page).
    assert!(sent.records < 3_000, "{} records", sent.records);

    let got_a = content(&store, a_start, a_end).expect("region A complete");
    assert!(got_a == a, "region A differs");
    assert!(content(&store, a_end, a_end + a_zero_pages * P)
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    let got_b = content(&store, b_start, b_start + b.len() as u64).expect("region B complete");
    assert!(got_b == b, "region B differs");
    assert!(store.get(a_start - P).is_none());
    // ~32 MiB runs, plus two per data/zero alternation of the single-page section (2048/7 zeros).
    assert!(store.stats().runs < 700, "runs {}", store.stats().runs);
}

fn raw_connect(addr: SocketAddr, hello: &[u8]) -> (TcpStream, Option<HelloStatus>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(hello).unwrap();
    let mut r = [0u8; HELLO_REPLY_LEN];
    let st = match s.read_exact(&mut r) {
        Ok(()) => decode_hello_reply(&r).map(|x| x.0),
        Err(_) => None,
    };
    (s, st)
}

#[test]
fn wrong_token_or_magic_is_refused_and_does_not_disturb_the_real_stream() {
    let (srv, id, token) = server();
    let mut wrong = token.clone();
    wrong.0[0] ^= 0xff;
    // The legitimate stream starts first and stays open across the strangers' attempts.
    let mut tx =
        PageSender::connect(srv.local_addr(), id, token.clone(), Default::default()).unwrap();
    tx.put_pages(0x1000, &patterned(64 * PAGE_SIZE, 3)).unwrap();
    tx.flush().unwrap();

    let err =
        PageSender::connect(srv.local_addr(), id, wrong.clone(), Default::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                status: HelloStatus::BadToken,
                ..
            }
        ),
        "{err}"
    );
    println!("{err}");
    let other = MigrationId([1; 16]);
    let err = PageSender::connect(srv.local_addr(), other, token.clone(), Default::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Refused {
                status: HelloStatus::UnknownMigration,
                ..
            }
        ),
        "{err}"
    );
    let mut bad = Hello::new(id, token.clone()).encode();
    bad[..8].copy_from_slice(b"GET / HT");
    assert_eq!(
        raw_connect(srv.local_addr(), &bad).1,
        Some(HelloStatus::BadMagic)
    );
    let mut bad = Hello::new(id, token.clone()).encode();
    bad[8] = 9;
    assert_eq!(
        raw_connect(srv.local_addr(), &bad).1,
        Some(HelloStatus::UnsupportedVersion)
    );
    // A wrong-token client that sends records anyway: nothing is read from it.
    let (mut s, st) = raw_connect(srv.local_addr(), &Hello::new(id, wrong).encode());
    assert_eq!(st, Some(HelloStatus::BadToken));
    let _ = s.write_all(&[0u8; 4096]);
    // A client that never finishes its hello does not block anything either.
    let _idle = TcpStream::connect(srv.local_addr()).unwrap();

    tx.put_zero_pages(0x100000, 5).unwrap();
    let stats = tx.finish().unwrap();
    let (store, _) = srv.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(stats.data_pages, 64);
    assert_eq!(store.stats().data_pages, 64);
    assert_eq!(store.stats().zero_pages, 5);
    let p = srv.progress();
    println!("{}", serde_json::to_string(&p).unwrap());
    assert_eq!(p.connections_accepted, 1);
    assert!(p.connections_rejected >= 5);
    assert_eq!(p.streams_completed, 1);
    assert_eq!(p.streams_failed, 0);
}

#[test]
fn wrong_token_alone_stores_nothing() {
    let (srv, id, _token) = server();
    let err = PageSender::connect(
        srv.local_addr(),
        id,
        Token::generate().unwrap(),
        Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("wrong token"), "{err}");
    assert!(matches!(
        srv.wait(Duration::from_millis(300)),
        Err(ServeError::Timeout(_))
    ));
    assert!(srv.take_store().is_empty());
}

/// A raw source that speaks the protocol: records are built by hand so tests can damage them.
struct Raw {
    s: TcpStream,
    totals: EndTotals,
}

impl Raw {
    fn connect(addr: SocketAddr, id: MigrationId, token: Token) -> Raw {
        let hello = Hello::new(id, token).encode();
        let (s, st) = raw_connect(addr, &hello);
        assert_eq!(st, Some(HelloStatus::Ok));
        Raw {
            s,
            totals: EndTotals {
                stream_crc: crc32c(&hello),
                ..Default::default()
            },
        }
    }
    /// Writes a DATA record; `damage` may alter the payload after its checksum was computed.
    fn data(&mut self, vaddr: u64, payload: &[u8], damage: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let h = RecordHeader {
            kind: Kind::Data,
            page_count: (payload.len() / PAGE_SIZE) as u32,
            vaddr,
            payload_crc: crc32c(payload),
        }
        .encode();
        self.totals.stream_crc = roll(self.totals.stream_crc, &h);
        self.totals.records += 1;
        self.totals.data_pages += (payload.len() / PAGE_SIZE) as u64;
        let mut rec = h.to_vec();
        let mut p = payload.to_vec();
        damage(&mut p);
        rec.extend_from_slice(&p);
        rec
    }
    fn end(&self) -> Vec<u8> {
        self.totals.encode_record()
    }
    fn status(&mut self) -> Option<Status> {
        Status::read_from(&mut self.s).ok()
    }
}

#[test]
fn corrupted_payload_byte_discards_the_whole_stream() {
    let (srv, id, token) = server();
    let mut raw = Raw::connect(srv.local_addr(), id, token);
    let good = raw.data(0x10000, &patterned(16 * PAGE_SIZE, 5), |_| {});
    let bad = raw.data(0x40000, &patterned(16 * PAGE_SIZE, 6), |p| {
        p[5 * PAGE_SIZE + 17] ^= 0x04
    });
    let end = raw.end();
    raw.s.write_all(&good).unwrap();
    raw.s.write_all(&bad).unwrap();
    let _ = raw.s.write_all(&end);
    let err = srv.wait(Duration::from_secs(10)).unwrap_err();
    println!("{err}: {}", std::error::Error::source(&err).unwrap());
    match &err {
        ServeError::StreamFailed {
            error: RecordError::PayloadChecksum { vaddr: 0x40000, .. },
            ..
        } => {}
        other => panic!("unexpected {other:?}"),
    }
    let st = raw.status().expect("a STATUS before the close");
    assert_eq!(st.code, wire::status::PAYLOAD_CHECKSUM);
    // The good record before it was not applied either.
    assert!(srv.take_store().is_empty());
    assert_eq!(srv.progress().streams_failed, 1);
}

#[test]
fn truncated_stream_is_discarded() {
    let (srv, id, token) = server();
    let mut raw = Raw::connect(srv.local_addr(), id, token);
    let good = raw.data(0x10000, &patterned(8 * PAGE_SIZE, 7), |_| {});
    let second = raw.data(0x20000, &patterned(8 * PAGE_SIZE, 8), |_| {});
    raw.s.write_all(&good).unwrap();
    raw.s.write_all(&second[..second.len() / 2]).unwrap();
    raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    let err = srv.wait(Duration::from_secs(10)).unwrap_err();
    println!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(matches!(
        err,
        ServeError::StreamFailed {
            error: RecordError::Truncated {
                part: "payload",
                ..
            },
            ..
        }
    ));
    assert_eq!(raw.status().map(|s| s.code), Some(wire::status::TRUNCATED));
    assert!(srv.take_store().is_empty());
}

#[test]
fn end_totals_mismatch_is_discarded_and_reported_to_the_sender() {
    let (srv, id, token) = server();
    let mut raw = Raw::connect(srv.local_addr(), id, token);
    let rec = raw.data(0x10000, &patterned(PAGE_SIZE, 9), |_| {});
    raw.totals.data_pages += 1; // claims one page more than sent
    let end = raw.end();
    raw.s.write_all(&rec).unwrap();
    raw.s.write_all(&end).unwrap();
    let err = srv.wait(Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(
            err,
            ServeError::StreamFailed {
                error: RecordError::EndMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        raw.status().map(|s| s.code),
        Some(wire::status::END_MISMATCH)
    );
    assert!(srv.take_store().is_empty());
}

#[test]
fn bandwidth_limit_is_honoured() {
    let (srv, id, token) = server();
    let limit = 50_000_000u64;
    let opts = SenderOptions {
        bandwidth_limit_bytes_per_sec: Some(limit),
        ..Default::default()
    };
    let data = patterned(48 * MIB, 10);
    let t0 = Instant::now();
    let mut tx = PageSender::connect(srv.local_addr(), id, token, opts).unwrap();
    for (i, c) in data.chunks(2 * MIB).enumerate() {
        tx.put_pages(0x1000_0000 + (i * 2 * MIB) as u64, c).unwrap();
    }
    let stats = tx.finish().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let rate = stats.wire_bytes as f64 / secs;
    println!(
        "limited: {:.1} MB/s over {secs:.2} s ({})",
        rate / 1e6,
        serde_json::to_string(&stats).unwrap()
    );
    assert!(rate < limit as f64 * 1.15, "too fast: {rate}");
    assert!(rate > limit as f64 * 0.5, "too slow: {rate}");
    let (store, _) = srv.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(store.stats().bytes, data.len() as u64);
}

#[test]
fn later_streams_merge_into_the_same_store() {
    let (srv, id, token) = server();
    // Round 1: pages 0..8 = 1, round 2: pages 4..6 = 2 and page 7 zero.
    let mut tx =
        PageSender::connect(srv.local_addr(), id, token.clone(), Default::default()).unwrap();
    tx.put_pages(0x1000, &vec![1u8; 8 * PAGE_SIZE]).unwrap();
    tx.finish().unwrap();
    srv.wait_stream(Duration::from_secs(10)).unwrap();
    let mut tx = PageSender::connect(srv.local_addr(), id, token, Default::default()).unwrap();
    tx.put_pages(0x1000 + 4 * P, &vec![2u8; 2 * PAGE_SIZE])
        .unwrap();
    tx.put_zero_pages(0x1000 + 7 * P, 1).unwrap();
    tx.finish().unwrap();
    srv.wait_stream(Duration::from_secs(10)).unwrap();
    let store = srv.take_store();
    let c = content(&store, 0x1000, 0x1000 + 8 * P).unwrap();
    let tags: Vec<u8> = c.chunks(PAGE_SIZE).map(|p| p[0]).collect();
    assert_eq!(tags, vec![1, 1, 1, 1, 2, 2, 1, 0]);
}

#[test]
fn shutdown_breaks_an_active_stream_and_joins() {
    let (srv, id, token) = server();
    // A bounded wait for the STATUS: whichever way the broken stream shows itself (reset, EOF or
    // no answer), the sender must report an error, and the test must not sit on the default 60 s.
    let opts = SenderOptions { io_timeout: Duration::from_secs(5), ..Default::default() };
    let mut tx = PageSender::connect(srv.local_addr(), id, token, opts).unwrap();
    tx.put_pages(0x1000, &patterned(4 * MIB, 11)).unwrap();
    let t0 = Instant::now();
    srv.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(3));
    // The sender learns that the stream is gone (at the latest when it asks for the STATUS).
    let r = (|| -> Result<(), SendError> {
        for i in 0..64u64 {
            tx.put_pages(0x1000_0000 + i * 4 * MIB as u64, &[0u8; 4 * MIB])?;
        }
        tx.finish().map(|_| ())
    })();
    println!("{:?}", r);
    assert!(r.is_err());
    assert!(matches!(
        srv.wait(Duration::from_millis(10)),
        Err(ServeError::ShutDown)
    ));
    assert!(srv.take_store().is_empty());
}

/// A fake destination: accepts the hello, reads the stream to END, answers with `answer(totals)`.
fn fake_server(answer: fn(EndTotals) -> Status) -> SocketAddr {
    let l = std::net::TcpListener::bind(lo()).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = [0u8; wire::HELLO_LEN];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&wire::encode_hello_reply(HelloStatus::Ok))
            .unwrap();
        let mut rr = wire::RecordReader::new(s.try_clone().unwrap(), &hello);
        let mut buf = Vec::new();
        loop {
            if let wire::Record::End(t) = rr.next_record(&mut buf).unwrap() {
                s.write_all(&answer(t).encode_record()).unwrap();
                return;
            }
        }
    });
    addr
}

#[test]
fn sender_checks_the_destinations_answer() {
    let id = MigrationId([3; 16]);
    let refuse = fake_server(|totals| Status {
        code: wire::status::END_MISMATCH,
        totals,
    });
    let mut tx = PageSender::connect(refuse, id, Token([1; 32]), Default::default()).unwrap();
    tx.put_pages(0x1000, &[1u8; PAGE_SIZE]).unwrap();
    let err = tx.finish().unwrap_err();
    println!("{err}");
    assert!(matches!(
        err,
        SendError::Rejected {
            code: wire::status::END_MISMATCH
        }
    ));

    let lie = fake_server(|mut totals| {
        totals.data_pages -= 1;
        Status {
            code: wire::status::OK,
            totals,
        }
    });
    let mut tx = PageSender::connect(lie, id, Token([1; 32]), Default::default()).unwrap();
    tx.put_pages(0x1000, &[1u8; PAGE_SIZE]).unwrap();
    assert!(matches!(tx.finish(), Err(SendError::TotalsMismatch { .. })));

    // Bad input never reaches the wire.
    let ok = fake_server(|totals| Status {
        code: wire::status::OK,
        totals,
    });
    let mut tx = PageSender::connect(ok, id, Token([1; 32]), Default::default()).unwrap();
    assert!(matches!(
        tx.put_pages(0x1001, &[0u8; PAGE_SIZE]),
        Err(SendError::BadRange { .. })
    ));
    assert!(matches!(
        tx.put_pages(0x1000, &[0u8; 10]),
        Err(SendError::PartialPage { .. })
    ));
    assert!(matches!(
        tx.put_zero_pages(1 << 47, 1),
        Err(SendError::BadRange { .. })
    ));
    let stats = tx.finish().unwrap();
    assert_eq!((stats.data_pages, stats.records), (0, 0));
}

#[test]
fn handles_can_move_to_worker_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<PageServer>();
    send::<PageSender>();
    send_sync::<PageStore>();
    let (srv, id, token) = server();
    let addr = srv.local_addr();
    let worker = std::thread::spawn(move || {
        let mut tx = PageSender::connect(addr, id, token, Default::default()).unwrap();
        tx.put_zero_pages(0, 3).unwrap();
        serde_json::to_string(&tx.finish().unwrap()).unwrap()
    });
    let json = worker.join().unwrap();
    assert!(json.contains("\"zeroPages\":3"), "{json}");
    let (_, stats) = srv.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(stats.zero_pages, 3);
}
