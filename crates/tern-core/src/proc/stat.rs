//! /proc/PID/stat (and /proc/PID/task/TID/stat) and /proc/PID/auxv.
//!
//! stat is one line: `pid (comm) state ppid pgrp session tty_nr tpgid flags ...` (proc(5)).
//! `comm` is whatever the process chose with prctl(PR_SET_NAME) — up to 15 bytes that may contain
//! spaces, parentheses and even ") (" — so the line is split at the LAST ')': everything after it
//! is whitespace-separated numbers. Field N of proc(5) (1-based) is token N-3 after the ')'.
//!
//! The mm fields (start_code .. exit_code, startstack) are what prctl(PR_SET_MM_MAP) needs on
//! restore. The kernel shows them as 0 for kernel threads and zombies, and to readers without
//! ptrace access to the process; the engine runs as root, so they are real here.
//!
//! auxv is the raw `Elf64_auxv_t` array (u64 type, u64 value pairs, native endian) ending with
//! AT_NULL; it is also needed verbatim by PR_SET_MM_MAP.

use super::{hex_u64, proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;

/// PF_KTHREAD in stat's `flags`: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Scheduler state of a task (stat field 3; letters from fs/proc/array.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Running,
    Sleeping,
    DiskSleep,
    Stopped,
    TracingStop,
    Zombie,
    Dead,
    Parked,
    Idle,
    Unknown,
}

impl TaskState {
    pub fn from_letter(letter: char) -> TaskState {
        match letter {
            'R' => TaskState::Running,
            'S' => TaskState::Sleeping,
            'D' => TaskState::DiskSleep,
            'T' => TaskState::Stopped,
            't' => TaskState::TracingStop,
            'Z' => TaskState::Zombie,
            'X' | 'x' => TaskState::Dead,
            'P' => TaskState::Parked,
            'I' => TaskState::Idle,
            _ => TaskState::Unknown,
        }
    }
}

/// One `Elf64_auxv_t` entry of /proc/PID/auxv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuxvEntry {
    /// AT_* type (AT_PAGESZ = 6, AT_SYSINFO_EHDR = 33, ...).
    #[serde(rename = "type")]
    pub key: u64,
    #[serde(with = "hex_u64")]
    pub value: u64,
}

/// The memory-layout fields of stat, plus auxv: the inputs of prctl(PR_SET_MM_MAP) on restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MmFields {
    #[serde(with = "hex_u64")]
    pub start_code: u64,
    #[serde(with = "hex_u64")]
    pub end_code: u64,
    #[serde(with = "hex_u64")]
    pub start_data: u64,
    #[serde(with = "hex_u64")]
    pub end_data: u64,
    #[serde(with = "hex_u64")]
    pub start_brk: u64,
    #[serde(with = "hex_u64")]
    pub start_stack: u64,
    #[serde(with = "hex_u64")]
    pub arg_start: u64,
    #[serde(with = "hex_u64")]
    pub arg_end: u64,
    #[serde(with = "hex_u64")]
    pub env_start: u64,
    #[serde(with = "hex_u64")]
    pub env_end: u64,
    /// Exit status as waitpid would report it (only meaningful for a zombie).
    pub exit_code: i32,
    /// Filled by [`read_auxv`]; [`parse_stat`] leaves it empty.
    pub auxv: Vec<AuxvEntry>,
}

/// The parts of /proc/PID/stat the engine uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: TaskState,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub tty_nr: i32,
    pub flags: u32,
    pub num_threads: u32,
    /// Clock ticks after boot.
    pub start_time: u64,
    pub mm: MmFields,
}

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Failure reading /proc/PID/stat or /proc/PID/auxv.
#[derive(Debug, thiserror::Error)]
pub enum StatError {
    #[error("reading /proc/{pid}/{file}: {source}")]
    Read {
        pid: Pid,
        file: &'static str,
        source: io::Error,
    },
    #[error("parsing /proc/{pid}/{file}: {source}")]
    Parse {
        pid: Pid,
        file: &'static str,
        source: ParseError,
    },
}

