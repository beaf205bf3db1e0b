//! The image model: one versioned, serde-serialisable description of a frozen process.
//!
//! Everything the destination needs to rebuild the process, except the pages themselves (those
//! travel as a page stream, see [`crate::pages`]). msgpack on the wire and on disk (rmp-serde,
//! named fields, so TypeScript reads it with msgpackr as plain objects); `migrate image show FILE`
//! prints one, like CRIU's crit.
//!
//! Ownership of the parts while the engine is being built:
//! - `task.rs` (process-wide state), `mm.rs` (address space), `thread.rs` (per-thread state):
//!   the dump/restore core.
//! - `fd.rs` (open files): the files work.

pub mod fd;
pub mod mm;
pub mod task;
pub mod thread;

pub use mm::{MmImage, VmaImage};
pub use task::{FileIdentity, TaskImage};
pub use thread::ThreadImage;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of the model; a reader refuses other versions.
pub const IMAGE_VERSION: u32 = 2;

/// A whole frozen process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessImage {
    pub version: u32,
    pub source: SourceInfo,
    pub task: task::TaskImage,
    pub mm: mm::MmImage,
    pub threads: Vec<thread::ThreadImage>,
    pub fds: Vec<fd::FdImage>,
}

/// Where and when the image was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    /// Kernel release of the source (restore refuses a different vdso ABI, not a different string).
    pub kernel_release: String,
    /// The pid in the engine's namespace on the source and in the process's own pid namespace.
    pub pid: i32,
    pub ns_pid: i32,
    /// Clock ticks since boot at process start (with the pid, names this incarnation).
    pub start_time: u64,
    pub dumped_at_unix_ms: u64,
}

/// [`ProcessImage::from_msgpack`] / [`ProcessImage::to_msgpack`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image version {found} is not supported by this engine (it reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("encoding the image: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding the image: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

impl ProcessImage {
    /// msgpack with named fields (maps), so msgpackr in TypeScript reads plain objects.
    ///
    /// Numbers are msgpack integers: addresses above 2^53 come out of msgpackr as BigInt only
    /// with `int64AsType: 'bigint'`; TypeScript reads the metadata, the engine reads the rest.
    pub fn to_msgpack(&self) -> Result<Vec<u8>, ImageError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Decodes an image, refusing any other [`IMAGE_VERSION`] with a clear error (the version is
    /// looked at first, so an image from a newer engine is refused even if its shape changed).
    pub fn from_msgpack(bytes: &[u8]) -> Result<ProcessImage, ImageError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = rmp_serde::from_slice(bytes)?;
        if v.version != IMAGE_VERSION {
            return Err(ImageError::Version {
                found: v.version,
                supported: IMAGE_VERSION,
            });
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }

    /// The leader's thread image (tid == pid in the process's namespace).
    pub fn leader(&self) -> Option<&ThreadImage> {
        self.threads.iter().find(|t| t.tid == self.source.ns_pid)
    }
}

/// Serde helper: `Vec<u8>` as msgpack bin (not an array of integers).
pub(crate) mod bytes {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::VmaKind;

    fn sample() -> ProcessImage {
        ProcessImage {
            version: IMAGE_VERSION,
            source: SourceInfo {
                kernel_release: "6.18.0".into(),
                pid: 4242,
                ns_pid: 4242,
                start_time: 99,
                dumped_at_unix_ms: 1,
            },
            task: TaskImage {
                comm: "memcheck".into(),
                exe: Some(FileIdentity {
                    path: "/bin/x".into(),
                    dev: 2049,
                    inode: 7,
                    size: 100,
                    mtime_ns: 5,
                }),
                sigactions: vec![task::SigactionImage {
                    signal: 10,
                    handler: 0x5555_0000_1000,
                    flags: 0x0400_0004,
                    restorer: 0x7f00_0000_0000,
                    mask: 1 << 9,
                }],
                shared_pending: vec![task::SiginfoImage {
                    signal: 14,
                    raw: vec![14; 128],
                }],
                ..TaskImage::default()
            },
            mm: MmImage {
                brk: 0x5555_6000,
                auxv: vec![6, 4096, 0, 0],
                vmas: vec![VmaImage {
                    start: 0xffff_ffff_ff60_0000,
                    end: 0xffff_ffff_ff60_1000,
                    prot: 4,
                    flags: 2,
                    pgoff: 0,
                    file: None,
                    kind: VmaKind::Vsyscall,
                }],
                ..MmImage::default()
            },
            threads: vec![ThreadImage {
                tid: 4242,
                xstate: vec![1, 2, 3, 255],
                regs: thread::RegsImage {
                    rip: 0x7fff_dead_beef,
                    orig_rax: u64::MAX,
                    ..Default::default()
                },
                ..ThreadImage::default()
            }],
            fds: vec![],
        }
    }

    #[test]
    fn msgpack_round_trip_with_named_fields() {
        let image = sample();
        let bytes = image.to_msgpack().unwrap();
        // Named fields: the keys are in the encoding (msgpackr reads maps).
        let needle = b"sharedPending";
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
        let back = ProcessImage::from_msgpack(&bytes).unwrap();
        assert_eq!(back.task, image.task);
        assert_eq!(back.mm, image.mm);
        assert_eq!(back.threads, image.threads);
        assert_eq!(back.leader().map(|t| t.tid), Some(4242));
        // A reader that only knows the camelCase key names finds them (maps, not arrays).
        #[derive(Deserialize)]
        struct Src {
            #[serde(rename = "nsPid")]
            ns_pid: i32,
        }
        #[derive(Deserialize)]
        struct Partial {
            source: Src,
        }
        let p: Partial = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(p.source.ns_pid, 4242);
    }

    #[test]
    fn other_versions_are_refused() {
        let mut image = sample();
        image.version = IMAGE_VERSION + 1;
        let bytes = image.to_msgpack().unwrap();
        let err = ProcessImage::from_msgpack(&bytes).unwrap_err();
        assert!(matches!(err, ImageError::Version { found, .. } if found == IMAGE_VERSION + 1));
        assert!(err.to_string().contains("not supported"));
    }

    #[test]
    fn kernel_layouts_round_trip() {
        let sa = task::SigactionImage {
            signal: 2,
            handler: 1,
            flags: 2,
            restorer: 3,
            mask: 4,
        };
        assert_eq!(task::SigactionImage::from_kernel(2, &sa.to_kernel()), sa);
        let it = task::ItimerImage {
            interval_us: 1_500_000,
            value_us: 250,
        };
        assert_eq!(task::ItimerImage::from_kernel(&it.to_kernel()), it);
        let ss = thread::AltStack {
            sp: 0x1000,
            flags: 0,
            size: 8192,
        };
        assert_eq!(thread::AltStack::from_kernel(&ss.to_kernel()), ss);
    }
}
