//! /proc/PID/maps: the process's virtual memory areas, classified by what restore must do.
//!
//! Line format (fs/proc/task_mmu.c, show_map_vma):
//! `start-end perms offset major:minor inode          path`
//! where `perms` is `rwxp`/`rwxs` (p = private, s = shared), and `path` is padded with spaces
//! and may itself contain spaces (a newline in a file name is shown as `\012`). The path is
//! either a file, ` (deleted)`-suffixed for unlinked files, or a kernel name in brackets.
//!
//! How the kernel names the mappings Tern cares about (kernel 6.18):
//! - `[heap]`, `[stack]`, `[vdso]`, `[vvar]`, `[vvar_vclock]` (new in 6.x), `[vsyscall]`
//! - MAP_SHARED|MAP_ANONYMOUS → `/dev/zero (deleted)` on the shmem device (00:01)
//!   (or `[anon_shmem:NAME]` when named with PR_SET_VMA_ANON_NAME)
//! - memfd → `/memfd:NAME (deleted)`; SysV shm → `/SYSV<key in hex> (deleted)`
//! - private anonymous memory → no path (or `[anon:NAME]`)
//!
//! The order of classification matters: SysV shm and memfd are also "(deleted)", so they are
//! recognised before the generic deleted-file case.

use super::{hex_u64, proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;

/// The permission column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// MAP_SHARED (`s`) rather than MAP_PRIVATE (`p`).
    pub shared: bool,
}

impl Perms {
    pub fn is_none(&self) -> bool {
        !(self.read || self.write || self.exec)
    }
}

/// What a VMA is, as far as moving it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmaKind {
    /// Private anonymous memory: copied page by page.
    Anon,
    /// Private mapping of a file that still exists: reopened, then its dirty pages copied.
    File,
    /// MAP_SHARED|MAP_ANONYMOUS (shmem): copied, sharing with other processes is lost.
    SharedAnon,
    /// MAP_SHARED mapping of a file: reopened on the destination, writes go to the file.
    FileShared,
    Stack,
    Heap,
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
    /// Private anonymous PROT_NONE region (guard pages, reserved address space).
    Guard,
    /// System V shared memory segment (shmat).
    SysvShm,
    /// Mapping of a memfd.
    Memfd,
    /// Mapping of a file unlinked since: its content must travel with the process.
    DeletedFile,
    /// A bracketed kernel mapping Tern does not know (`[uprobes]`, ...).
    Special,
}

impl VmaKind {
    /// The kind as serialized (stable, kebab-case).
    pub fn name(self) -> &'static str {
        match self {
            VmaKind::Anon => "anon",
            VmaKind::File => "file",
            VmaKind::SharedAnon => "shared-anon",
            VmaKind::FileShared => "file-shared",
            VmaKind::Stack => "stack",
            VmaKind::Heap => "heap",
            VmaKind::Vdso => "vdso",
            VmaKind::Vvar => "vvar",
            VmaKind::VvarVclock => "vvar-vclock",
            VmaKind::Vsyscall => "vsyscall",
            VmaKind::Guard => "guard",
            VmaKind::SysvShm => "sysv-shm",
            VmaKind::Memfd => "memfd",
            VmaKind::DeletedFile => "deleted-file",
            VmaKind::Special => "special",
        }
    }
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vma {
    #[serde(with = "hex_u64")]
    pub start: u64,
    /// Exclusive.
    #[serde(with = "hex_u64")]
    pub end: u64,
    pub perms: Perms,
    /// Offset into the file, in bytes.
    pub offset: u64,
    /// Device of the backing file as `major:minor` in hex, as the kernel prints it.
    pub dev: String,
    pub inode: u64,
    pub path: Option<String>,
    pub kind: VmaKind,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Failure reading /proc/PID/maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("reading /proc/{pid}/maps: {source}")]
    Read { pid: Pid, source: io::Error },
    #[error("parsing /proc/{pid}/maps: {source}")]
    Parse { pid: Pid, source: ParseError },
}

const DELETED_SUFFIX: &str = " (deleted)";

