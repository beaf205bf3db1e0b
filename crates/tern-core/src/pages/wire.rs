//! The TERN page stream: the wire format pages travel in from source to destination.
//!
//! ```text
//! One TCP connection carries one stream of one migration. All integers little-endian.
//!
//!  source (PageSender)                                   destination (PageServer)
//!  ───────────────────                                   ────────────────────────
//!  HELLO (60 bytes) ─────────────────────────────────────▶
//!       0  magic          [8]  "TERNPAGE"
//!       8  version        u16  1
//!      10  flags          u16  0 (no flag defined; any set bit is refused)
//!      12  migration_id   [16]
//!      28  token          [32] per-migration secret, compared in constant time
//!                        ◀──────────────────────────────── HELLO REPLY (8 bytes)
//!                                                            0 magic   [4] "TPRY"
//!                                                            4 status  u16 (0 = OK; else a
//!                                                                      HelloStatus, then close)
//!                                                            6 version u16 server's version
//!  RECORD* ──────────────────────────────────────────────▶   each: 24-byte header + payload
//!       0  kind           u8   1 DATA, 2 ZERO, 3 END, 6 STATUS (4 REQUEST, 5 RESPONSE,
//!                              7 HOMED: post-copy pull only, see below; refused on a push
//!                              stream)
//!       1  reserved       u8   0
//!       2  reserved       u16  0
//!       4  page_count     u32  DATA/REQUEST/RESPONSE 1..=1024 (≤ 4 MiB), ZERO 1..=2^18,
//!                              END/STATUS/HOMED 0
//!       8  vaddr          u64  page-aligned; vaddr + page_count*4096 ≤ 2^47;
//!                              END/STATUS/HOMED 0
//!      16  payload_crc    u32  crc32c of the payload (0 for ZERO, REQUEST and HOMED)
//!      20  header_crc     u32  crc32c of header bytes 0..20
//!     payload: DATA/RESPONSE page_count*4096 bytes; ZERO/REQUEST/HOMED none; END 32 bytes;
//!              STATUS 32 bytes
//!  END ──────────────────────────────────────────────────▶   payload:
//!       0  data_pages u64 · 8 zero_pages u64 · 16 records u64 (DATA+ZERO) ·
//!      24  stream_crc u32 · 28 reserved u32 (0)
//!                        ◀──────────────────────────────── STATUS (record, then close)
//!                                                            payload:
//!                                                            0 code u32 (0 = committed)
//!                                                            4 stream_crc u32
//!                                                            8 data_pages u64 · 16 zero_pages
//!                                                            u64 · 24 records u64 (as counted
//!                                                            by the destination)
//! ```
//!
//! A post-copy PULL connection (see [`super::pull`]) runs the other way round: the destination
//! connects to the source's page source and asks for pages.
//!
//! ```text
//!  destination (RemotePages)                             source (PageSourceServer)
//!  HELLO (60 bytes, as above) ──────────────────────────▶
//!                        ◀──────────────────────────────── HELLO REPLY (8 bytes, as above)
//!  REQUEST* ─────────────────────────────────────────────▶   kind 4, header only: page_count
//!                                                            1..=1024, vaddr page-aligned and
//!                                                            in range, payload_crc 0. May be
//!                                                            pipelined (sent before earlier
//!                                                            ones are answered).
//!                        ◀──────────────────────────────── RESPONSE per REQUEST, in request
//!                                                            order: kind 5, the same vaddr and
//!                                                            page_count, payload page_count*4096
//!                                                            bytes, payload_crc crc32c
//!                        ◀──────────────────────────────── or STATUS (code ≠ 0) and close: the
//!                                                            request was refused (malformed,
//!                                                            NOT_SERVED: outside the pages of
//!                                                            this migration; SOURCE_READ: the
//!                                                            source could not read them), or
//!                                                            the server is shutting down
//!  close ────────────────────────────────────────────────▶   (no END: a pull connection ends
//!                                                            when the destination is done)
//!
//!  once every page is home (the process no longer needs the source), on a pull connection:
//!  HOMED ────────────────────────────────────────────────▶   kind 7, header only: page_count 0,
//!                                                            vaddr 0, payload_crc 0 (validated
//!                                                            like the others; after any
//!                                                            REQUESTs still unanswered)
//!                        ◀──────────────────────────────── STATUS code 0 (OK), the totals served
//!                                                            on this connection (records,
//!                                                            data_pages; stream_crc 0), then
//!                                                            both close. From then on the source
//!                                                            reports "homed": the original must
//!                                                            never resume (super::pull).
//! ```
//!
//! A pull connection has no rolling checksum and no END: every RESPONSE is matched against the
//! REQUEST it answers (same address and count, in order), each header and payload carries its own
//! crc32c, and nothing is kept from a connection that broke except the responses already
//! received whole and verified.
//!
//! stream_crc is a rolling crc32c: seeded with crc32c(HELLO bytes), then extended by bytes 0..20
//! of every DATA and ZERO record header in order (END's header excluded; header_crc excluded, see
//! [`roll`]). Each header carries its payload's
//! crc, so the chain covers every byte, binds the records to this hello, and catches a lost,
//! duplicated or reordered record, which END's counts alone would not.
//!
//! Why crc32c (Castagnoli, the `crc32c` crate): x86_64 has an instruction for it (SSE4.2
//! `crc32`), which the crate uses with three interleaved streams: it costs far less than the copy
//! the bytes already take, on both ends. It detects the same error classes as CRC-32/IEEE
//! (`crc32fast`, which needs PCLMUL folding to be fast) with a better Hamming distance at our
//! record sizes, and it is what iSCSI, ext4 and SCTP chose for the same job. It is an integrity
//! check against corruption and bugs, not a MAC: authenticity rests on the token and the
//! network (lab namespaces, or a tunnel between hosts).
//!
//! Rules of the destination: everything is validated before use; the pages of a connection are
//! staged in a fresh store and handed over only after a valid END (any error drops the stage:
//! a broken stream is never half-applied). On an error it sends a STATUS with the error code
//! (best effort: the source may be mid-write and see only a reset) and closes.

use super::store::USER_ADDR_LIMIT;
use super::PAGE_SIZE;
use std::fmt;
use std::io::{self, Read};

pub const MAGIC: [u8; 8] = *b"TERNPAGE";
pub const REPLY_MAGIC: [u8; 4] = *b"TPRY";
pub const VERSION: u16 = 1;
pub const HELLO_LEN: usize = 60;
pub const HELLO_REPLY_LEN: usize = 8;
pub const HEADER_LEN: usize = 24;
pub const END_LEN: usize = 32;
pub const STATUS_LEN: usize = 32;
/// Largest DATA record: 1024 pages = 4 MiB.
pub const MAX_DATA_PAGES: u32 = 1024;
/// Largest ZERO record: 2^18 pages = 1 GiB of address space (no payload).
pub const MAX_ZERO_PAGES: u32 = 1 << 18;

const PAGE: u64 = PAGE_SIZE as u64;

pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Extends the rolling stream checksum by one record header: bytes 0..20 only. (Not the header
/// checksum: a block followed by its own CRC leaves the CRC register in a state that does not
/// depend on the block's content, so including it would make the chain blind to the records.)
pub fn roll(stream_crc: u32, header: &[u8; HEADER_LEN]) -> u32 {
    crc32c_append(stream_crc, &header[..20])
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reading a hex id or token failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {digits} hex digits (dashes allowed), got {got:?}")]
pub struct ParseHexError {
    what: &'static str,
    digits: usize,
    got: String,
}

/// The 16-byte id of a migration (a UUID's bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// 32 hex digits, dashes ignored (a UUID string works).
    pub fn from_hex(s: &str) -> Result<MigrationId, ParseHexError> {
        parse_hex(s).map(MigrationId).ok_or_else(|| ParseHexError {
            what: "a migration id",
            digits: 32,
            got: s.to_owned(),
        })
    }
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({})", self.to_hex())
    }
}

