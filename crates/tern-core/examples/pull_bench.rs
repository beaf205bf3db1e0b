//! Post-copy background pull vs plain TCP over loopback, from a real (stopped) process:
//! `cargo run --release -p tern-core --example pull_bench PID ADDR MIB [runs]`.
//!
//! PID must be stopped (SIGSTOP, state T) by the caller for the whole run: its pages are read
//! once directly and then pulled, and the two must be equal. [ADDR, ADDR + MIB MiB) is the region
//! pulled (ADDR hex, with or without 0x). Each run: `loopback_pull_throughput` (PageSourceServer +
//! RemotePages, background path only, every byte checked) then a plain TCP copy of the same bytes
//! into the same buffer. Prints one JSON line per run (PullBenchReport).
//!
//! The plain TCP baseline across another link (e.g. between two lab hosts), same bytes, same
//! 4 MiB writes, read into fresh (pre-faulted) memory as above:
//! `pull_bench tcp-sink PORT MIB` (accepts one connection, prints {"bytes","secs","mibPerSec"},
//! timed from accept to the last byte) and `pull_bench tcp-source HOST:PORT MIB` (retries the
//! connect for 10 s).
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tern_core::dirty::RangeSet;
use tern_core::pages::pull::{loopback_pull_throughput, PullOptions};
use tern_core::sys::Pid;

fn usage() -> ! {
    eprintln!("usage: pull_bench PID ADDR MIB [runs]   (PID stopped; ADDR hex)");
    eprintln!("       pull_bench tcp-sink PORT MIB | tcp-source HOST:PORT MIB");
    std::process::exit(2);
}

fn tcp_sink(port: u16, mib: u64) -> std::io::Result<()> {
    let mut dest = vec![0u8; (mib << 20) as usize];
    dest.iter_mut().step_by(4096).for_each(|b| *b = 1); // fault the destination in
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let (mut s, _) = listener.accept()?;
    let t0 = Instant::now();
    s.read_exact(&mut dest)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        r#"{{"bytes":{},"secs":{secs},"mibPerSec":{}}}"#,
        dest.len(),
        mib as f64 / secs
    );
    Ok(())
}

fn tcp_source(to: &str, mib: u64) -> std::io::Result<()> {
    let data: Vec<u8> = (0..(mib << 20) as usize)
        .map(|i| (i / 4096) as u8)
        .collect();
    let t0 = Instant::now();
    let mut s = loop {
        match TcpStream::connect(to) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    for chunk in data.chunks(4 << 20) {
        s.write_all(chunk)?;
    }
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, to, mib] = &argv[..] {
        if cmd == "tcp-sink" || cmd == "tcp-source" {
            let mib: u64 = mib.parse().unwrap_or_else(|_| usage());
            let r = if cmd == "tcp-sink" {
                tcp_sink(to.parse().unwrap_or_else(|_| usage()), mib)
            } else {
                tcp_source(to, mib)
            };
            if let Err(e) = r {
                eprintln!("pull_bench {cmd}: {e}");
                std::process::exit(1);
            }
            return;
        }
    }
    let mut args = argv.into_iter();
    let pid: i32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let addr = args
        .next()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| usage());
    let mib: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let runs: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let Some(pid) = Pid::new(pid) else { usage() };
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw())).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, r)| r.as_bytes()[0]);
    if !matches!(state, Some(b'T' | b't')) {
        eprintln!(
            "pull_bench: pid {} is not stopped ({stat:?}): its pages would change under the pull",
            pid.as_raw()
        );
        std::process::exit(1);
    }
    let extents = RangeSet::from_ranges([(addr, addr + (mib << 20))]);
    for _ in 0..runs {
        match loopback_pull_throughput(pid, extents.clone(), PullOptions::default()) {
            Ok(r) => println!("{}", serde_json::to_string(&r).expect("serialisable")),
            Err(e) => {
                eprintln!("pull_bench: {e}: {:?}", std::error::Error::source(&e));
                std::process::exit(1);
            }
        }
    }
}
