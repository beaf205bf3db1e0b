//! tern-stub: the program a restored process starts life as.
//!
//! The destination agent clones this binary with clone3(set_tid) so that it gets the original
//! pid; the stub receives the fds it must hold, puts them in place and stops so that the tracer can
//! rebuild the address space with remote syscalls (see crates/tern-core restore, a later issue).
//! Until restore exists the stub only does its first job honestly: stop itself and wait to be
//! driven, so that a tracer can seize it.

fn main() {
    // SAFETY: raise(SIGSTOP) has no memory-safety preconditions; it stops this process until a
    // tracer or SIGCONT resumes it.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}