/// The 32-byte per-migration secret. Never printed; compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub [u8; 32]);

impl Token {
    /// 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Token, ParseHexError> {
        parse_hex(s).map(Token).ok_or_else(|| ParseHexError {
            what: "a page stream token",
            digits: 64,
            got: format!("<{} characters>", s.len()),
        })
    }
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
    /// 32 bytes from the kernel's CSPRNG (getrandom(2)).
    pub fn generate() -> io::Result<Token> {
        let mut t = [0u8; 32];
        let mut filled = 0;
        while filled < t.len() {
            // SAFETY: the pointer and length describe the unfilled tail of `t`, which we own
            // mutably; getrandom writes at most that many bytes.
            let n =
                unsafe { libc::getrandom(t[filled..].as_mut_ptr().cast(), t.len() - filled, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(Token(t))
    }
    /// Constant-time equality: the time taken does not depend on where the tokens differ.
    pub fn ct_eq(&self, other: &Token) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Constant-time comparison of equal-length byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// The first 60 bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub flags: u16,
    pub migration_id: MigrationId,
    pub token: Token,
}

/// What the server answers to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloStatus {
    Ok,
    BadMagic,
    UnsupportedVersion,
    UnknownFlags,
    UnknownMigration,
    BadToken,
    Busy,
    ShuttingDown,
    Other(u16),
}

impl HelloStatus {
    pub fn code(self) -> u16 {
        match self {
            HelloStatus::Ok => 0,
            HelloStatus::BadMagic => 1,
            HelloStatus::UnsupportedVersion => 2,
            HelloStatus::UnknownFlags => 3,
            HelloStatus::UnknownMigration => 4,
            HelloStatus::BadToken => 5,
            HelloStatus::Busy => 6,
            HelloStatus::ShuttingDown => 7,
            HelloStatus::Other(c) => c,
        }
    }
    pub fn from_code(c: u16) -> HelloStatus {
        match c {
            0 => HelloStatus::Ok,
            1 => HelloStatus::BadMagic,
            2 => HelloStatus::UnsupportedVersion,
            3 => HelloStatus::UnknownFlags,
            4 => HelloStatus::UnknownMigration,
            5 => HelloStatus::BadToken,
            6 => HelloStatus::Busy,
            7 => HelloStatus::ShuttingDown,
            c => HelloStatus::Other(c),
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            HelloStatus::Ok => "accepted",
            HelloStatus::BadMagic => "not a TERN page stream (bad magic)",
            HelloStatus::UnsupportedVersion => "unsupported protocol version",
            HelloStatus::UnknownFlags => "unknown hello flags",
            HelloStatus::UnknownMigration => "no such migration at this page server",
            HelloStatus::BadToken => "wrong token for this migration",
            HelloStatus::Busy => "page server has too many connections",
            HelloStatus::ShuttingDown => "page server is shutting down",
            HelloStatus::Other(_) => "unknown refusal code",
        }
    }
}

impl fmt::Display for HelloStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.describe(), self.code())
    }
}

/// Why a hello was refused (by the decoder: the server answers with the matching status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("hello: bad magic {0:02x?} (expected \"TERNPAGE\")")]
    BadMagic([u8; 8]),
    #[error("hello: protocol version {0} not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("hello: unknown flags {0:#06x}")]
    UnknownFlags(u16),
}

impl HelloError {
    pub fn status(&self) -> HelloStatus {
        match self {
            HelloError::BadMagic(_) => HelloStatus::BadMagic,
            HelloError::UnsupportedVersion(_) => HelloStatus::UnsupportedVersion,
            HelloError::UnknownFlags(_) => HelloStatus::UnknownFlags,
        }
    }
}

impl Hello {
    pub fn new(migration_id: MigrationId, token: Token) -> Hello {
        Hello {
            version: VERSION,
            flags: 0,
            migration_id,
            token,
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..28].copy_from_slice(&self.migration_id.0);
        b[28..60].copy_from_slice(&self.token.0);
        b
    }

    /// Checks magic, version and flags. Migration id and token are the server's business.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        let magic: [u8; 8] = b[0..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(HelloError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(HelloError::UnsupportedVersion(version));
        }
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags != 0 {
            return Err(HelloError::UnknownFlags(flags));
        }
        Ok(Hello {
            version,
            flags,
            migration_id: MigrationId(b[12..28].try_into().expect("16 bytes")),
            token: Token(b[28..60].try_into().expect("32 bytes")),
        })
    }
}

pub fn encode_hello_reply(status: HelloStatus) -> [u8; HELLO_REPLY_LEN] {
    let mut b = [0u8; HELLO_REPLY_LEN];
    b[0..4].copy_from_slice(&REPLY_MAGIC);
    b[4..6].copy_from_slice(&status.code().to_le_bytes());
    b[6..8].copy_from_slice(&VERSION.to_le_bytes());
    b
}

/// `None` if the reply does not start with the reply magic.
pub fn decode_hello_reply(b: &[u8; HELLO_REPLY_LEN]) -> Option<(HelloStatus, u16)> {
    (b[0..4] == REPLY_MAGIC).then(|| {
        (
            HelloStatus::from_code(u16::from_le_bytes([b[4], b[5]])),
            u16::from_le_bytes([b[6], b[7]]),
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Data = 1,
    Zero = 2,
    End = 3,
    /// Post-copy pull: the destination asks for pages (header only).
    Request = 4,
    /// Post-copy pull: the source's answer to one REQUEST (the pages).
    Response = 5,
    /// Destination → source: the outcome of a stream (and the source's answer to a refused
    /// REQUEST or to HOMED on a pull connection).
    Status = 6,
    /// Post-copy pull: the destination has every page home and tells the source (header only).
    Homed = 7,
}

impl Kind {
    pub fn from_u8(k: u8) -> Option<Kind> {
        Some(match k {
            1 => Kind::Data,
            2 => Kind::Zero,
            3 => Kind::End,
            4 => Kind::Request,
            5 => Kind::Response,
            6 => Kind::Status,
            7 => Kind::Homed,
            _ => return None,
        })
    }
}

/// A record header as it travels (24 bytes; the header checksum is computed on encode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub page_count: u32,
    pub vaddr: u64,
    pub payload_crc: u32,
}

/// Why a received record (or the stream as a whole) was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading the page stream failed")]
    Io(#[source] io::Error),
    #[error(
        "page stream truncated: connection ended after {got} of {want} bytes of a record {part}"
    )]
    Truncated {
        part: &'static str,
        got: usize,
        want: usize,
    },
    #[error("page stream ended without an END record")]
    MissingEnd,
    #[error(
        "record header checksum mismatch: header says {expected:#010x}, bytes give {actual:#010x}"
    )]
    HeaderChecksum { expected: u32, actual: u32 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record kind {0:?} is not allowed on this stream")]
    UnexpectedKind(Kind),
    #[error("{kind:?} record has non-zero reserved bytes ({value:#x})")]
    ReservedNonZero { kind: Kind, value: u32 },
    #[error("{kind:?} record has page count {count} (allowed {min}..={max})")]
    PageCount {
        kind: Kind,
        count: u32,
        min: u32,
        max: u32,
    },
    #[error("{kind:?} record address {vaddr:#x} is not page-aligned")]
    Unaligned { kind: Kind, vaddr: u64 },
    #[error("{kind:?} record: {pages} page(s) at {vaddr:#x} reach past the user address space ({USER_ADDR_LIMIT:#x})")]
    OutOfRange { kind: Kind, vaddr: u64, pages: u32 },
    #[error("{kind:?} record must have vaddr 0, got {vaddr:#x}")]
    NonZeroVaddr { kind: Kind, vaddr: u64 },
    #[error("{kind:?} record at {vaddr:#x}: payload checksum mismatch: header says {expected:#010x}, payload gives {actual:#010x}")]
    PayloadChecksum {
        kind: Kind,
        vaddr: u64,
        expected: u32,
        actual: u32,
    },
    #[error("ZERO record at {vaddr:#x} carries a payload checksum {crc:#010x} (must be 0)")]
    ZeroWithChecksum { vaddr: u64, crc: u32 },
    #[error("REQUEST record at {vaddr:#x} carries a payload checksum {crc:#010x} (must be 0)")]
    RequestWithChecksum { vaddr: u64, crc: u32 },
    #[error("HOMED record carries a payload checksum {crc:#010x} (must be 0)")]
    HomedWithChecksum { crc: u32 },
    #[error("END record's reserved field is {0:#x} (must be 0)")]
    EndReserved(u32),
    #[error(
        "END totals disagree on {what}: sender says {sender:#x}, receiver counted {receiver:#x}"
    )]
    EndMismatch {
        what: &'static str,
        sender: u64,
        receiver: u64,
    },
    #[error("storing a validated record failed")]
    Store(#[from] super::store::StoreError),
}