/// Parses one stat line. Fields this kernel does not show (older kernels end earlier) read as 0.
pub fn parse_stat(text: &str) -> Result<Stat, ParseError> {
    let line = text.trim_end_matches('\n');
    let open = line
        .find(" (")
        .ok_or_else(|| ParseError::new(1, "no ' (' before comm"))?;
    let close = line
        .rfind(')')
        .ok_or_else(|| ParseError::new(1, "no ')' after comm"))?;
    if close < open {
        return Err(ParseError::new(1, "')' before '('"));
    }
    let pid = line[..open]
        .trim()
        .parse::<i32>()
        .map_err(|_| ParseError::new(1, format!("pid {:?} is not a number", &line[..open])))?;
    let comm = line[open + 2..close].to_owned();
    let rest: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    // Field N (1-based, as numbered by proc(5)) is rest[N - 3].
    let field = |n: usize| -> Option<&str> { rest.get(n - 3).copied() };
    fn number<T: std::str::FromStr + Default>(
        value: Option<&str>,
        n: usize,
        required: bool,
    ) -> Result<T, ParseError> {
        match value {
            Some(text) => text
                .parse::<T>()
                .map_err(|_| ParseError::new(1, format!("field {n} {text:?} is not a number"))),
            None if required => Err(ParseError::new(
                1,
                format!("field {n} missing: line truncated"),
            )),
            None => Ok(T::default()),
        }
    }
    let state_text = field(3).ok_or_else(|| ParseError::new(1, "state missing: line truncated"))?;
    let mut state_chars = state_text.chars();
    let state = match (state_chars.next(), state_chars.next()) {
        (Some(letter), None) => TaskState::from_letter(letter),
        _ => {
            return Err(ParseError::new(
                1,
                format!("state {state_text:?} is not one letter"),
            ))
        }
    };
    // Everything up to starttime (22) exists on every kernel the engine runs on.
    let req = |n: usize| number::<u64>(field(n), n, true);
    let opt = |n: usize| number::<u64>(field(n), n, false);
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: number(field(4), 4, true)?,
        pgrp: number(field(5), 5, true)?,
        session: number(field(6), 6, true)?,
        tty_nr: number(field(7), 7, true)?,
        flags: number(field(9), 9, true)?,
        num_threads: number(field(20), 20, true)?,
        start_time: req(22)?,
        mm: MmFields {
            start_code: opt(26)?,
            end_code: opt(27)?,
            start_stack: opt(28)?,
            start_data: opt(45)?,
            end_data: opt(46)?,
            start_brk: opt(47)?,
            arg_start: opt(48)?,
            arg_end: opt(49)?,
            env_start: opt(50)?,
            env_end: opt(51)?,
            exit_code: number(field(52), 52, false)?,
            auxv: Vec::new(),
        },
    })
}

/// Parses the raw bytes of /proc/PID/auxv, stopping at AT_NULL.
pub fn parse_auxv(raw: &[u8]) -> Result<Vec<AuxvEntry>, ParseError> {
    let pairs = raw.chunks_exact(16);
    if !pairs.remainder().is_empty() {
        return Err(ParseError::new(
            0,
            format!("{} bytes is not a whole number of pairs", raw.len()),
        ));
    }
    let word = |bytes: &[u8]| u64::from_ne_bytes(bytes.try_into().expect("8-byte half of a pair"));
    Ok(pairs
        .map(|pair| AuxvEntry {
            key: word(&pair[..8]),
            value: word(&pair[8..]),
        })
        .take_while(|entry| entry.key != libc::AT_NULL)
        .collect())
}

fn read_stat_file(pid: Pid, file: &'static str) -> Result<Stat, StatError> {
    let text = std::fs::read_to_string(proc_path(pid, file)).map_err(|source| StatError::Read {
        pid,
        file,
        source,
    })?;
    parse_stat(&text).map_err(|source| StatError::Parse { pid, file, source })
}

/// Reads /proc/PID/stat.
pub fn read_stat(pid: Pid) -> Result<Stat, StatError> {
    read_stat_file(pid, "stat")
}

/// Reads /proc/PID/task/TID/stat (one thread's view: its own comm and state).
pub fn read_task_stat(pid: Pid, tid: Pid) -> Result<Stat, StatError> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).map_err(|source| {
            StatError::Read {
                pid,
                file: "task/TID/stat",
                source,
            }
        })?;
    parse_stat(&text).map_err(|source| StatError::Parse {
        pid,
        file: "task/TID/stat",
        source,
    })
}