/// Decides the kind of a mapping from its path, permissions and device.
pub fn classify(path: Option<&str>, perms: Perms, dev: &str) -> VmaKind {
    let Some(path) = path else {
        return if perms.shared {
            VmaKind::SharedAnon
        } else if perms.is_none() {
            VmaKind::Guard
        } else {
            VmaKind::Anon
        };
    };
    if path.starts_with('[') {
        return match path {
            "[heap]" => VmaKind::Heap,
            "[stack]" => VmaKind::Stack,
            "[vdso]" => VmaKind::Vdso,
            "[vvar]" => VmaKind::Vvar,
            "[vvar_vclock]" => VmaKind::VvarVclock,
            "[vsyscall]" => VmaKind::Vsyscall,
            _ if path.starts_with("[stack:") => VmaKind::Stack,
            _ if path.starts_with("[anon_shmem:") => VmaKind::SharedAnon,
            _ if path.starts_with("[anon:") && perms.shared => VmaKind::SharedAnon,
            _ if path.starts_with("[anon:") && perms.is_none() => VmaKind::Guard,
            _ if path.starts_with("[anon:") => VmaKind::Anon,
            _ => VmaKind::Special,
        };
    }
    if path.starts_with("/SYSV") {
        return VmaKind::SysvShm;
    }
    if path.starts_with("/memfd:") {
        return VmaKind::Memfd;
    }
    // shmem_zero_setup names the shmem file behind MAP_SHARED|MAP_ANONYMOUS "dev/zero"; it lives
    // on the internal shm mount (major 0), unlike the real /dev/zero on devtmpfs.
    if path == "/dev/zero (deleted)" && dev.starts_with("00:") {
        return VmaKind::SharedAnon;
    }
    if path.ends_with(DELETED_SUFFIX) {
        return VmaKind::DeletedFile;
    }
    if perms.shared {
        VmaKind::FileShared
    } else {
        VmaKind::File
    }
}

fn parse_perms(n: usize, text: &str) -> Result<Perms, ParseError> {
    let bytes = text.as_bytes();
    let flag = |i: usize, on: u8| -> Result<bool, ParseError> {
        match bytes.get(i) {
            Some(&b) if b == on => Ok(true),
            Some(b'-') => Ok(false),
            _ => Err(ParseError::new(n, format!("bad permissions {text:?}"))),
        }
    };
    if bytes.len() != 4 {
        return Err(ParseError::new(n, format!("bad permissions {text:?}")));
    }
    let shared = match bytes[3] {
        b's' => true,
        b'p' => false,
        _ => return Err(ParseError::new(n, format!("bad sharing flag in {text:?}"))),
    };
    Ok(Perms {
        read: flag(0, b'r')?,
        write: flag(1, b'w')?,
        exec: flag(2, b'x')?,
        shared,
    })
}

/// Parses one maps line (`n` is its 1-based line number, for errors).
pub fn parse_maps_line(n: usize, line: &str) -> Result<Vma, ParseError> {
    // Five whitespace-separated fields, then the path (which may contain spaces).
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        if end == 0 {
            return Err(ParseError::new(n, format!("truncated line {line:?}")));
        }
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let [range, perms, offset, dev, inode] = fields;
    let (start, end) = range
        .split_once('-')
        .and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .filter(|(s, e)| s <= e)
        .ok_or_else(|| ParseError::new(n, format!("bad address range {range:?}")))?;
    let perms = parse_perms(n, perms)?;
    let offset = u64::from_str_radix(offset, 16)
        .map_err(|_| ParseError::new(n, format!("bad offset {offset:?}")))?;
    if !dev.contains(':') {
        return Err(ParseError::new(n, format!("bad device {dev:?}")));
    }
    let inode = inode
        .parse::<u64>()
        .map_err(|_| ParseError::new(n, format!("bad inode {inode:?}")))?;
    let path = rest.trim_start_matches(' ');
    let path = (!path.is_empty()).then(|| path.to_owned());
    let kind = classify(path.as_deref(), perms, dev);
    Ok(Vma {
        start,
        end,
        perms,
        offset,
        dev: dev.to_owned(),
        inode,
        path,
        kind,
    })
}

/// Parses the whole text of /proc/PID/maps.
pub fn parse_maps(text: &str) -> Result<Vec<Vma>, ParseError> {
    text.lines()
        .enumerate()
        .map(|(i, line)| parse_maps_line(i + 1, line))
        .collect()
}

