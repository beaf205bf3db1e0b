//! /proc/PID/status: credentials, signal masks, capabilities, namespace pids, memory counters.
//!
//! The file is `Key:\tvalue` lines. Keys differ between kernel versions and between processes
//! (kernel threads have no Vm* lines; `Umask` appeared in 4.7, `Kthread` in 6.x), so every key is
//! optional except the few every kernel has shown for a decade (Name, State, Tgid, Pid, PPid,
//! TracerPid, Uid, Gid). Unknown keys are ignored. Signal masks and capabilities are 16 hex
//! digits; memory counters are "N kB" and are stored here in bytes. NSpid/NStgid list the id in
//! every pid namespace from the engine's outward view inwards: the last one is what the process
//! itself sees from getpid().

use super::{hex_u64, proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;

/// The four ids of a Uid: or Gid: line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ids {
    pub real: u32,
    pub effective: u32,
    pub saved: u32,
    pub fs: u32,
}

/// Seccomp mode (the `Seccomp:` line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    #[default]
    Disabled,
    Strict,
    Filter,
}

/// Memory counters of the Vm*/Rss* lines, in bytes. None where the kernel shows none (no mm).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryCounters {
    pub vm_peak: Option<u64>,
    pub vm_size: Option<u64>,
    pub vm_lck: Option<u64>,
    pub vm_pin: Option<u64>,
    pub vm_hwm: Option<u64>,
    pub vm_rss: Option<u64>,
    pub rss_anon: Option<u64>,
    pub rss_file: Option<u64>,
    pub rss_shmem: Option<u64>,
    pub vm_data: Option<u64>,
    pub vm_stk: Option<u64>,
    pub vm_exe: Option<u64>,
    pub vm_lib: Option<u64>,
    pub vm_pte: Option<u64>,
    pub vm_swap: Option<u64>,
}

/// The parts of /proc/PID/status the engine uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub umask: Option<u32>,
    pub tgid: i32,
    pub pid: i32,
    pub ppid: i32,
    /// Pid of the process ptrace-attached to this one, 0 if none.
    pub tracer_pid: i32,
    pub uid: Ids,
    pub gid: Ids,
    pub groups: Vec<u32>,
    /// Thread-group id in each pid namespace, outermost (ours) first.
    pub ns_tgid: Vec<i32>,
    /// Pid in each pid namespace, outermost (ours) first; the last is the innermost view.
    pub ns_pid: Vec<i32>,
    pub ns_pgid: Vec<i32>,
    pub ns_sid: Vec<i32>,
    /// `Kthread:` line (6.x kernels); None where absent.
    pub kthread: Option<bool>,
    pub threads: u32,
    #[serde(with = "hex_u64")]
    pub sig_pnd: u64,
    #[serde(with = "hex_u64")]
    pub shd_pnd: u64,
    #[serde(with = "hex_u64")]
    pub sig_blk: u64,
    #[serde(with = "hex_u64")]
    pub sig_ign: u64,
    #[serde(with = "hex_u64")]
    pub sig_cgt: u64,
    #[serde(with = "hex_u64")]
    pub cap_inh: u64,
    #[serde(with = "hex_u64")]
    pub cap_prm: u64,
    #[serde(with = "hex_u64")]
    pub cap_eff: u64,
    #[serde(with = "hex_u64")]
    pub cap_bnd: u64,
    #[serde(with = "hex_u64")]
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub seccomp: SeccompMode,
    pub seccomp_filters: u32,
    pub memory: MemoryCounters,
}

/// Failure reading /proc/PID/status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("reading /proc/{pid}/status: {source}")]
    Read { pid: Pid, source: io::Error },
    #[error("parsing /proc/{pid}/status: {source}")]
    Parse { pid: Pid, source: ParseError },
}

fn parse_num<T: std::str::FromStr>(line: usize, key: &str, text: &str) -> Result<T, ParseError> {
    text.trim()
        .parse::<T>()
        .map_err(|_| ParseError::new(line, format!("{key}: {text:?} is not a number")))
}

