//! Compiles the crate's programs — the stub (src/stub/main.rs) and the guard
//! (src/guard/main.rs) — each as its own no_std static executable with the same rustc. They
//! cannot be ordinary bin targets of the workspace: a no_std binary needs panic=abort, which Cargo
//! only sets per workspace profile, and tern-core/tern-node must keep unwinding.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    for file in
        ["src/stub/main.rs", "src/guard/main.rs", "src/rt.rs", "src/protocol.rs", "src/guard_protocol.rs", "build.rs"]
    {
        println!("cargo:rerun-if-changed={file}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = env::var("TARGET").expect("TARGET");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    for (source, name) in [("src/stub/main.rs", "tern-stub"), ("src/guard/main.rs", "tern-guard")] {
        let crate_name = name.replace('-', "_");
        let status = Command::new(&rustc)
            .arg(manifest.join(source))
            .args(["--edition=2021", "--crate-type=bin", "--crate-name", &crate_name])
            .args(["--target", &target])
            .args(["-C", "panic=abort", "-C", "opt-level=s", "-C", "debuginfo=0", "-C", "lto=fat"])
            .args(["-C", "relocation-model=static", "-C", "target-feature=+crt-static"])
            .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
            .args(["-C", "link-arg=-static", "-C", "link-arg=-Wl,-N"])
            .args(["-C", "link-arg=-Wl,--build-id=none", "-C", "strip=symbols"])
            .arg("-o")
            .arg(out.join(name))
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .unwrap_or_else(|e| panic!("running rustc for {source}: {e}"));
        assert!(status.success(), "compiling {source} failed");
    }
}
