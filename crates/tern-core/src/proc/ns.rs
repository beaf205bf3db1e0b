//! Namespaces: readlink /proc/PID/ns/{net,pid,mnt,uts,ipc,user,cgroup,time}.
//!
//! Each link reads `TYPE:[INODE]`; two processes are in the same namespace exactly when the
//! inodes (on the same nsfs) are equal. Each is compared with the engine's own
//! (/proc/self/ns/TYPE) to say whether the target shares it. A namespace type this kernel does not
//! have (e.g. time before 5.6) is None. The initial user namespace has the fixed inode
//! PROC_USER_INIT_INO (0xEFFFFFFD), which is how "the root user namespace" is recognised.

use super::{is_gone_error, read_link_string, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Inode of the initial user namespace (include/linux/proc_ns.h, PROC_USER_INIT_INO).
pub const INIT_USER_NS_INODE: u64 = 0xEFFF_FFFD;

/// One namespace of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceId {
    pub inode: u64,
    /// The engine is in this same namespace.
    pub same_as_engine: bool,
}

/// The target's namespaces; None for a type the kernel does not have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespaces {
    pub net: Option<NamespaceId>,
    pub pid: Option<NamespaceId>,
    pub mnt: Option<NamespaceId>,
    pub uts: Option<NamespaceId>,
    pub ipc: Option<NamespaceId>,
    pub user: Option<NamespaceId>,
    pub cgroup: Option<NamespaceId>,
    pub time: Option<NamespaceId>,
}

impl Namespaces {
    /// (type name, namespace) for every type the kernel has, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, NamespaceId)> + '_ {
        [
            ("net", self.net),
            ("pid", self.pid),
            ("mnt", self.mnt),
            ("uts", self.uts),
            ("ipc", self.ipc),
            ("user", self.user),
            ("cgroup", self.cgroup),
            ("time", self.time),
        ]
        .into_iter()
        .filter_map(|(name, ns)| ns.map(|ns| (name, ns)))
    }
}

/// Failure reading a namespace link.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
}

/// Parses a namespace link target `TYPE:[INODE]` into its inode.
pub fn parse_ns_link(kind: &str, link: &str) -> Result<u64, ParseError> {
    link.strip_prefix(kind)
        .and_then(|rest| rest.strip_prefix(":["))
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inode| inode.parse().ok())
        .ok_or_else(|| ParseError::new(1, format!("{link:?} is not {kind}:[INODE]")))
}

fn read_ns_inode(proc_dir: &str, kind: &'static str) -> Result<Option<u64>, NsError> {
    let path = PathBuf::from(format!("{proc_dir}/ns/{kind}"));
    match read_link_string(&path) {
        Ok(link) => parse_ns_link(kind, &link)
            .map(Some)
            .map_err(|source| NsError::Parse { path, source }),
        // The link is missing only for a type this kernel lacks; the process being gone is caught
        // by the caller (the whole ns directory is then missing too).
        Err(e) if is_gone_error(&e) && Path::new(proc_dir).join("ns").is_dir() => Ok(None),
        Err(source) => Err(NsError::Read { path, source }),
    }
}

/// Reads the target's namespaces and compares each with the engine's.
pub fn read_namespaces(pid: Pid) -> Result<Namespaces, NsError> {
    let target_dir = format!("/proc/{pid}");
    let one = |kind: &'static str| -> Result<Option<NamespaceId>, NsError> {
        let Some(inode) = read_ns_inode(&target_dir, kind)? else {
            return Ok(None);
        };
        let ours = read_ns_inode("/proc/self", kind)?;
        Ok(Some(NamespaceId {
            inode,
            same_as_engine: ours == Some(inode),
        }))
    };
    Ok(Namespaces {
        net: one("net")?,
        pid: one("pid")?,
        mnt: one("mnt")?,
        uts: one("uts")?,
        ipc: one("ipc")?,
        user: one("user")?,
        cgroup: one("cgroup")?,
        time: one("time")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links() {
        assert_eq!(parse_ns_link("net", "net:[4026531833]"), Ok(4026531833));
        assert_eq!(
            parse_ns_link("user", "user:[4026531837]"),
            Ok(INIT_USER_NS_INODE)
        );
        assert!(parse_ns_link("net", "pid:[4026531836]").is_err());
        assert!(parse_ns_link("net", "net:[x]").is_err());
        assert!(parse_ns_link("net", "net:[4026531833").is_err());
    }

    #[test]
    fn own_namespaces_are_shared() {
        let namespaces = read_namespaces(Pid::this()).unwrap();
        let all: Vec<_> = namespaces.iter().collect();
        assert!(all.len() >= 7, "{all:?}");
        assert!(all.iter().all(|(_, ns)| ns.same_as_engine));
    }
}