fn parse_hex(line: usize, key: &str, text: &str) -> Result<u64, ParseError> {
    u64::from_str_radix(text.trim(), 16)
        .map_err(|_| ParseError::new(line, format!("{key}: {text:?} is not hex")))
}

fn parse_list<T: std::str::FromStr>(
    line: usize,
    key: &str,
    text: &str,
) -> Result<Vec<T>, ParseError> {
    text.split_ascii_whitespace()
        .map(|item| parse_num(line, key, item))
        .collect()
}

fn parse_ids(line: usize, key: &str, text: &str) -> Result<Ids, ParseError> {
    match parse_list::<u32>(line, key, text)?[..] {
        [real, effective, saved, fs] => Ok(Ids {
            real,
            effective,
            saved,
            fs,
        }),
        _ => Err(ParseError::new(
            line,
            format!("{key}: expected 4 ids, got {text:?}"),
        )),
    }
}

/// "1600 kB" → 1638400.
fn parse_kb(line: usize, key: &str, text: &str) -> Result<u64, ParseError> {
    let number = text
        .trim()
        .strip_suffix("kB")
        .ok_or_else(|| ParseError::new(line, format!("{key}: {text:?} does not end in kB")))?;
    Ok(parse_num::<u64>(line, key, number)? * 1024)
}