/// Reads /proc/PID/auxv (empty for kernel threads and zombies).
pub fn read_auxv(pid: Pid) -> Result<Vec<AuxvEntry>, StatError> {
    let raw = std::fs::read(proc_path(pid, "auxv")).map_err(|source| StatError::Read {
        pid,
        file: "auxv",
        source,
    })?;
    parse_auxv(&raw).map_err(|source| StatError::Parse {
        pid,
        file: "auxv",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat /proc/self/stat` on the development machine (kernel 6.18).
    const CAT_STAT: &str = "4123 (cat) R 4116 4116 2748 0 -1 4194304 101 0 0 0 0 0 0 0 20 0 1 0 23996 3133440 394 18446744073709551615 94846533644288 94846533664169 140723715360688 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94846533680176 94846533681792 94846631235584 140723715365570 140723715365590 140723715365590 140723715366891 0\n";

    #[test]
    fn parses_real_stat() {
        let stat = parse_stat(CAT_STAT).unwrap();
        assert_eq!(stat.pid, 4123);
        assert_eq!(stat.comm, "cat");
        assert_eq!(stat.state, TaskState::Running);
        assert_eq!(
            (stat.ppid, stat.pgrp, stat.session, stat.tty_nr),
            (4116, 4116, 2748, 0)
        );
        assert_eq!(stat.flags, 4194304);
        assert!(!stat.is_kernel_thread());
        assert_eq!(stat.num_threads, 1);
        assert_eq!(stat.start_time, 23996);
        assert_eq!(stat.mm.start_code, 94846533644288);
        assert_eq!(stat.mm.end_code, 94846533664169);
        assert_eq!(stat.mm.start_stack, 140723715360688);
        assert_eq!(stat.mm.start_data, 94846533680176);
        assert_eq!(stat.mm.end_data, 94846533681792);
        assert_eq!(stat.mm.start_brk, 94846631235584);
        assert_eq!(stat.mm.arg_start, 140723715365570);
        assert_eq!(stat.mm.arg_end, 140723715365590);
        assert_eq!(stat.mm.env_start, 140723715365590);
        assert_eq!(stat.mm.env_end, 140723715366891);
        assert_eq!(stat.mm.exit_code, 0);
    }

    #[test]
    fn comm_with_parens_and_spaces() {
        let line = CAT_STAT.replace("(cat)", "(a) (b ) x)");
        let stat = parse_stat(&line).unwrap();
        assert_eq!(stat.comm, "a) (b ) x");
        assert_eq!(stat.ppid, 4116);
        let empty = CAT_STAT.replace("(cat)", "()");
        assert_eq!(parse_stat(&empty).unwrap().comm, "");
    }

    #[test]
    fn kernel_thread_flag() {
        // /proc/2/stat on the development machine.
        let kthreadd = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 25 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let stat = parse_stat(kthreadd).unwrap();
        assert!(stat.is_kernel_thread());
        assert_eq!(stat.mm, MmFields::default());
    }

    #[test]
    fn hostile_lines_are_errors_not_panics() {
        for bad in [
            "",
            "\n",
            "12",
            "12 (x",
            "x) 12 (",
            "12 (x) ",
            "12 (x) RR 1 1 1 0",
            "abc (x) R 1 1 1 0 -1 0",
            "12 (x) R 1 1 1",                        // truncated before flags
            "12 (x) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0", // truncated before num_threads
            "12 (x) R one 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5",
        ] {
            assert!(parse_stat(bad).is_err(), "{bad:?} should not parse");
        }
        // Truncated after starttime: an old kernel, mm fields read as 0.
        let short = parse_stat("12 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5").unwrap();
        assert_eq!(short.start_time, 5);
        assert_eq!(short.mm.env_end, 0);
    }

    #[test]
    fn auxv_pairs_stop_at_null() {
        let mut raw = Vec::new();
        for (key, value) in [(33u64, 0x7f77_aa14_6000u64), (6, 4096), (0, 0), (99, 99)] {
            raw.extend_from_slice(&key.to_ne_bytes());
            raw.extend_from_slice(&value.to_ne_bytes());
        }
        let auxv = parse_auxv(&raw).unwrap();
        assert_eq!(
            auxv,
            vec![
                AuxvEntry {
                    key: 33,
                    value: 0x7f77_aa14_6000
                },
                AuxvEntry {
                    key: 6,
                    value: 4096
                }
            ]
        );
        assert!(parse_auxv(&raw[..20]).is_err());
        assert!(parse_auxv(&[]).unwrap().is_empty());
    }

    #[test]
    fn reads_own_stat_and_auxv() {
        let stat = read_stat(Pid::this()).unwrap();
        assert_eq!(stat.pid, Pid::this().as_raw());
        assert_ne!(stat.mm.start_code, 0);
        let auxv = read_auxv(Pid::this()).unwrap();
        assert!(auxv
            .iter()
            .any(|e| e.key == libc::AT_PAGESZ && e.value == 4096));
    }
}