/// Codes carried by STATUS records (and what `RecordError` maps to).
pub mod status {
    pub const OK: u32 = 0;
    pub const IO: u32 = 1;
    pub const TRUNCATED: u32 = 2;
    pub const HEADER_CHECKSUM: u32 = 3;
    pub const UNKNOWN_KIND: u32 = 4;
    pub const UNEXPECTED_KIND: u32 = 5;
    pub const MALFORMED_HEADER: u32 = 6;
    pub const BAD_RANGE: u32 = 7;
    pub const PAYLOAD_CHECKSUM: u32 = 8;
    pub const END_MISMATCH: u32 = 9;
    pub const SHUTTING_DOWN: u32 = 10;
    pub const INTERNAL: u32 = 11;
    /// Pull: a REQUEST for pages outside the ones this migration's page source serves.
    pub const NOT_SERVED: u32 = 12;
    /// Pull: the page source could not read the requested pages of the process.
    pub const SOURCE_READ: u32 = 13;

    pub fn describe(code: u32) -> &'static str {
        match code {
            OK => "committed",
            IO => "destination could not read the stream",
            TRUNCATED => "stream truncated",
            HEADER_CHECKSUM => "record header checksum mismatch",
            UNKNOWN_KIND => "unknown record kind",
            UNEXPECTED_KIND => "record kind not allowed on this stream",
            MALFORMED_HEADER => "malformed record header",
            BAD_RANGE => "record address or page count out of range",
            PAYLOAD_CHECKSUM => "payload checksum mismatch",
            END_MISMATCH => "END totals do not match what the destination received",
            SHUTTING_DOWN => "page server shutting down",
            INTERNAL => "page server internal error",
            NOT_SERVED => "pages requested outside the ones this page source serves",
            SOURCE_READ => "the page source could not read the process's memory",
            _ => "unknown status code",
        }
    }
}

impl RecordError {
    pub fn status_code(&self) -> u32 {
        use status::*;
        match self {
            RecordError::Io(_) => IO,
            RecordError::Truncated { .. } | RecordError::MissingEnd => TRUNCATED,
            RecordError::HeaderChecksum { .. } => HEADER_CHECKSUM,
            RecordError::UnknownKind(_) => UNKNOWN_KIND,
            RecordError::UnexpectedKind(_) => UNEXPECTED_KIND,
            RecordError::ReservedNonZero { .. }
            | RecordError::NonZeroVaddr { .. }
            | RecordError::ZeroWithChecksum { .. }
            | RecordError::RequestWithChecksum { .. }
            | RecordError::HomedWithChecksum { .. }
            | RecordError::EndReserved(_) => MALFORMED_HEADER,
            RecordError::PageCount { .. }
            | RecordError::Unaligned { .. }
            | RecordError::OutOfRange { .. } => BAD_RANGE,
            RecordError::PayloadChecksum { .. } => PAYLOAD_CHECKSUM,
            RecordError::EndMismatch { .. } => END_MISMATCH,
            RecordError::Store(_) => INTERNAL,
        }
    }
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[4..8].copy_from_slice(&self.page_count.to_le_bytes());
        b[8..16].copy_from_slice(&self.vaddr.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_crc.to_le_bytes());
        let hc = crc32c(&b[..20]);
        b[20..24].copy_from_slice(&hc.to_le_bytes());
        b
    }

    /// Checks the header checksum, the kind and the reserved bytes; nothing kind-specific
    /// (see [`RecordHeader::validate`]).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<RecordHeader, RecordError> {
        let expected = u32::from_le_bytes(b[20..24].try_into().expect("4"));
        let actual = crc32c(&b[..20]);
        if expected != actual {
            return Err(RecordError::HeaderChecksum { expected, actual });
        }
        let kind = Kind::from_u8(b[0]).ok_or(RecordError::UnknownKind(b[0]))?;
        let reserved = u32::from_le_bytes(b[0..4].try_into().expect("4")) >> 8;
        if reserved != 0 {
            return Err(RecordError::ReservedNonZero {
                kind,
                value: reserved,
            });
        }
        Ok(RecordHeader {
            kind,
            page_count: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            vaddr: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            payload_crc: u32::from_le_bytes(b[16..20].try_into().expect("4")),
        })
    }

    /// Kind-specific checks of everything in the header (before reading any payload).
    pub fn validate(&self) -> Result<(), RecordError> {
        let kind = self.kind;
        let (min, max) = match kind {
            Kind::Data | Kind::Request | Kind::Response => (1, MAX_DATA_PAGES),
            Kind::Zero => (1, MAX_ZERO_PAGES),
            Kind::End | Kind::Status | Kind::Homed => (0, 0),
        };
        if self.page_count < min || self.page_count > max {
            return Err(RecordError::PageCount {
                kind,
                count: self.page_count,
                min,
                max,
            });
        }
        match kind {
            Kind::Data | Kind::Zero | Kind::Request | Kind::Response => {
                if self.vaddr & (PAGE - 1) != 0 {
                    return Err(RecordError::Unaligned {
                        kind,
                        vaddr: self.vaddr,
                    });
                }
                let end = self.vaddr.checked_add(u64::from(self.page_count) * PAGE);
                if !matches!(end, Some(e) if e <= USER_ADDR_LIMIT) {
                    return Err(RecordError::OutOfRange {
                        kind,
                        vaddr: self.vaddr,
                        pages: self.page_count,
                    });
                }
                if kind == Kind::Zero && self.payload_crc != 0 {
                    return Err(RecordError::ZeroWithChecksum {
                        vaddr: self.vaddr,
                        crc: self.payload_crc,
                    });
                }
                if kind == Kind::Request && self.payload_crc != 0 {
                    return Err(RecordError::RequestWithChecksum {
                        vaddr: self.vaddr,
                        crc: self.payload_crc,
                    });
                }
            }
            Kind::End | Kind::Status | Kind::Homed => {
                if self.vaddr != 0 {
                    return Err(RecordError::NonZeroVaddr {
                        kind,
                        vaddr: self.vaddr,
                    });
                }
                if kind == Kind::Homed && self.payload_crc != 0 {
                    return Err(RecordError::HomedWithChecksum {
                        crc: self.payload_crc,
                    });
                }
            }
        }
        Ok(())
    }

    /// Payload bytes that follow this header.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Data | Kind::Response => self.page_count as usize * PAGE_SIZE,
            Kind::End => END_LEN,
            Kind::Status => STATUS_LEN,
            Kind::Zero | Kind::Request | Kind::Homed => 0,
        }
    }

    /// Checks the crc32c of the payload read after this header (`actual`) against the one the
    /// header carries.
    fn check_payload(&self, actual: u32) -> Result<(), RecordError> {
        if actual != self.payload_crc {
            return Err(RecordError::PayloadChecksum {
                kind: self.kind,
                vaddr: self.vaddr,
                expected: self.payload_crc,
                actual,
            });
        }
        Ok(())
    }
}

