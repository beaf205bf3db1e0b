//! Socket tables: /proc/PID/net/{tcp,tcp6,udp,udp6,unix,netlink}, indexed by socket inode.
//!
//! An fd that is a socket only says `socket:[INODE]`; what the socket is comes from these tables,
//! matched by inode. They describe the network namespace of the process whose /proc directory
//! they are read from, so they are read under the TARGET's pid, never /proc/net (ours).
//!
//! Encoding (net/ipv4/tcp_ipv4.c, net/ipv6/tcp_ipv6.c, net/unix/af_unix.c):
//! - addresses are `ADDR:PORT` in hex. The port is in host order. The address is the raw
//!   `__be32` (IPv4) or four raw `__be32` words (IPv6) printed with `%08X` as native u32s, so on
//!   little-endian x86 each 32-bit word's bytes come out reversed: 127.0.0.1 is `0100007F`.
//! - `st` is the TCP state number (include/net/tcp_states.h); UDP uses 07 (close) for unconnected
//!   and 01 (established) for connected sockets.
//! - unix: `Num RefCount Protocol Flags Type St Inode Path`; Flags has __SO_ACCEPTCON (0x10000)
//!   for listeners, Type is SOCK_STREAM/DGRAM/SEQPACKET, St is the SS_* socket state, an abstract
//!   path starts with '@'.
//!
//! Only sockets the kernel has hashed appear in tcp/udp: a TCP socket that is created but not
//! yet listening or connected, is not there; [`super::fd`] falls back to the socket's protocol
//! name for those.

use super::{proc_path, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// TCP state as in include/net/tcp_states.h (also used, loosely, by UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SocketState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Unknown,
}

impl SocketState {
    pub fn from_code(code: u8) -> SocketState {
        match code {
            0x01 => SocketState::Established,
            0x02 => SocketState::SynSent,
            0x03 => SocketState::SynRecv,
            0x04 => SocketState::FinWait1,
            0x05 => SocketState::FinWait2,
            0x06 => SocketState::TimeWait,
            0x07 => SocketState::Close,
            0x08 => SocketState::CloseWait,
            0x09 => SocketState::LastAck,
            0x0A => SocketState::Listen,
            0x0B => SocketState::Closing,
            0x0C => SocketState::NewSynRecv,
            _ => SocketState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SocketState::Established => "established",
            SocketState::SynSent => "syn-sent",
            SocketState::SynRecv => "syn-recv",
            SocketState::FinWait1 => "fin-wait1",
            SocketState::FinWait2 => "fin-wait2",
            SocketState::TimeWait => "time-wait",
            SocketState::Close => "close",
            SocketState::CloseWait => "close-wait",
            SocketState::LastAck => "last-ack",
            SocketState::Listen => "listen",
            SocketState::Closing => "closing",
            SocketState::NewSynRecv => "new-syn-recv",
            SocketState::Unknown => "unknown",
        }
    }
}

/// An IP address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Dotted quad or RFC 5952 IPv6 text.
    pub address: IpAddr,
    pub port: u16,
}

/// A TCP or UDP socket as the tables show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InetSocket {
    /// None for a socket missing from the tables (created, not yet bound/listening/connected).
    pub local: Option<Endpoint>,
    pub remote: Option<Endpoint>,
    pub state: SocketState,
    pub tx_queue: u32,
    pub rx_queue: u32,
    pub uid: u32,
}

/// SOCK_* type of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnixType {
    Stream,
    Dgram,
    Seqpacket,
    Unknown,
}

/// SS_* state of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnixState {
    Unconnected,
    Connecting,
    Connected,
    Disconnecting,
    Unknown,
}

/// A unix domain socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnixSocket {
    #[serde(rename = "type")]
    pub socket_type: UnixType,
    pub state: UnixState,
    pub listening: bool,
    /// Bound path; abstract names start with '@'. None when unbound (e.g. socketpair).
    pub path: Option<String>,
}

/// Which table an inet socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InetTable {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
}

impl InetTable {
    pub const ALL: [InetTable; 4] = [
        InetTable::Tcp,
        InetTable::Tcp6,
        InetTable::Udp,
        InetTable::Udp6,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            InetTable::Tcp => "tcp",
            InetTable::Tcp6 => "tcp6",
            InetTable::Udp => "udp",
            InetTable::Udp6 => "udp6",
        }
    }
}

/// One socket found in the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableEntry {
    Inet(InetTable, InetSocket),
    Unix(UnixSocket),
    /// NETLINK_* protocol number (0 = NETLINK_ROUTE).
    Netlink(u32),
}

