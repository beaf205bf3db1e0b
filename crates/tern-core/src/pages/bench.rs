//! Page stream throughput against a plain TCP copy of the same bytes, over the same loopback link,
//! in the same run (`cargo run --release -p tern-core --example page_bench [MiB]`).
//!
//! Page stream: PageSender → PageServer, pages checksummed on both ends and stored into a
//! PageStore (allocation + copy included), timed from connect to the server's STATUS; and the same
//! stream into a validating decoder that keeps nothing.
//! Plain TCP: write_all of the same buffer in 4 MiB writes, reader discards (or reads into fresh
//! 32 MiB buffers), timed from connect to the reader's last byte.

use super::sender::{ConnectError, SendError};
use super::server::{BindError, ServeError};
use super::wire::{
    encode_hello_reply, status, HelloStatus, Record, RecordReader, Status, HELLO_LEN,
};
use super::{
    Expected, MigrationId, PageSender, PageServer, PageSink, SenderOptions, Token, PAGE_SIZE,
};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub bytes: u64,
    pub page_stream_secs: f64,
    pub page_stream_mb_per_sec: f64,
    pub page_stream_discard_mb_per_sec: f64,
    pub plain_tcp_secs: f64,
    pub plain_tcp_mb_per_sec: f64,
    pub plain_tcp_fresh_memory_mb_per_sec: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: page server")]
    Bind(#[from] BindError),
    #[error("bench: connecting the page stream")]
    Connect(#[from] ConnectError),
    #[error("bench: sending pages")]
    Send(#[from] SendError),
    #[error("bench: receiving pages")]
    Serve(#[from] ServeError),
    #[error("bench: plain TCP copy")]
    Io(#[from] io::Error),
    #[error("bench: the store holds {got} bytes, {want} were sent")]
    Mismatch { got: u64, want: u64 },
}

/// A buffer of `len` bytes whose every page differs (so nothing is accidentally compressible or
/// zero), filled fast.
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        w.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Streams `total` bytes (rounded up to 4 MiB) four ways over loopback and reports MB/s (10^6
/// bytes per second): the page stream into a PageServer/PageStore, the page stream into a
/// validating decoder that discards, plain TCP that discards, plain TCP into fresh memory.
/// Fresh memory is what a destination fills; on VMs that hand freed memory back to the host it is
/// the bottleneck (DESIGN.md: ~0.4 GB/s), hence the two plain figures.
pub fn loopback_throughput(total: u64) -> Result<BenchReport, BenchError> {
    let src = patterned(64 << 20, 1);
    let total = total.div_ceil(CHUNK as u64).max(1) * CHUNK as u64;
    let page = page_stream(&src, total, true)?;
    let page_discard = page_stream(&src, total, false)?;
    let plain = plain_tcp(&src, total, false)?;
    let plain_fresh = plain_tcp(&src, total, true)?;
    let mbps = |secs: f64| total as f64 / secs / 1e6;
    Ok(BenchReport {
        bytes: total,
        page_stream_secs: page,
        page_stream_mb_per_sec: mbps(page),
        page_stream_discard_mb_per_sec: mbps(page_discard),
        plain_tcp_secs: plain,
        plain_tcp_mb_per_sec: mbps(plain),
        plain_tcp_fresh_memory_mb_per_sec: mbps(plain_fresh),
    })
}

const CHUNK: usize = 4 << 20;

fn lo() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Seconds from connect to the STATUS, sending `total` bytes of `src` in 64 MiB puts.
fn page_stream(src: &[u8], total: u64, store: bool) -> Result<f64, BenchError> {
    let id = MigrationId([0xbe; 16]);
    let token = Token::generate()?;
    let (addr, done): (SocketAddr, Box<dyn FnOnce() -> Result<u64, BenchError>>) = if store {
        let server = PageServer::bind(
            lo(),
            Expected {
                migration_id: id,
                token: token.clone(),
            },
        )?;
        (
            server.local_addr(),
            Box::new(move || {
                let (store, _) = server.wait(Duration::from_secs(120))?;
                Ok(store.stats().bytes)
            }),
        )
    } else {
        let listener = TcpListener::bind(lo())?;
        let addr = listener.local_addr()?;
        let t = std::thread::spawn(move || -> io::Result<u64> {
            let (s, _) = listener.accept()?;
            let mut hello = [0u8; HELLO_LEN];
            (&s).read_exact(&mut hello)?;
            (&s).write_all(&encode_hello_reply(HelloStatus::Ok))?;
            let mut rr = RecordReader::new(io::BufReader::with_capacity(256 << 10, &s), &hello);
            let mut buf = Vec::new();
            loop {
                match rr.next_record(&mut buf).map_err(io::Error::other)? {
                    Record::End(totals) => {
                        (&s).write_all(
                            &Status {
                                code: status::OK,
                                totals,
                            }
                            .encode_record(),
                        )?;
                        return Ok(totals.data_pages * PAGE_SIZE as u64);
                    }
                    _ => continue,
                }
            }
        });
        (
            addr,
            Box::new(move || {
                Ok(t.join()
                    .map_err(|_| io::Error::other("reader panicked"))??)
            }),
        )
    };
    let t0 = Instant::now();
    let mut tx = PageSender::connect(addr, id, token, SenderOptions::default())?;
    let mut sent = 0u64;
    let mut vaddr = 0x1000_0000u64;
    while sent < total {
        let n = ((total - sent) as usize).min(src.len());
        tx.put_pages(vaddr, &src[..n])?;
        sent += n as u64;
        vaddr += n as u64;
    }
    tx.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    let got = done()?;
    if got != total {
        return Err(BenchError::Mismatch { got, want: total });
    }
    Ok(secs)
}

/// Seconds from connect to the reader's last byte; the reader discards or keeps (fresh memory).
fn plain_tcp(src: &[u8], total: u64, keep: bool) -> Result<f64, BenchError> {
    let listener = TcpListener::bind(lo())?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> io::Result<(u64, Instant)> {
        let (mut s, _) = listener.accept()?;
        // Fresh memory: calloc'd 32 MiB buffers (untouched until read() writes into them).
        let mut kept: Vec<Vec<u8>> = Vec::new();
        let mut fill = 0usize;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let n = if keep {
                if kept.is_empty() || fill == kept.last().map_or(0, Vec::len) {
                    kept.push(vec![0u8; 32 << 20]);
                    fill = 0;
                }
                let v = kept.last_mut().expect("pushed");
                let n = s.read(&mut v[fill..])?;
                fill += n;
                n
            } else {
                s.read(&mut buf)?
            };
            if n == 0 {
                return Ok((got, Instant::now()));
            }
            got += n as u64;
        }
    });
    let t1 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut sent = 0u64;
    while sent < total {
        let n = ((total - sent) as usize).min(src.len());
        for c in src[..n].chunks(CHUNK) {
            s.write_all(c)?;
        }
        sent += n as u64;
    }
    drop(s);
    let (got, done) = reader
        .join()
        .map_err(|_| io::Error::other("reader panicked"))??;
    if got != total {
        return Err(BenchError::Mismatch { got, want: total });
    }
    Ok(done.duration_since(t1).as_secs_f64())
}