/// The totals an END record carries (and a STATUS echoes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndTotals {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub records: u64,
    pub stream_crc: u32,
}

impl EndTotals {
    pub fn encode(&self) -> [u8; END_LEN] {
        let mut b = [0u8; END_LEN];
        b[0..8].copy_from_slice(&self.data_pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.zero_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.records.to_le_bytes());
        b[24..28].copy_from_slice(&self.stream_crc.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; END_LEN]) -> Result<EndTotals, RecordError> {
        let reserved = u32::from_le_bytes(b[28..32].try_into().expect("4"));
        if reserved != 0 {
            return Err(RecordError::EndReserved(reserved));
        }
        Ok(EndTotals {
            data_pages: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            zero_pages: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            records: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            stream_crc: u32::from_le_bytes(b[24..28].try_into().expect("4")),
        })
    }
    /// The END record (header + payload).
    pub fn encode_record(&self) -> Vec<u8> {
        let payload = self.encode();
        let h = RecordHeader {
            kind: Kind::End,
            page_count: 0,
            vaddr: 0,
            payload_crc: crc32c(&payload),
        };
        [&h.encode()[..], &payload[..]].concat()
    }
}

/// The STATUS record the destination sends to end a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub totals: EndTotals,
}

impl Status {
    pub fn encode_record(&self) -> [u8; HEADER_LEN + STATUS_LEN] {
        let mut p = [0u8; STATUS_LEN];
        p[0..4].copy_from_slice(&self.code.to_le_bytes());
        p[4..8].copy_from_slice(&self.totals.stream_crc.to_le_bytes());
        p[8..16].copy_from_slice(&self.totals.data_pages.to_le_bytes());
        p[16..24].copy_from_slice(&self.totals.zero_pages.to_le_bytes());
        p[24..32].copy_from_slice(&self.totals.records.to_le_bytes());
        let h = RecordHeader {
            kind: Kind::Status,
            page_count: 0,
            vaddr: 0,
            payload_crc: crc32c(&p),
        };
        let mut out = [0u8; HEADER_LEN + STATUS_LEN];
        out[..HEADER_LEN].copy_from_slice(&h.encode());
        out[HEADER_LEN..].copy_from_slice(&p);
        out
    }

    /// Reads one STATUS record (the source side, after END or after a failed write).
    pub fn read_from(r: &mut impl Read) -> Result<Status, RecordError> {
        let mut hb = [0u8; HEADER_LEN];
        read_part(r, &mut hb, "header", true)?;
        let h = RecordHeader::decode(&hb)?;
        if h.kind != Kind::Status {
            return Err(RecordError::UnexpectedKind(h.kind));
        }
        h.validate()?;
        Status::read_payload(r, &h)
    }

    /// The payload of the STATUS record whose validated header is `h`, checked against its
    /// checksum.
    fn read_payload(r: &mut impl Read, h: &RecordHeader) -> Result<Status, RecordError> {
        let mut p = [0u8; STATUS_LEN];
        read_part(r, &mut p, "payload", false)?;
        h.check_payload(crc32c(&p))?;
        Ok(Status {
            code: u32::from_le_bytes(p[0..4].try_into().expect("4")),
            totals: EndTotals {
                stream_crc: u32::from_le_bytes(p[4..8].try_into().expect("4")),
                data_pages: u64::from_le_bytes(p[8..16].try_into().expect("8")),
                zero_pages: u64::from_le_bytes(p[16..24].try_into().expect("8")),
                records: u64::from_le_bytes(p[24..32].try_into().expect("8")),
            },
        })
    }
}

/// Reads until `buf` is full or EOF; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `read_full` with truncation as an error; a clean EOF before the first byte of a header is
/// [`RecordError::MissingEnd`] when `boundary` (the stream stopped between records).
fn read_part(
    r: &mut impl Read,
    buf: &mut [u8],
    part: &'static str,
    boundary: bool,
) -> Result<(), RecordError> {
    let got = read_full(r, buf).map_err(RecordError::Io)?;
    match got {
        n if n == buf.len() => Ok(()),
        0 if boundary => Err(RecordError::MissingEnd),
        got => Err(RecordError::Truncated {
            part,
            got,
            want: buf.len(),
        }),
    }
}

/// One validated record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Data {
        vaddr: u64,
        data: &'a [u8],
    },
    Zero {
        vaddr: u64,
        count: u64,
    },
    /// The stream's END, already checked against what was received.
    End(EndTotals),
}

/// The destination's decoder of a push stream (after the hello): reads, validates and counts
/// records, and checks END against its own count and rolling checksum.
#[derive(Debug)]
pub struct RecordReader<R> {
    r: R,
    totals: EndTotals,
    wire_bytes: u64,
    ended: bool,
}

impl<R: Read> RecordReader<R> {
    /// `hello` is the 60 hello bytes as received (they seed the rolling checksum).
    pub fn new(r: R, hello: &[u8; HELLO_LEN]) -> RecordReader<R> {
        RecordReader {
            r,
            totals: EndTotals {
                stream_crc: crc32c(hello),
                ..EndTotals::default()
            },
            wire_bytes: HELLO_LEN as u64,
            ended: false,
        }
    }

    /// What has been received so far (stream_crc = the rolling checksum).
    pub fn totals(&self) -> EndTotals {
        self.totals
    }