/// Every socket of a network namespace, by inode.
#[derive(Debug, Clone, Default)]
pub struct SocketTables {
    pub by_inode: HashMap<u64, TableEntry>,
}

/// Failure reading a socket table.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("reading /proc/{pid}/net/{table}: {source}")]
    Read {
        pid: Pid,
        table: &'static str,
        source: io::Error,
    },
    #[error("parsing /proc/{pid}/net/{table}: {source}")]
    Parse {
        pid: Pid,
        table: &'static str,
        source: ParseError,
    },
}

/// Decodes the `ADDR:PORT` of tcp/udp tables (8 hex digits for IPv4, 32 for IPv6).
pub fn parse_hex_endpoint(text: &str) -> Option<Endpoint> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each group of 8 hex digits is a u32 printed from the raw network-order bytes read as a
    // native integer: converting it back to native bytes restores network order.
    let word = |i: usize| -> Option<[u8; 4]> {
        let digits = address.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(digits, 16).ok()?.to_ne_bytes())
    };
    let address = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(Endpoint { address, port })
}

/// Parses a tcp/tcp6/udp/udp6 table into (inode, socket) pairs.
pub fn parse_inet_table(text: &str) -> Result<Vec<(u64, InetSocket)>, ParseError> {
    let mut sockets = Vec::new();
    // Line 1 is the column header.
    for (index, line) in text.lines().enumerate().skip(1) {
        let n = index + 1;
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        if fields.len() < 10 {
            return Err(ParseError::new(n, format!("truncated line {line:?}")));
        }
        let endpoint = |text: &str| {
            parse_hex_endpoint(text)
                .ok_or_else(|| ParseError::new(n, format!("bad address {text:?}")))
        };
        let local = endpoint(fields[1])?;
        let remote = endpoint(fields[2])?;
        let state = u8::from_str_radix(fields[3], 16)
            .map_err(|_| ParseError::new(n, format!("bad state {:?}", fields[3])))?;
        let (tx, rx) = fields[4]
            .split_once(':')
            .and_then(|(tx, rx)| {
                Some((
                    u32::from_str_radix(tx, 16).ok()?,
                    u32::from_str_radix(rx, 16).ok()?,
                ))
            })
            .ok_or_else(|| ParseError::new(n, format!("bad queues {:?}", fields[4])))?;
        let uid = fields[7]
            .parse::<u32>()
            .map_err(|_| ParseError::new(n, format!("bad uid {:?}", fields[7])))?;
        let inode = fields[9]
            .parse::<u64>()
            .map_err(|_| ParseError::new(n, format!("bad inode {:?}", fields[9])))?;
        let unspecified = remote.port == 0 && remote.address.is_unspecified();
        sockets.push((
            inode,
            InetSocket {
                local: Some(local),
                remote: (!unspecified).then_some(remote),
                state: SocketState::from_code(state),
                tx_queue: tx,
                rx_queue: rx,
                uid,
            },
        ));
    }
    Ok(sockets)
}

/// Parses /proc/PID/net/unix into (inode, socket) pairs.
pub fn parse_unix_table(text: &str) -> Result<Vec<(u64, UnixSocket)>, ParseError> {
    const SO_ACCEPTCON: u32 = 0x10000;
    let mut sockets = Vec::new();
    for (index, line) in text.lines().enumerate().skip(1) {
        let n = index + 1;
        // Num RefCount Protocol Flags Type St Inode [Path]; the path may contain spaces.
        let mut rest = line.trim_start();
        if rest.is_empty() {
            continue;
        }
        let mut fields = [""; 7];
        for field in &mut fields {
            rest = rest.trim_start_matches(' ');
            let end = rest.find(' ').unwrap_or(rest.len());
            if end == 0 {
                return Err(ParseError::new(n, format!("truncated line {line:?}")));
            }
            *field = &rest[..end];
            rest = &rest[end..];
        }
        let hex = |i: usize| {
            u32::from_str_radix(fields[i], 16)
                .map_err(|_| ParseError::new(n, format!("bad field {:?}", fields[i])))
        };
        let flags = hex(3)?;
        let socket_type = match hex(4)? as i32 {
            libc::SOCK_STREAM => UnixType::Stream,
            libc::SOCK_DGRAM => UnixType::Dgram,
            libc::SOCK_SEQPACKET => UnixType::Seqpacket,
            _ => UnixType::Unknown,
        };
        let state = match hex(5)? {
            1 => UnixState::Unconnected,
            2 => UnixState::Connecting,
            3 => UnixState::Connected,
            4 => UnixState::Disconnecting,
            _ => UnixState::Unknown,
        };
        let inode = fields[6]
            .parse::<u64>()
            .map_err(|_| ParseError::new(n, format!("bad inode {:?}", fields[6])))?;
        let path = rest
            .strip_prefix(' ')
            .filter(|p| !p.is_empty())
            .map(str::to_owned);
        sockets.push((
            inode,
            UnixSocket {
                socket_type,
                state,
                listening: flags & SO_ACCEPTCON != 0,
                path,
            },
        ));
    }
    Ok(sockets)
}

