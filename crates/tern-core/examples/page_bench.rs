//! Page stream vs plain TCP over loopback: `cargo run --release -p tern-core --example page_bench [MiB] [runs]`.
//! Prints one JSON line per run.

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    for _ in 0..runs {
        match tern_core::pages::bench::loopback_throughput(mib << 20) {
            Ok(r) => println!("{}", serde_json::to_string(&r).expect("serialisable")),
            Err(e) => {
                eprintln!("page_bench: {e}: {:?}", std::error::Error::source(&e));
                std::process::exit(1);
            }
        }
    }
}
