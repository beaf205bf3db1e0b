//! Threads (/proc/PID/task/) and children (/proc/PID/task/TID/children).
//!
//! Sequence: list /proc/PID/task, then read each TID's stat for its comm and state. A thread can
//! exit between the listing and its stat: such a thread is left out (the list is a snapshot of a
//! running process), while the process itself vanishing is noticed by [`super::inspect`].
//!
//! `children` (CONFIG_PROC_CHILDREN) lists, per thread, the children that thread forked, as
//! space-separated pids; the process's children are the union over its threads. Reparenting makes
//! it racy in the same benign way as the thread list.

use super::stat::{read_task_stat, StatError, TaskState};
use super::{is_gone_error, proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;

/// One thread of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Thread {
    pub tid: Pid,
    pub comm: String,
    pub state: TaskState,
}

/// Failure reading a process's task directory or children lists.
#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error(transparent)]
    Stat(#[from] StatError),
}

/// Thread ids of `pid`, ascending (the thread-group leader, whose tid is the pid, first).
pub fn list_tids(pid: Pid) -> Result<Vec<Pid>, TasksError> {
    let path = proc_path(pid, "task");
    let entries = std::fs::read_dir(&path).map_err(|source| TasksError::Read {
        path: path.clone(),
        source,
    })?;
    let mut tids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TasksError::Read {
            path: path.clone(),
            source,
        })?;
        let name = entry.file_name();
        let tid = name
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .and_then(Pid::new);
        match tid {
            Some(tid) => tids.push(tid),
            None => {
                return Err(TasksError::Parse {
                    path: path.clone(),
                    source: ParseError::new(0, format!("entry {name:?} is not a tid")),
                })
            }
        }
    }
    tids.sort();
    Ok(tids)
}

/// Every thread of `pid` with its comm and state. Threads that exit while being read are skipped.
pub fn read_threads(pid: Pid) -> Result<Vec<Thread>, TasksError> {
    let mut threads = Vec::new();
    for tid in list_tids(pid)? {
        match read_task_stat(pid, tid) {
            Ok(stat) => threads.push(Thread {
                tid,
                comm: stat.comm,
                state: stat.state,
            }),
            Err(StatError::Read { ref source, .. }) if is_gone_error(source) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Ok(threads)
}

/// Parses one `children` file: space-separated pids (with a trailing space), possibly empty.
pub fn parse_children(text: &str) -> Result<Vec<Pid>, ParseError> {
    text.split_ascii_whitespace()
        .map(|item| {
            item.parse::<i32>()
                .ok()
                .and_then(Pid::new)
                .ok_or_else(|| ParseError::new(1, format!("{item:?} is not a pid")))
        })
        .collect()
}

/// Direct children of every thread of `pid`, ascending, without duplicates.
pub fn read_children(pid: Pid) -> Result<Vec<Pid>, TasksError> {
    let mut children = Vec::new();
    for tid in list_tids(pid)? {
        let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/children"));
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if is_gone_error(&e) => continue,
            Err(source) => return Err(TasksError::Read { path, source }),
        };
        children
            .extend(parse_children(&text).map_err(|source| TasksError::Parse { path, source })?);
    }
    children.sort();
    children.dedup();
    Ok(children)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lists() {
        // /proc/PID/task/PID/children of fd_zoo with one child: note the trailing space.
        assert_eq!(parse_children("4249 ").unwrap(), vec![Pid::from_raw(4249)]);
        assert_eq!(parse_children("12 13 14").unwrap().len(), 3);
        assert!(parse_children("").unwrap().is_empty());
        assert!(parse_children("12 x").is_err());
        assert!(parse_children("0").is_err());
    }

    #[test]
    fn own_threads_include_this_one() {
        let threads = read_threads(Pid::this()).unwrap();
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        assert!(threads
            .iter()
            .any(|t| t.tid.as_raw() == me && t.state == TaskState::Running));
        assert_eq!(threads[0].tid, Pid::this());
    }
}