/// Parses /proc/PID/net/netlink into (inode, protocol) pairs.
pub fn parse_netlink_table(text: &str) -> Result<Vec<(u64, u32)>, ParseError> {
    let mut sockets = Vec::new();
    // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    for (index, line) in text.lines().enumerate().skip(1) {
        let n = index + 1;
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() < 10 {
            return Err(ParseError::new(n, format!("truncated line {line:?}")));
        }
        let protocol = fields[1]
            .parse::<u32>()
            .map_err(|_| ParseError::new(n, format!("bad protocol {:?}", fields[1])))?;
        let inode = fields[9]
            .parse::<u64>()
            .map_err(|_| ParseError::new(n, format!("bad inode {:?}", fields[9])))?;
        sockets.push((inode, protocol));
    }
    Ok(sockets)
}

/// Reads one table; a table this kernel does not have (built without IPv6) reads as empty.
fn read_table(pid: Pid, table: &'static str) -> Result<String, NetError> {
    match std::fs::read_to_string(proc_path(pid, &format!("net/{table}"))) {
        // The net directory itself still being there tells "no such table" from "process gone".
        Err(e) if e.kind() == io::ErrorKind::NotFound && proc_path(pid, "net").is_dir() => {
            Ok(String::new())
        }
        other => other.map_err(|source| NetError::Read { pid, table, source }),
    }
}

