//! (restore: tern-stub cloned with the original pid, address space rebuilt by remote syscalls —
//! filled in by the dump/restore core)