/// Parses the text of /proc/PID/status.
pub fn parse_status(text: &str) -> Result<Status, ParseError> {
    let mut status = Status::default();
    let mut seen_required = [false; 8];
    const REQUIRED: [&str; 8] = [
        "Name",
        "State",
        "Tgid",
        "Pid",
        "PPid",
        "TracerPid",
        "Uid",
        "Gid",
    ];
    for (index, raw_line) in text.lines().enumerate() {
        let n = index + 1;
        let (key, value) = raw_line
            .split_once(':')
            .ok_or_else(|| ParseError::new(n, format!("no ':' in {raw_line:?}")))?;
        if let Some(slot) = REQUIRED.iter().position(|k| *k == key) {
            seen_required[slot] = true;
        }
        let memory = &mut status.memory;
        match key {
            // The name is the only value that may legitimately contain spaces; keep it verbatim
            // apart from the tab separator.
            "Name" => status.name = value.strip_prefix('\t').unwrap_or(value).to_owned(),
            "Umask" => {
                status.umask =
                    Some(u32::from_str_radix(value.trim(), 8).map_err(|_| {
                        ParseError::new(n, format!("Umask: {value:?} is not octal"))
                    })?)
            }
            "Tgid" => status.tgid = parse_num(n, key, value)?,
            "Pid" => status.pid = parse_num(n, key, value)?,
            "PPid" => status.ppid = parse_num(n, key, value)?,
            "TracerPid" => status.tracer_pid = parse_num(n, key, value)?,
            "Uid" => status.uid = parse_ids(n, key, value)?,
            "Gid" => status.gid = parse_ids(n, key, value)?,
            "Groups" => status.groups = parse_list(n, key, value)?,
            "NStgid" => status.ns_tgid = parse_list(n, key, value)?,
            "NSpid" => status.ns_pid = parse_list(n, key, value)?,
            "NSpgid" => status.ns_pgid = parse_list(n, key, value)?,
            "NSsid" => status.ns_sid = parse_list(n, key, value)?,
            "Kthread" => status.kthread = Some(parse_num::<u8>(n, key, value)? != 0),
            "Threads" => status.threads = parse_num(n, key, value)?,
            "SigPnd" => status.sig_pnd = parse_hex(n, key, value)?,
            "ShdPnd" => status.shd_pnd = parse_hex(n, key, value)?,
            "SigBlk" => status.sig_blk = parse_hex(n, key, value)?,
            "SigIgn" => status.sig_ign = parse_hex(n, key, value)?,
            "SigCgt" => status.sig_cgt = parse_hex(n, key, value)?,
            "CapInh" => status.cap_inh = parse_hex(n, key, value)?,
            "CapPrm" => status.cap_prm = parse_hex(n, key, value)?,
            "CapEff" => status.cap_eff = parse_hex(n, key, value)?,
            "CapBnd" => status.cap_bnd = parse_hex(n, key, value)?,
            "CapAmb" => status.cap_amb = parse_hex(n, key, value)?,
            "NoNewPrivs" => status.no_new_privs = parse_num::<u8>(n, key, value)? != 0,
            "Seccomp" => {
                status.seccomp = match parse_num::<u8>(n, key, value)? {
                    0 => SeccompMode::Disabled,
                    1 => SeccompMode::Strict,
                    2 => SeccompMode::Filter,
                    other => {
                        return Err(ParseError::new(n, format!("Seccomp: unknown mode {other}")))
                    }
                }
            }
            "Seccomp_filters" => status.seccomp_filters = parse_num(n, key, value)?,
            "VmPeak" => memory.vm_peak = Some(parse_kb(n, key, value)?),
            "VmSize" => memory.vm_size = Some(parse_kb(n, key, value)?),
            "VmLck" => memory.vm_lck = Some(parse_kb(n, key, value)?),
            "VmPin" => memory.vm_pin = Some(parse_kb(n, key, value)?),
            "VmHWM" => memory.vm_hwm = Some(parse_kb(n, key, value)?),
            "VmRSS" => memory.vm_rss = Some(parse_kb(n, key, value)?),
            "RssAnon" => memory.rss_anon = Some(parse_kb(n, key, value)?),
            "RssFile" => memory.rss_file = Some(parse_kb(n, key, value)?),
            "RssShmem" => memory.rss_shmem = Some(parse_kb(n, key, value)?),
            "VmData" => memory.vm_data = Some(parse_kb(n, key, value)?),
            "VmStk" => memory.vm_stk = Some(parse_kb(n, key, value)?),
            "VmExe" => memory.vm_exe = Some(parse_kb(n, key, value)?),
            "VmLib" => memory.vm_lib = Some(parse_kb(n, key, value)?),
            "VmPTE" => memory.vm_pte = Some(parse_kb(n, key, value)?),
            "VmSwap" => memory.vm_swap = Some(parse_kb(n, key, value)?),
            _ => {}
        }
    }
    if let Some(missing) = seen_required.iter().position(|seen| !seen) {
        return Err(ParseError::new(
            0,
            format!("no {} line: file truncated", REQUIRED[missing]),
        ));
    }
    Ok(status)
}