/// Reads /proc/PID/maps (empty for kernel threads and zombies).
pub fn read_maps(pid: Pid) -> Result<Vec<Vma>, MapsError> {
    let text = std::fs::read_to_string(proc_path(pid, "maps"))
        .map_err(|source| MapsError::Read { pid, source })?;
    parse_maps(&text).map_err(|source| MapsError::Parse { pid, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of /proc/PID/maps of tests/workloads/fd_zoo.c and `cat /proc/self/maps`, captured on
    /// the development machine (kernel 6.18), padding preserved.
    const FIXTURE: &str = "\
55ab05d07000-55ab05d09000 r--p 00000000 fe:00 247026                     /usr/bin/cat
55ab05d12000-55ab05d13000 rw-p 0000a000 fe:00 247026                     /usr/bin/cat
55ab41572000-55ab41593000 rw-p 00000000 00:00 0                          [heap]
7fee0050f000-7fee00531000 rw-p 00000000 00:00 0 
7fee00777000-7fee0077e000 r--s 00000000 fe:00 325737                     /usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache
7f77aa135000-7f77aa136000 rw-s 00000000 00:01 0                          /SYSV00000000 (deleted)
7f77aa136000-7f77aa13b000 ---p 00000000 00:00 0 
7f77aa13b000-7f77aa13e000 rw-s 00000000 00:01 26                         /dev/zero (deleted)
7f77aa140000-7f77aa144000 r--p 00000000 00:00 0                          [vvar]
7f77aa144000-7f77aa146000 r--p 00000000 00:00 0                          [vvar_vclock]
7f77aa146000-7f77aa148000 r-xp 00000000 00:00 0                          [vdso]
7f77aa148000-7f77aa149000 r--p 00000000 fe:00 325835                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f0000001000-7f0000003000 rw-s 00000000 00:01 25                         /memfd:tern-zoo (deleted)
7f0000003000-7f0000004000 r--p 00000000 fe:00 10003589                   /tmp/zoo/deleted (deleted)
7f0000004000-7f0000005000 r--p 00001000 fe:00 10003590                   /tmp/with space/lib (x).so
7ffc2e254000-7ffc2e275000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn classifies_every_kind() {
        let vmas = parse_maps(FIXTURE).unwrap();
        let kinds: Vec<VmaKind> = vmas.iter().map(|v| v.kind).collect();
        use VmaKind::*;
        assert_eq!(
            kinds,
            vec![
                File,
                File,
                Heap,
                Anon,
                FileShared,
                SysvShm,
                Guard,
                SharedAnon,
                Vvar,
                VvarVclock,
                Vdso,
                File,
                Memfd,
                DeletedFile,
                File,
                Stack,
                Vsyscall
            ]
        );
        let first = &vmas[0];
        assert_eq!(
            (first.start, first.end, first.len()),
            (0x55ab05d07000, 0x55ab05d09000, 0x2000)
        );
        assert_eq!(
            first.perms,
            Perms {
                read: true,
                write: false,
                exec: false,
                shared: false
            }
        );
        assert_eq!((first.dev.as_str(), first.inode), ("fe:00", 247026));
        assert_eq!(first.path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(vmas[1].offset, 0xa000);
        assert_eq!(vmas[3].path, None);
        assert_eq!(vmas[14].path.as_deref(), Some("/tmp/with space/lib (x).so"));
        assert_eq!(vmas[16].start, 0xffff_ffff_ff60_0000);
        assert!(vmas[16].perms.exec && !vmas[16].perms.read);
    }

    #[test]
    fn named_anonymous_regions() {
        let p = |shared| Perms {
            read: true,
            write: true,
            exec: false,
            shared,
        };
        assert_eq!(
            classify(Some("[anon:glibc malloc]"), p(false), "00:00"),
            VmaKind::Anon
        );
        assert_eq!(
            classify(Some("[anon_shmem:ring]"), p(true), "00:01"),
            VmaKind::SharedAnon
        );
        assert_eq!(
            classify(Some("[uprobes]"), p(false), "00:00"),
            VmaKind::Special
        );
        assert_eq!(classify(None, p(true), "00:01"), VmaKind::SharedAnon);
        // The real /dev/zero mapped shared lives on devtmpfs, not on the shm mount.
        assert_eq!(
            classify(Some("/dev/zero"), p(true), "00:05"),
            VmaKind::FileShared
        );
    }

    #[test]
    fn hostile_lines_are_errors_not_panics() {
        for bad in [
            "7f00-",
            "7f00-7e00 rw-p 00000000 00:00 0",  // end before start
            "7f00-7f10 rw-p 00000000 00:00",    // truncated
            "7f00-7f10 rw-q 00000000 00:00 0",  // bad share flag
            "7f00-7f10 rwxps 00000000 00:00 0", // too many perms
            "7f00-7f10 rw-p zz 00:00 0",        // bad offset
            "7f00-7f10 rw-p 00000000 0000 0",   // bad device
            "7f00-7f10 rw-p 00000000 00:00 -1", // bad inode
            "xyz-7f10 rw-p 00000000 00:00 0",
            "",
        ] {
            assert!(parse_maps_line(1, bad).is_err(), "{bad:?} should not parse");
        }
        let error = parse_maps("7f00-7f10 rw-p 00000000 00:00 0\n7f").unwrap_err();
        assert_eq!(error.line, 2);
    }

    #[test]
    fn reads_own_maps() {
        let vmas = read_maps(Pid::this()).unwrap();
        assert!(
            vmas.windows(2).all(|w| w[0].end <= w[1].start),
            "sorted, disjoint"
        );
        assert!(vmas.iter().any(|v| v.kind == VmaKind::Vdso));
        assert!(vmas.iter().any(|v| v.kind == VmaKind::Stack));
    }
}