    /// Bytes read from the wire so far, hello included.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// The next record; DATA payload is read into `buf` (resized as needed). After END, no
    /// more records are read.
    pub fn next_record<'b>(&mut self, buf: &'b mut Vec<u8>) -> Result<Record<'b>, RecordError> {
        assert!(!self.ended, "next_record after END");
        let mut hb = [0u8; HEADER_LEN];
        read_part(&mut self.r, &mut hb, "header", true)?;
        self.wire_bytes += HEADER_LEN as u64;
        let h = RecordHeader::decode(&hb)?;
        // A push stream carries DATA, ZERO and END only: refuse the rest before looking further.
        if !matches!(h.kind, Kind::Data | Kind::Zero | Kind::End) {
            return Err(RecordError::UnexpectedKind(h.kind));
        }
        h.validate()?;
        let len = h.payload_len();
        match h.kind {
            Kind::Data | Kind::End => {}
            Kind::Zero => {
                self.totals.stream_crc = roll(self.totals.stream_crc, &hb);
                self.totals.records += 1;
                self.totals.zero_pages += u64::from(h.page_count);
                return Ok(Record::Zero {
                    vaddr: h.vaddr,
                    count: u64::from(h.page_count),
                });
            }
            other => return Err(RecordError::UnexpectedKind(other)),
        }
        buf.resize(len, 0);
        let actual = read_payload_crc(&mut self.r, buf)?;
        self.wire_bytes += len as u64;
        h.check_payload(actual)?;
        if h.kind == Kind::End {
            let sent = EndTotals::decode(buf[..END_LEN].try_into().expect("END_LEN"))?;
            let got = self.totals;
            for (what, s, r) in [
                ("data pages", sent.data_pages, got.data_pages),
                ("zero pages", sent.zero_pages, got.zero_pages),
                ("records", sent.records, got.records),
                (
                    "stream checksum",
                    u64::from(sent.stream_crc),
                    u64::from(got.stream_crc),
                ),
            ] {
                if s != r {
                    return Err(RecordError::EndMismatch {
                        what,
                        sender: s,
                        receiver: r,
                    });
                }
            }
            self.ended = true;
            return Ok(Record::End(got));
        }
        self.totals.stream_crc = roll(self.totals.stream_crc, &hb);
        self.totals.records += 1;
        self.totals.data_pages += u64::from(h.page_count);
        Ok(Record::Data {
            vaddr: h.vaddr,
            data: &buf[..],
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Post-copy pull: REQUEST and RESPONSE (see the module header and `super::pull`)
// ---------------------------------------------------------------------------------------------

/// One validated REQUEST: `page_count` pages (1..=[`MAX_DATA_PAGES`]) from `vaddr`
/// (page-aligned, inside the user address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRequest {
    vaddr: u64,
    page_count: u32,
}

impl PageRequest {
    /// Checks the request as the source will (alignment, count, address range).
    pub fn new(vaddr: u64, page_count: u32) -> Result<PageRequest, RecordError> {
        RecordHeader {
            kind: Kind::Request,
            page_count,
            vaddr,
            payload_crc: 0,
        }
        .validate()?;
        Ok(PageRequest { vaddr, page_count })
    }

    pub fn vaddr(&self) -> u64 {
        self.vaddr
    }

    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// Bytes of the pages asked for (and of the RESPONSE payload).
    pub fn len(&self) -> u64 {
        u64::from(self.page_count) * PAGE
    }

    /// Never true (a request asks for at least one page); for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.page_count == 0
    }

    /// One past the last byte asked for.
    pub fn end(&self) -> u64 {
        self.vaddr + self.len()
    }

    /// The 24-byte REQUEST record.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        RecordHeader {
            kind: Kind::Request,
            page_count: self.page_count,
            vaddr: self.vaddr,
            payload_crc: 0,
        }
        .encode()
    }

    /// The RESPONSE header for `payload` (the pages asked for, `self.len()` bytes).
    pub fn response_header(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        debug_assert_eq!(payload.len() as u64, self.len());
        RecordHeader {
            kind: Kind::Response,
            page_count: self.page_count,
            vaddr: self.vaddr,
            payload_crc: crc32c(payload),
        }
        .encode()
    }
}

/// The 24-byte HOMED record: the destination has every page home (see the module header).
pub fn encode_homed() -> [u8; HEADER_LEN] {
    RecordHeader {
        kind: Kind::Homed,
        page_count: 0,
        vaddr: 0,
        payload_crc: 0,
    }
    .encode()
}

/// What the destination sends on a pull connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRecord {
    Request(PageRequest),
    /// Every page is home: answer with an OK STATUS and close.
    Homed,
}

/// The source side of a pull connection: the next REQUEST or HOMED, validated. `Ok(None)` when
/// the destination closed the connection between records (its normal way to end). Any other
/// kind of record is refused ([`RecordError::UnexpectedKind`]).
pub fn read_pull_record(r: &mut impl Read) -> Result<Option<PullRecord>, RecordError> {
    let mut hb = [0u8; HEADER_LEN];
    match read_full(r, &mut hb).map_err(RecordError::Io)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        got => {
            return Err(RecordError::Truncated {
                part: "header",
                got,
                want: HEADER_LEN,
            })
        }
    }
    let h = RecordHeader::decode(&hb)?;
    if !matches!(h.kind, Kind::Request | Kind::Homed) {
        return Err(RecordError::UnexpectedKind(h.kind));
    }
    h.validate()?;
    Ok(Some(match h.kind {
        Kind::Homed => PullRecord::Homed,
        _ => PullRecord::Request(PageRequest {
            vaddr: h.vaddr,
            page_count: h.page_count,
        }),
    }))
}

/// What the source answered on a pull connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A verified RESPONSE; its pages are in the caller's buffer. The caller still checks that it
    /// answers the request it sent (address, count, order).
    Response { vaddr: u64, page_count: u32 },
    /// A verified STATUS: the source refused and closes the connection.
    Status(Status),
}