/// Reads /proc/PID/status.
pub fn read_status(pid: Pid) -> Result<Status, StatusError> {
    let text = std::fs::read_to_string(proc_path(pid, "status"))
        .map_err(|source| StatusError::Read { pid, source })?;
    parse_status(&text).map_err(|source| StatusError::Parse { pid, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat /proc/self/status` on the development machine, with a Groups list and a seccomp
    /// filter added to exercise those lines.
    const CAT_STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nTgid:\t4124\nNgid:\t0\nPid:\t4124\nPPid:\t4116\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t256\nGroups:\t 4 24 \nNStgid:\t4124\nNSpid:\t4124\nNSpgid:\t4116\nNSsid:\t2748\nKthread:\t0\nVmPeak:\t    3060 kB\nVmSize:\t    3060 kB\nVmLck:\t       0 kB\nVmPin:\t       0 kB\nVmHWM:\t    1600 kB\nVmRSS:\t    1600 kB\nRssAnon:\t     112 kB\nRssFile:\t    1488 kB\nRssShmem:\t       0 kB\nVmData:\t     360 kB\nVmStk:\t     132 kB\nVmExe:\t      20 kB\nVmLib:\t    1528 kB\nVmPTE:\t      48 kB\nVmSwap:\t       0 kB\nHugetlbPages:\t       0 kB\nCoreDumping:\t0\nTHP_enabled:\t1\nuntag_mask:\t0xffffffffffffffff\nThreads:\t1\nSigQ:\t0/96365\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000a00\nSigIgn:\t0000000000000000\nSigCgt:\t8000000000000000\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\nSpeculation_Store_Bypass:\tvulnerable\nSpeculationIndirectBranch:\talways enabled\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\nMems_allowed:\t00000000,00000001\nMems_allowed_list:\t0\nvoluntary_ctxt_switches:\t0\nnonvoluntary_ctxt_switches:\t0\n";

    #[test]
    fn parses_real_status() {
        let status = parse_status(CAT_STATUS).unwrap();
        assert_eq!(status.name, "cat");
        assert_eq!(status.umask, Some(0o022));
        assert_eq!(
            (status.tgid, status.pid, status.ppid, status.tracer_pid),
            (4124, 4124, 4116, 0)
        );
        assert_eq!(
            status.uid,
            Ids {
                real: 0,
                effective: 0,
                saved: 0,
                fs: 0
            }
        );
        assert_eq!(status.groups, vec![4, 24]);
        assert_eq!(status.ns_pid, vec![4124]);
        assert_eq!(status.ns_tgid, vec![4124]);
        assert_eq!(status.kthread, Some(false));
        assert_eq!(status.threads, 1);
        assert_eq!(status.sig_blk, 0xa00); // SIGUSR1 | SIGUSR2
        assert_eq!(status.sig_cgt, 1 << 63); // SIGRTMAX: the bit JavaScript numbers would lose
        assert_eq!(status.cap_eff, 0x1ff_feff_ffff);
        assert!(status.no_new_privs);
        assert_eq!(status.seccomp, SeccompMode::Filter);
        assert_eq!(status.seccomp_filters, 1);
        assert_eq!(status.memory.vm_rss, Some(1600 * 1024));
        assert_eq!(status.memory.vm_stk, Some(132 * 1024));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["sigCgt"], "0x8000000000000000");
        assert_eq!(json["seccomp"], "filter");
        assert_eq!(json["memory"]["vmRss"], 1600 * 1024);
    }

    #[test]
    fn nested_pid_namespace_and_odd_name() {
        let text = CAT_STATUS
            .replace("NSpid:\t4124", "NSpid:\t4124\t7\t1")
            .replace("Name:\tcat", "Name:\tmy: odd) name");
        let status = parse_status(&text).unwrap();
        assert_eq!(status.ns_pid, vec![4124, 7, 1]);
        assert_eq!(status.name, "my: odd) name");
    }

    #[test]
    fn kernel_thread_has_no_memory_lines() {
        let text: String = CAT_STATUS
            .lines()
            .filter(|l| !(l.starts_with("Vm") || l.starts_with("Rss")))
            .map(|l| format!("{l}\n"))
            .collect();
        let status = parse_status(&text).unwrap();
        assert_eq!(status.memory, MemoryCounters::default());
    }

    #[test]
    fn hostile_inputs_are_errors() {
        assert!(parse_status("").is_err());
        assert!(parse_status("Name:\tcat\n").is_err()); // truncated
        assert!(parse_status(&CAT_STATUS.replace("Uid:\t0\t0\t0\t0", "Uid:\t0\t0")).is_err());
        assert!(
            parse_status(&CAT_STATUS.replace("SigBlk:\t0000000000000a00", "SigBlk:\tzz")).is_err()
        );
        assert!(parse_status(&CAT_STATUS.replace("VmRSS:\t    1600 kB", "VmRSS:\t1600")).is_err());
        assert!(parse_status(&CAT_STATUS.replace("Threads:\t1", "Threads 1")).is_err());
    }

    #[test]
    fn reads_own_status() {
        let status = read_status(Pid::this()).unwrap();
        assert_eq!(status.tgid, Pid::this().as_raw());
        assert!(status.memory.vm_rss.is_some());
    }
}