/// Reads every socket table of the network namespace `pid` lives in.
pub fn read_socket_tables(pid: Pid) -> Result<SocketTables, NetError> {
    let mut tables = SocketTables::default();
    for table in InetTable::ALL {
        let name = table.file_name();
        let text = read_table(pid, name)?;
        for (inode, socket) in parse_inet_table(&text).map_err(|source| NetError::Parse {
            pid,
            table: name,
            source,
        })? {
            tables
                .by_inode
                .insert(inode, TableEntry::Inet(table, socket));
        }
    }
    let text = read_table(pid, "unix")?;
    for (inode, socket) in parse_unix_table(&text).map_err(|source| NetError::Parse {
        pid,
        table: "unix",
        source,
    })? {
        tables.by_inode.insert(inode, TableEntry::Unix(socket));
    }
    let text = read_table(pid, "netlink")?;
    for (inode, protocol) in parse_netlink_table(&text).map_err(|source| NetError::Parse {
        pid,
        table: "netlink",
        source,
    })? {
        tables.by_inode.insert(inode, TableEntry::Netlink(protocol));
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from /proc/PID/net/* of tests/workloads/fd_zoo.c on the development machine.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode                                                     
   0: 0100007F:E9F5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9061 1 000000007d903b6a 100 0 0 10 0                      
   2: 020200C0:985A 507100CB:01BB 01 00000000:00000000 02:00000013 00000000     0        0 7786 2 00000000318be81b 20 4 28 148 -1                    
  17: 0100007F:DFEE 0100007F:E9F5 01 00000000:00000000 00:00000000 00000000     0        0 9062 1 00000000528a9a81 20 0 0 10 -1                      
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:E565 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9064 1 0000000013380e84 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            
  705: 0100007F:BF6A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9065 2 000000003860570c 0          
";
    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
000000006b4f6e40: 00000002 00000000 00010000 0005 01  9060 /tmp/zoo/sock
000000005bb6c5cd: 00000003 00000000 00000000 0001 03  9058
000000000eeef1fb: 00000003 00000000 00000000 0002 01  9070 @abstract name
";
    const NETLINK: &str =
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
000000006fb324d2 0   0          00000000 0        0        0     2        0        4       
00000000135cc025 4   0          00000000 0        0        0     2        0        1515    
";

    fn v4(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn decodes_addresses() {
        assert_eq!(
            parse_hex_endpoint("0100007F:E9F5"),
            Some(Endpoint {
                address: v4("127.0.0.1"),
                port: 59893
            })
        );
        assert_eq!(
            parse_hex_endpoint("020200C0:985A"),
            Some(Endpoint {
                address: v4("192.0.2.2"),
                port: 0x985A
            })
        );
        assert_eq!(
            parse_hex_endpoint("507100CB:01BB"),
            Some(Endpoint {
                address: v4("203.0.113.80"),
                port: 443
            })
        );
        assert_eq!(
            parse_hex_endpoint("00000000000000000000000001000000:E565"),
            Some(Endpoint {
                address: v4("::1"),
                port: 58725
            })
        );
        // 2001:db8::ff00:42:8329 and an IPv4-mapped ::ffff:10.0.0.1, encoded as the kernel does.
        assert_eq!(
            parse_hex_endpoint("B80D01200000000000FF000029834200:0050")
                .unwrap()
                .address,
            v4("2001:db8::ff00:42:8329")
        );
        assert_eq!(
            parse_hex_endpoint("0000000000000000FFFF00000100000A:0016")
                .unwrap()
                .address,
            v4("::ffff:10.0.0.1")
        );
        for bad in [
            "",
            "0100007F",
            "0100007F:",
            "0100007:0050",
            "0100007F:1FFFF",
            "zz00007F:0050",
        ] {
            assert_eq!(parse_hex_endpoint(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_tcp_tables() {
        let sockets = parse_inet_table(TCP).unwrap();
        assert_eq!(sockets.len(), 3);
        let (inode, listener) = &sockets[0];
        assert_eq!(*inode, 9061);
        assert_eq!(listener.state, SocketState::Listen);
        assert_eq!(
            listener.local,
            Some(Endpoint {
                address: v4("127.0.0.1"),
                port: 59893
            })
        );
        assert_eq!(listener.remote, None);
        let (_, client) = &sockets[2];
        assert_eq!(client.state, SocketState::Established);
        assert_eq!(
            client.remote,
            Some(Endpoint {
                address: v4("127.0.0.1"),
                port: 59893
            })
        );
        let six = parse_inet_table(TCP6).unwrap();
        assert_eq!(
            six[0].1.local,
            Some(Endpoint {
                address: v4("::1"),
                port: 58725
            })
        );
        let udp = parse_inet_table(UDP).unwrap();
        assert_eq!((udp[0].0, udp[0].1.state), (9065, SocketState::Close));
        assert!(parse_inet_table("header\n   0: 0100007F:E9F5 00000000:0000 0A\n").is_err());
        assert!(parse_inet_table("").unwrap().is_empty());
    }

    #[test]
    fn state_names() {
        let names: Vec<&str> = (1..=0x0B)
            .map(|c| SocketState::from_code(c).name())
            .collect();
        assert_eq!(
            names,
            [
                "established",
                "syn-sent",
                "syn-recv",
                "fin-wait1",
                "fin-wait2",
                "time-wait",
                "close",
                "close-wait",
                "last-ack",
                "listen",
                "closing"
            ]
        );
        assert_eq!(
            serde_json::to_value(SocketState::FinWait1).unwrap(),
            "fin-wait1"
        );
        assert_eq!(SocketState::from_code(0x42), SocketState::Unknown);
    }

    #[test]
    fn parses_unix_and_netlink_tables() {
        let unix = parse_unix_table(UNIX).unwrap();
        assert_eq!(unix.len(), 3);
        assert_eq!(
            unix[0],
            (
                9060,
                UnixSocket {
                    socket_type: UnixType::Seqpacket,
                    state: UnixState::Unconnected,
                    listening: true,
                    path: Some("/tmp/zoo/sock".into())
                }
            )
        );
        assert_eq!(unix[1].1.state, UnixState::Connected);
        assert_eq!(unix[1].1.path, None);
        assert_eq!(unix[2].1.socket_type, UnixType::Dgram);
        assert_eq!(unix[2].1.path.as_deref(), Some("@abstract name"));
        assert!(parse_unix_table("h\n000000006b4f6e40: 00000002 00000000\n").is_err());
        let netlink = parse_netlink_table(NETLINK).unwrap();
        assert_eq!(netlink, vec![(4, 0), (1515, 4)]);
    }

    #[test]
    fn reads_own_tables() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tables = read_socket_tables(Pid::this()).unwrap();
        let found = tables.by_inode.values().any(|entry| {
            matches!(entry, TableEntry::Inet(InetTable::Tcp, s)
                if s.state == SocketState::Listen && s.local.map(|l| l.port) == Some(port))
        });
        assert!(
            found,
            "our listener on port {port} is in /proc/self/net/tcp"
        );
    }
}