/// The destination side of a pull connection: the next RESPONSE (payload read into `buf`, which
/// is resized to exactly the payload; capacity is reused) or STATUS, every byte checked. A
/// connection that ends, even between records, is an error here: an answer was due.
pub fn read_reply(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Reply, RecordError> {
    let mut hb = [0u8; HEADER_LEN];
    read_part(r, &mut hb, "header", false)?;
    let h = RecordHeader::decode(&hb)?;
    match h.kind {
        Kind::Response | Kind::Status => {}
        other => return Err(RecordError::UnexpectedKind(other)),
    }
    h.validate()?;
    if h.kind == Kind::Status {
        return Ok(Reply::Status(Status::read_payload(r, &h)?));
    }
    let len = h.payload_len();
    if buf.len() != len {
        // Shrinking is free; growing zeroes only the new tail.
        buf.resize(len, 0);
    }
    h.check_payload(read_payload_crc(r, buf)?)?;
    Ok(Reply::Response {
        vaddr: h.vaddr,
        page_count: h.page_count,
    })
}

/// Fills `buf` from `r`, checksumming each piece as it arrives (still in cache).
fn read_payload_crc(r: &mut impl Read, buf: &mut [u8]) -> Result<u32, RecordError> {
    let (mut got, mut crc) = (0, 0);
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(RecordError::Truncated {
                    part: "payload",
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => {
                crc = crc32c_append(crc, &buf[got..got + n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RecordError::Io(e)),
        }
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn hello() -> Hello {
        Hello::new(MigrationId([7; 16]), Token([9; 32]))
    }

    /// A source-side encoder for tests: records plus a correct END.
    struct Enc {
        out: Vec<u8>,
        totals: EndTotals,
    }
    impl Enc {
        fn new() -> Enc {
            let h = hello().encode();
            Enc {
                out: Vec::new(),
                totals: EndTotals {
                    stream_crc: crc32c(&h),
                    ..Default::default()
                },
            }
        }
        fn raw(&mut self, h: RecordHeader, payload: &[u8]) {
            let hb = h.encode();
            self.totals.stream_crc = roll(self.totals.stream_crc, &hb);
            self.totals.records += 1;
            self.out.extend_from_slice(&hb);
            self.out.extend_from_slice(payload);
        }
        fn data(&mut self, vaddr: u64, payload: &[u8]) {
            let pages = (payload.len() / PAGE_SIZE) as u32;
            self.totals.data_pages += u64::from(pages);
            self.raw(
                RecordHeader {
                    kind: Kind::Data,
                    page_count: pages,
                    vaddr,
                    payload_crc: crc32c(payload),
                },
                payload,
            );
        }
        fn zero(&mut self, vaddr: u64, count: u32) {
            self.totals.zero_pages += u64::from(count);
            self.raw(
                RecordHeader {
                    kind: Kind::Zero,
                    page_count: count,
                    vaddr,
                    payload_crc: 0,
                },
                &[],
            );
        }
        fn end(mut self) -> Vec<u8> {
            self.out.extend_from_slice(&self.totals.encode_record());
            self.out
        }
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<String>, RecordError> {
        let mut rr = RecordReader::new(Cursor::new(bytes), &hello().encode());
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match rr.next_record(&mut buf)? {
                Record::Data { vaddr, data } => {
                    out.push(format!("D{vaddr:x}:{}:{}", data.len(), data[0]))
                }
                Record::Zero { vaddr, count } => out.push(format!("Z{vaddr:x}:{count}")),
                Record::End(t) => {
                    out.push(format!("E{}:{}:{}", t.data_pages, t.zero_pages, t.records));
                    return Ok(out);
                }
            }
        }
    }

    #[test]
    fn hello_roundtrip_and_refusals() {
        let h = hello();
        let b = h.encode();
        assert_eq!(&b[..8], b"TERNPAGE");
        assert_eq!(Hello::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(HelloError::BadMagic(_))));
        let mut bad = b;
        bad[8] = 2;
        assert_eq!(Hello::decode(&bad), Err(HelloError::UnsupportedVersion(2)));
        let mut bad = b;
        bad[11] = 0x80;
        assert_eq!(Hello::decode(&bad), Err(HelloError::UnknownFlags(0x8000)));
        for s in [
            HelloStatus::Ok,
            HelloStatus::BadToken,
            HelloStatus::Other(99),
        ] {
            assert_eq!(
                decode_hello_reply(&encode_hello_reply(s)),
                Some((s, VERSION))
            );
        }
        assert_eq!(decode_hello_reply(b"HTTP/1.1"), None);
    }

    #[test]
    fn ids_and_tokens() {
        let id = MigrationId::from_hex("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(id.to_hex(), "00112233445566778899aabbccddeeff");
        assert!(MigrationId::from_hex("0011").is_err());
        assert!(MigrationId::from_hex(&"zz".repeat(16)).is_err());
        let t = Token::generate().unwrap();
        assert_eq!(Token::from_hex(&t.to_hex()).unwrap(), t);
        assert!(t.ct_eq(&t.clone()));
        let mut u = t.clone();
        u.0[31] ^= 1;
        assert!(!t.ct_eq(&u));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(!format!("{}", Token::from_hex("ab").unwrap_err()).contains("ab"));
    }

    #[test]
    fn every_record_kind_roundtrips() {
        let mut e = Enc::new();
        let mut two = vec![1u8; PAGE_SIZE];
        two.extend(vec![2u8; PAGE_SIZE]);
        e.data(0x7000, &two);
        e.zero(0x10000, 300);
        e.data(USER_ADDR_LIMIT - PAGE, &[3u8; PAGE_SIZE]);
        let bytes = e.end();
        assert_eq!(
            read_all(&bytes).unwrap(),
            vec![
                "D7000:8192:1".to_string(),
                "Z10000:300".into(),
                format!("D{:x}:4096:3", USER_ADDR_LIMIT - PAGE),
                "E3:300:3".into()
            ]
        );
        // An empty stream (only END) is valid.
        assert_eq!(read_all(&Enc::new().end()).unwrap(), vec!["E0:0:0"]);
        // STATUS and header codec.
        let st = Status {
            code: status::PAYLOAD_CHECKSUM,
            totals: EndTotals {
                data_pages: 1,
                zero_pages: 2,
                records: 3,
                stream_crc: 4,
            },
        };
        let b = st.encode_record();
        assert_eq!(Status::read_from(&mut Cursor::new(&b[..])).unwrap(), st);
        for kind in [
            Kind::Data,
            Kind::Zero,
            Kind::End,
            Kind::Request,
            Kind::Response,
            Kind::Status,
            Kind::Homed,
        ] {
            let h = RecordHeader {
                kind,
                page_count: 5,
                vaddr: 0x1000,
                payload_crc: 0xdead,
            };
            assert_eq!(RecordHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    /// Builds a stream, lets `mutate` damage it, and returns the reader's error.
    fn broken(build: impl FnOnce(&mut Enc), mutate: impl FnOnce(&mut Vec<u8>)) -> RecordError {
        let mut e = Enc::new();
        build(&mut e);
        let mut bytes = e.end();
        mutate(&mut bytes);
        read_all(&bytes).expect_err("must be refused")
    }

    fn hdr(kind: Kind, page_count: u32, vaddr: u64, payload_crc: u32) -> RecordHeader {
        RecordHeader {
            kind,
            page_count,
            vaddr,
            payload_crc,
        }
    }

    #[test]
    fn malformed_records_are_refused_with_their_own_error() {
        let page = vec![5u8; PAGE_SIZE];
        let crc = crc32c(&page);
        let e = broken(|e| e.raw(hdr(Kind::Data, 1, 0x1001, crc), &page), |_| {});
        assert!(
            matches!(e, RecordError::Unaligned { vaddr: 0x1001, .. }),
            "{e}"
        );
        let e = broken(
            |e| e.raw(hdr(Kind::Data, 1, USER_ADDR_LIMIT, crc), &page),
            |_| {},
        );
        assert!(matches!(e, RecordError::OutOfRange { .. }), "{e}");
        let e = broken(|e| e.raw(hdr(Kind::Data, 1, !0xfff, crc), &page), |_| {});
        assert!(matches!(e, RecordError::OutOfRange { .. }), "{e}");
        let e = broken(|e| e.raw(hdr(Kind::Data, 0, 0x1000, 0), &[]), |_| {});
        assert!(matches!(e, RecordError::PageCount { count: 0, .. }), "{e}");
        let e = broken(
            |e| e.raw(hdr(Kind::Data, MAX_DATA_PAGES + 1, 0x1000, 0), &[]),
            |_| {},
        );
        assert!(
            matches!(
                e,
                RecordError::PageCount {
                    count: 1025,
                    max: 1024,
                    ..
                }
            ),
            "{e}"
        );
        let e = broken(
            |e| e.raw(hdr(Kind::Zero, MAX_ZERO_PAGES + 1, 0x1000, 0), &[]),
            |_| {},
        );
        assert!(
            matches!(
                e,
                RecordError::PageCount {
                    kind: Kind::Zero,
                    ..
                }
            ),
            "{e}"
        );
        let e = broken(|e| e.raw(hdr(Kind::Zero, 1, 0x1000, 7), &[]), |_| {});
        assert!(matches!(e, RecordError::ZeroWithChecksum { .. }), "{e}");
        let e = broken(|e| e.raw(hdr(Kind::Request, 1, 0x1000, 0), &[]), |_| {});
        assert!(
            matches!(e, RecordError::UnexpectedKind(Kind::Request)),
            "{e}"
        );
        let e = broken(
            |e| e.raw(hdr(Kind::Status, 0, 0, 0), &[0; STATUS_LEN]),
            |_| {},
        );
        assert!(
            matches!(e, RecordError::UnexpectedKind(Kind::Status)),
            "{e}"
        );
        let e = broken(|e| e.raw(hdr(Kind::End, 1, 0, 0), &[]), |_| {});
        assert!(
            matches!(
                e,
                RecordError::PageCount {
                    kind: Kind::End,
                    ..
                }
            ),
            "{e}"
        );

        // Unknown kind: rewrite byte 0 and fix the header checksum.
        let e = broken(
            |e| e.zero(0x1000, 1),
            |b| {
                b[0] = 42;
                let hc = crc32c(&b[..20]);
                b[20..24].copy_from_slice(&hc.to_le_bytes());
            },
        );
        assert!(matches!(e, RecordError::UnknownKind(42)), "{e}");
        // Reserved bytes set (checksum fixed).
        let e = broken(
            |e| e.zero(0x1000, 1),
            |b| {
                b[2] = 1;
                let hc = crc32c(&b[..20]);
                b[20..24].copy_from_slice(&hc.to_le_bytes());
            },
        );
        assert!(matches!(e, RecordError::ReservedNonZero { .. }), "{e}");
        // A flipped header bit.
        let e = broken(|e| e.zero(0x1000, 1), |b| b[9] ^= 0x10);
        assert!(matches!(e, RecordError::HeaderChecksum { .. }), "{e}");
        // A flipped payload bit.
        let e = broken(|e| e.data(0x1000, &page), |b| b[HEADER_LEN + 100] ^= 1);
        assert!(
            matches!(e, RecordError::PayloadChecksum { vaddr: 0x1000, .. }),
            "{e}"
        );
        // Truncated mid-payload, mid-header, at a boundary (no END).
        let e = broken(|e| e.data(0x1000, &page), |b| b.truncate(HEADER_LEN + 10));
        assert!(
            matches!(
                e,
                RecordError::Truncated {
                    part: "payload",
                    got: 10,
                    ..
                }
            ),
            "{e}"
        );
        let e = broken(
            |e| e.data(0x1000, &page),
            |b| b.truncate(HEADER_LEN + PAGE_SIZE + 5),
        );
        assert!(
            matches!(
                e,
                RecordError::Truncated {
                    part: "header",
                    got: 5,
                    ..
                }
            ),
            "{e}"
        );
        let e = broken(
            |e| e.data(0x1000, &page),
            |b| b.truncate(HEADER_LEN + PAGE_SIZE),
        );
        assert!(matches!(e, RecordError::MissingEnd), "{e}");
    }

    #[test]
    fn end_totals_must_match() {
        let page = vec![5u8; PAGE_SIZE];
        // A record the END does not account for (inserted before END, END unchanged).
        let mut e = Enc::new();
        e.data(0x1000, &page);
        let end = e.totals.encode_record();
        e.data(0x2000, &page);
        let mut bytes = e.out.clone();
        bytes.extend_from_slice(&end);
        let err = read_all(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                RecordError::EndMismatch {
                    what: "data pages",
                    sender: 1,
                    receiver: 2
                }
            ),
            "{err}"
        );

        // Same counts, different records (a reordering): only the rolling checksum catches it.
        let mut a = Enc::new();
        a.zero(0x1000, 1);
        a.zero(0x3000, 1);
        let mut b = Enc::new();
        b.zero(0x3000, 1);
        b.zero(0x1000, 1);
        let mut bytes = b.out.clone();
        bytes.extend_from_slice(&a.totals.encode_record());
        let err = read_all(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                RecordError::EndMismatch {
                    what: "stream checksum",
                    ..
                }
            ),
            "{err}"
        );

        // A malformed END payload.
        let mut e = Enc::new();
        let mut p = e.totals.encode();
        p[30] = 1;
        e.out
            .extend_from_slice(&hdr(Kind::End, 0, 0, crc32c(&p)).encode());
        e.out.extend_from_slice(&p);
        let err = read_all(&e.out).unwrap_err();
        assert!(matches!(err, RecordError::EndReserved(_)), "{err}");

        // Every error has a status code and a message naming the problem.
        assert_eq!(err.status_code(), status::MALFORMED_HEADER);
        assert!(err.to_string().contains("END"));
    }

    // --- pull: REQUEST / RESPONSE ---------------------------------------------------------

    fn response(vaddr: u64, payload: &[u8]) -> Vec<u8> {
        let req = PageRequest::new(vaddr, (payload.len() / PAGE_SIZE) as u32).unwrap();
        [&req.response_header(payload)[..], payload].concat()
    }

    /// A header with an arbitrary (possibly invalid) content and a correct header checksum.
    fn raw_header(kind: u8, page_count: u32, vaddr: u64, payload_crc: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = kind;
        b[4..8].copy_from_slice(&page_count.to_le_bytes());
        b[8..16].copy_from_slice(&vaddr.to_le_bytes());
        b[16..20].copy_from_slice(&payload_crc.to_le_bytes());
        let hc = crc32c(&b[..20]);
        b[20..24].copy_from_slice(&hc.to_le_bytes());
        b
    }

    fn request_err(b: &[u8]) -> RecordError {
        read_pull_record(&mut Cursor::new(b)).expect_err("must be refused")
    }

    #[test]
    fn pull_request_roundtrip() {
        let r = PageRequest::new(0x7f00_0000_0000, 3).unwrap();
        assert_eq!((r.vaddr(), r.page_count(), r.len(), r.end()), (0x7f00_0000_0000, 3, 3 * PAGE, 0x7f00_0000_3000));
        let b = r.encode();
        assert_eq!(b[0], Kind::Request as u8);
        assert_eq!(&b[16..20], &[0; 4], "payload_crc 0");
        let mut two = b.to_vec();
        two.extend_from_slice(&PageRequest::new(0x1000, MAX_DATA_PAGES).unwrap().encode());
        let mut c = Cursor::new(&two[..]);
        assert_eq!(read_pull_record(&mut c).unwrap(), Some(PullRecord::Request(r)));
        assert!(matches!(read_pull_record(&mut c).unwrap(), Some(PullRecord::Request(q)) if q.page_count() == MAX_DATA_PAGES));
        // The destination closed between records: the normal end.
        assert_eq!(read_pull_record(&mut c).unwrap(), None);
        // The last page of the user address space is fine.
        assert!(PageRequest::new(USER_ADDR_LIMIT - PAGE, 1).is_ok());
    }

    #[test]
    fn pull_malformed_requests_are_refused() {
        let k = Kind::Request as u8;
        // Constructor and decoder agree.
        for (vaddr, count) in [(0x1001, 1), (0x1000, 0), (0x1000, MAX_DATA_PAGES + 1), (USER_ADDR_LIMIT, 1), (!0xfff, 2)] {
            assert!(PageRequest::new(vaddr, count).is_err(), "{vaddr:#x} {count}");
            assert!(read_pull_record(&mut Cursor::new(&raw_header(k, count, vaddr, 0)[..])).is_err());
        }
        let e = request_err(&raw_header(k, 1, 0x1001, 0));
        assert!(matches!(e, RecordError::Unaligned { kind: Kind::Request, vaddr: 0x1001 }), "{e}");
        let e = request_err(&raw_header(k, 0, 0x1000, 0));
        assert!(matches!(e, RecordError::PageCount { kind: Kind::Request, count: 0, .. }), "{e}");
        let e = request_err(&raw_header(k, MAX_DATA_PAGES + 1, 0x1000, 0));
        assert!(matches!(e, RecordError::PageCount { count: 1025, max: 1024, .. }), "{e}");
        let e = request_err(&raw_header(k, 2, USER_ADDR_LIMIT - PAGE, 0));
        assert!(matches!(e, RecordError::OutOfRange { kind: Kind::Request, .. }), "{e}");
        assert_eq!(e.status_code(), status::BAD_RANGE);
        let e = request_err(&raw_header(k, 1, 0x1000, 5));
        assert!(matches!(e, RecordError::RequestWithChecksum { vaddr: 0x1000, crc: 5 }), "{e}");
        assert_eq!(e.status_code(), status::MALFORMED_HEADER);
        let mut flipped = PageRequest::new(0x1000, 1).unwrap().encode();
        flipped[9] ^= 1;
        assert!(matches!(request_err(&flipped), RecordError::HeaderChecksum { .. }));
        let e = request_err(&PageRequest::new(0x1000, 1).unwrap().encode()[..10]);
        assert!(matches!(e, RecordError::Truncated { part: "header", got: 10, .. }), "{e}");
        // Only REQUESTs on the source's side of a pull connection.
        let e = request_err(&raw_header(Kind::Data as u8, 1, 0x1000, 0));
        assert!(matches!(e, RecordError::UnexpectedKind(Kind::Data)), "{e}");
        let e = request_err(&response(0x1000, &[1u8; PAGE_SIZE]));
        assert!(matches!(e, RecordError::UnexpectedKind(Kind::Response)), "{e}");
    }

    #[test]
    fn pull_response_roundtrip_and_refusals() {
        let payload = crate::pages::bench::patterned(3 * PAGE_SIZE, 4);
        let mut bytes = response(0x5000, &payload);
        let st = Status {
            code: status::NOT_SERVED,
            totals: EndTotals::default(),
        };
        bytes.extend_from_slice(&st.encode_record());
        let mut c = Cursor::new(&bytes[..]);
        let mut buf = vec![9u8; 10 * PAGE_SIZE];
        assert_eq!(read_reply(&mut c, &mut buf).unwrap(), Reply::Response { vaddr: 0x5000, page_count: 3 });
        assert_eq!(buf, payload);
        assert_eq!(read_reply(&mut c, &mut buf).unwrap(), Reply::Status(st));
        // The connection ended where an answer was due.
        let e = read_reply(&mut c, &mut buf).unwrap_err();
        assert!(matches!(e, RecordError::Truncated { part: "header", got: 0, .. }), "{e}");

        let reply_err = |b: &[u8]| read_reply(&mut Cursor::new(b), &mut Vec::new()).unwrap_err();
        // A flipped payload bit.
        let mut bad = response(0x5000, &payload);
        bad[HEADER_LEN + 4000] ^= 4;
        let e = reply_err(&bad);
        assert!(matches!(e, RecordError::PayloadChecksum { kind: Kind::Response, vaddr: 0x5000, .. }), "{e}");
        // A flipped header bit.
        let mut bad = response(0x5000, &payload);
        bad[5] ^= 1;
        assert!(matches!(reply_err(&bad), RecordError::HeaderChecksum { .. }));
        // Truncated payload.
        let bad = response(0x5000, &payload);
        let e = reply_err(&bad[..HEADER_LEN + PAGE_SIZE]);
        assert!(matches!(e, RecordError::Truncated { part: "payload", got: 4096, want: 12288 }), "{e}");
        // Malformed headers (correct header checksums).
        let k = Kind::Response as u8;
        let e = reply_err(&raw_header(k, 1, 0x5001, 0));
        assert!(matches!(e, RecordError::Unaligned { kind: Kind::Response, .. }), "{e}");
        let e = reply_err(&raw_header(k, 0, 0x5000, 0));
        assert!(matches!(e, RecordError::PageCount { kind: Kind::Response, count: 0, .. }), "{e}");
        let e = reply_err(&raw_header(k, MAX_DATA_PAGES + 1, 0x5000, 0));
        assert!(matches!(e, RecordError::PageCount { kind: Kind::Response, .. }), "{e}");
        let e = reply_err(&raw_header(k, 1, USER_ADDR_LIMIT, 0));
        assert!(matches!(e, RecordError::OutOfRange { kind: Kind::Response, .. }), "{e}");
        // Other kinds are not answers.
        for kind in [Kind::Request, Kind::Data, Kind::Zero, Kind::End] {
            let e = reply_err(&raw_header(kind as u8, 1, 0x5000, 0));
            assert!(matches!(e, RecordError::UnexpectedKind(k) if k == kind), "{e}");
        }
        // A STATUS with a damaged payload.
        let mut bad = st.encode_record().to_vec();
        bad[HEADER_LEN] ^= 1;
        assert!(matches!(reply_err(&bad), RecordError::PayloadChecksum { kind: Kind::Status, .. }));
    }

    /// A push stream still refuses the pull kinds, well-formed or not.
    #[test]
    fn push_stream_refuses_pull_records() {
        let page = vec![1u8; PAGE_SIZE];
        let e = broken(|e| e.raw(hdr(Kind::Response, 1, 0x1000, crc32c(&page)), &page), |_| {});
        assert!(matches!(e, RecordError::UnexpectedKind(Kind::Response)), "{e}");
        let e = broken(|e| e.raw(hdr(Kind::Request, 0, 0x1001, 9), &[]), |_| {});
        assert!(matches!(e, RecordError::UnexpectedKind(Kind::Request)), "{e}");
        assert_eq!(e.status_code(), status::UNEXPECTED_KIND);
        // HOMED, well-formed or not, after a good record: refused before anything else is checked.
        for h in [hdr(Kind::Homed, 0, 0, 0), hdr(Kind::Homed, 3, 0x1001, 9)] {
            let e = broken(
                |e| {
                    e.data(0x1000, &page);
                    e.raw(h, &[]);
                },
                |_| {},
            );
            assert!(matches!(e, RecordError::UnexpectedKind(Kind::Homed)), "{e}");
            assert_eq!(e.status_code(), status::UNEXPECTED_KIND);
        }
    }

    // --- pull: HOMED ----------------------------------------------------------------------

    #[test]
    fn homed_roundtrip() {
        let b = encode_homed();
        assert_eq!(b, raw_header(7, 0, 0, 0), "kind 7, page_count 0, vaddr 0, payload_crc 0");
        assert_eq!(Kind::from_u8(7), Some(Kind::Homed));
        assert_eq!(Kind::from_u8(8), None);
        let h = RecordHeader::decode(&b).unwrap();
        assert_eq!((h.kind, h.page_count, h.vaddr, h.payload_crc, h.payload_len()), (Kind::Homed, 0, 0, 0, 0));
        h.validate().unwrap();
        // After pipelined REQUESTs, then the close.
        let r = PageRequest::new(0x4000, 2).unwrap();
        let bytes = [&r.encode()[..], &b[..]].concat();
        let mut c = Cursor::new(&bytes[..]);
        assert_eq!(read_pull_record(&mut c).unwrap(), Some(PullRecord::Request(r)));
        assert_eq!(read_pull_record(&mut c).unwrap(), Some(PullRecord::Homed));
        assert_eq!(read_pull_record(&mut c).unwrap(), None);
        // The answer: an OK STATUS with what the connection served.
        let st = Status { code: status::OK, totals: EndTotals { data_pages: 2, records: 1, ..EndTotals::default() } };
        let mut buf = Vec::new();
        assert_eq!(read_reply(&mut Cursor::new(&st.encode_record()[..]), &mut buf).unwrap(), Reply::Status(st));
    }

    #[test]
    fn malformed_homed_is_refused() {
        let k = Kind::Homed as u8;
        let e = request_err(&raw_header(k, 1, 0, 0));
        assert!(matches!(e, RecordError::PageCount { kind: Kind::Homed, count: 1, min: 0, max: 0 }), "{e}");
        assert_eq!(e.status_code(), status::BAD_RANGE);
        let e = request_err(&raw_header(k, 0, 0x1000, 0));
        assert!(matches!(e, RecordError::NonZeroVaddr { kind: Kind::Homed, vaddr: 0x1000 }), "{e}");
        assert_eq!(e.status_code(), status::MALFORMED_HEADER);
        let e = request_err(&raw_header(k, 0, 0, 5));
        assert!(matches!(e, RecordError::HomedWithChecksum { crc: 5 }), "{e}");
        assert_eq!(e.status_code(), status::MALFORMED_HEADER);
        assert!(e.to_string().contains("HOMED"), "{e}");
        let mut flipped = encode_homed();
        flipped[0] ^= 0x10;
        assert!(matches!(request_err(&flipped), RecordError::HeaderChecksum { .. }));
        let e = request_err(&encode_homed()[..7]);
        assert!(matches!(e, RecordError::Truncated { part: "header", got: 7, .. }), "{e}");
        // Reserved bytes set (checksum fixed).
        let mut b = encode_homed();
        b[1] = 1;
        let hc = crc32c(&b[..20]);
        b[20..24].copy_from_slice(&hc.to_le_bytes());
        assert!(matches!(request_err(&b), RecordError::ReservedNonZero { kind: Kind::Homed, .. }));
        // Only the destination sends it: not an answer, not a push-stream STATUS.
        let reply = read_reply(&mut Cursor::new(&encode_homed()[..]), &mut Vec::new()).unwrap_err();
        assert!(matches!(reply, RecordError::UnexpectedKind(Kind::Homed)), "{reply}");
        let st = Status::read_from(&mut Cursor::new(&encode_homed()[..])).unwrap_err();
        assert!(matches!(st, RecordError::UnexpectedKind(Kind::Homed)), "{st}");
    }
}
