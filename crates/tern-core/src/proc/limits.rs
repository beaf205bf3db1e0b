//! /proc/PID/limits: the process's resource limits (what getrlimit would return inside it).
//!
//! Format (fs/proc/base.c, proc_pid_limits): a header line, then one line per RLIMIT_* in
//! resource-number order: `%-25s %-20s %-20s %-10s` — name, soft, hard, unit — where a limit is a
//! decimal number or `unlimited` (RLIM_INFINITY) and the unit may be blank. Names contain spaces
//! but never digits, so a line is split at its first numeric-or-"unlimited" token. Reading the file
//! is enough for dump; prlimit(2) would need no parsing but is a write-capable call we do not need.

use super::{proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::io;

/// One resource limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rlimit {
    /// Short resource name as in prlimit(1): cpu, fsize, data, stack, core, rss, nproc, nofile,
    /// memlock, as, locks, sigpending, msgqueue, nice, rtprio, rttime (or the kernel's text for a
    /// resource this table does not know).
    pub resource: String,
    /// RLIMIT_* number, None for an unknown resource.
    pub number: Option<u32>,
    /// None = unlimited.
    pub soft: Option<u64>,
    /// None = unlimited.
    pub hard: Option<u64>,
    pub unit: Option<String>,
}

/// Failure reading /proc/PID/limits.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("reading /proc/{pid}/limits: {source}")]
    Read { pid: Pid, source: io::Error },
    #[error("parsing /proc/{pid}/limits: {source}")]
    Parse { pid: Pid, source: ParseError },
}

/// (kernel text, short name, RLIMIT_* number), in the kernel's order.
const RESOURCES: [(&str, &str, u32); 16] = [
    ("Max cpu time", "cpu", 0),
    ("Max file size", "fsize", 1),
    ("Max data size", "data", 2),
    ("Max stack size", "stack", 3),
    ("Max core file size", "core", 4),
    ("Max resident set", "rss", 5),
    ("Max processes", "nproc", 6),
    ("Max open files", "nofile", 7),
    ("Max locked memory", "memlock", 8),
    ("Max address space", "as", 9),
    ("Max file locks", "locks", 10),
    ("Max pending signals", "sigpending", 11),
    ("Max msgqueue size", "msgqueue", 12),
    ("Max nice priority", "nice", 13),
    ("Max realtime priority", "rtprio", 14),
    ("Max realtime timeout", "rttime", 15),
];

fn is_limit_token(token: &str) -> bool {
    token == "unlimited" || token.bytes().all(|b| b.is_ascii_digit())
}

fn parse_limit(n: usize, token: &str) -> Result<Option<u64>, ParseError> {
    if token == "unlimited" {
        return Ok(None);
    }
    token
        .parse()
        .map(Some)
        .map_err(|_| ParseError::new(n, format!("limit {token:?} is not a number")))
}

/// Parses the text of /proc/PID/limits.
pub fn parse_limits(text: &str) -> Result<Vec<Rlimit>, ParseError> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.starts_with("Limit") => {}
        _ => return Err(ParseError::new(1, "no 'Limit' header line")),
    }
    let mut limits = Vec::new();
    for (index, line) in lines {
        let n = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let tokens: Vec<&str> = line.split_ascii_whitespace().collect();
        let at = tokens
            .iter()
            .position(|t| is_limit_token(t))
            .filter(|at| *at > 0)
            .ok_or_else(|| ParseError::new(n, format!("no limit value in {line:?}")))?;
        let hard = tokens
            .get(at + 1)
            .ok_or_else(|| ParseError::new(n, format!("no hard limit in {line:?}")))?;
        let name = tokens[..at].join(" ");
        let known = RESOURCES.iter().find(|(text, _, _)| *text == name);
        let unit = tokens[at + 2..].join(" ");
        limits.push(Rlimit {
            resource: known.map_or(name.clone(), |(_, short, _)| (*short).to_owned()),
            number: known.map(|(_, _, number)| *number),
            soft: parse_limit(n, tokens[at])?,
            hard: parse_limit(n, hard)?,
            unit: (!unit.is_empty()).then_some(unit),
        });
    }
    Ok(limits)
}

/// Reads /proc/PID/limits.
pub fn read_limits(pid: Pid) -> Result<Vec<Rlimit>, LimitsError> {
    let text = std::fs::read_to_string(proc_path(pid, "limits"))
        .map_err(|source| LimitsError::Read { pid, source })?;
    parse_limits(&text).map_err(|source| LimitsError::Parse { pid, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat /proc/self/limits` on the development machine.
    const LIMITS: &str =
        "Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96365                96365                processes 
Max open files            20000                20000                files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       96365                96365                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
";

    #[test]
    fn parses_real_limits() {
        let limits = parse_limits(LIMITS).unwrap();
        assert_eq!(limits.len(), 16);
        for (i, limit) in limits.iter().enumerate() {
            assert_eq!(limit.number, Some(i as u32), "{limit:?} in kernel order");
        }
        assert_eq!(
            limits[3],
            Rlimit {
                resource: "stack".into(),
                number: Some(libc::RLIMIT_STACK),
                soft: Some(8388608),
                hard: None,
                unit: Some("bytes".into())
            }
        );
        assert_eq!(limits[7].resource, "nofile");
        assert_eq!((limits[7].soft, limits[7].hard), (Some(20000), Some(20000)));
        assert_eq!(limits[13].unit, None);
        assert_eq!(limits[0].soft, None);
    }

    #[test]
    fn hostile_inputs() {
        assert!(parse_limits("").is_err());
        assert!(parse_limits("garbage\n").is_err());
        assert!(parse_limits("Limit x\nMax cpu time\n").is_err());
        assert!(
            parse_limits("Limit x\nMax cpu time   unlimited\n").is_err(),
            "truncated"
        );
        assert!(parse_limits("Limit x\nMax cpu time   1 1x seconds\n").is_err());
        assert!(parse_limits("Limit x\n99999999999999999999999 1 1\n").is_err());
        let future = parse_limits("Limit x\nMax widgets   3 4 widgets\n").unwrap();
        assert_eq!(
            (future[0].resource.as_str(), future[0].number),
            ("Max widgets", None)
        );
    }

    #[test]
    fn reads_own_limits() {
        let limits = read_limits(Pid::this()).unwrap();
        let mut expected = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut expected) };
        assert_eq!(result, 0);
        let nofile = limits.iter().find(|l| l.resource == "nofile").unwrap();
        assert_eq!(nofile.soft, Some(expected.rlim_cur));
    }
}
