//! Compiles the stub (src/stub/main.rs) as its own no_std static executable with the same
//! rustc. It cannot be an ordinary bin target of the workspace: a no_std binary needs
//! panic=abort, which Cargo only sets per workspace profile, and tern-core/tern-node must keep
//! unwinding.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/stub/main.rs");
    println!("cargo:rerun-if-changed=src/protocol.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = env::var("TARGET").expect("TARGET");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let status = Command::new(rustc)
        .arg(manifest.join("src/stub/main.rs"))
        .args(["--edition=2021", "--crate-type=bin", "--crate-name=tern_stub"])
        .args(["--target", &target])
        .args(["-C", "panic=abort", "-C", "opt-level=s", "-C", "debuginfo=0", "-C", "lto=fat"])
        .args(["-C", "relocation-model=static", "-C", "target-feature=+crt-static"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-Wl,-N"])
        .args(["-C", "link-arg=-Wl,--build-id=none", "-C", "strip=symbols"])
        .arg("-o")
        .arg(out.join("tern-stub"))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for the stub");
    assert!(status.success(), "compiling src/stub/main.rs failed");
}
