/**
 * Shapes of what the Rust engine returns, as serialized by serde in crates/tern-core (camelCase
 * fields, kebab-case enum values). u64 values that can exceed 2^53 (addresses, signal masks,
 * capability sets, auxv values, epoll data) travel as "0x…" hex strings: parse them with BigInt.
 */

/** A u64 as a "0x…" hex string. */
export type Hex = string;

export type TaskState =
  | 'running' | 'sleeping' | 'disk-sleep' | 'stopped' | 'tracing-stop' | 'zombie' | 'dead' | 'parked' | 'idle' | 'unknown';

export type VmaKind =
  | 'anon' | 'file' | 'shared-anon' | 'file-shared' | 'stack' | 'heap' | 'vdso' | 'vvar' | 'vvar-vclock'
  | 'vsyscall' | 'guard' | 'sysv-shm' | 'memfd' | 'deleted-file' | 'special';

export interface Vma {
  start: Hex;
  end: Hex;
  perms: { read: boolean; write: boolean; exec: boolean; shared: boolean };
  offset: number;
  /** "major:minor" in hex, as /proc/PID/maps prints it. */
  dev: string;
  inode: number;
  path: string | null;
  kind: VmaKind;
}

export interface MmFields {
  startCode: Hex; endCode: Hex; startData: Hex; endData: Hex; startBrk: Hex; startStack: Hex;
  argStart: Hex; argEnd: Hex; envStart: Hex; envEnd: Hex; exitCode: number;
  auxv: { type: number; value: Hex }[];
}

export interface Ids { real: number; effective: number; saved: number; fs: number }

export interface ProcessStatus {
  name: string; umask: number | null; tgid: number; pid: number; ppid: number; tracerPid: number;
  uid: Ids; gid: Ids; groups: number[];
  nsTgid: number[]; nsPid: number[]; nsPgid: number[]; nsSid: number[];
  kthread: boolean | null; threads: number;
  sigPnd: Hex; shdPnd: Hex; sigBlk: Hex; sigIgn: Hex; sigCgt: Hex;
  capInh: Hex; capPrm: Hex; capEff: Hex; capBnd: Hex; capAmb: Hex;
  noNewPrivs: boolean; seccomp: 'disabled' | 'strict' | 'filter'; seccompFilters: number;
  /** Bytes; null where the kernel does not report the field (kernel threads, zombies). */
  memory: Record<
    'vmPeak' | 'vmSize' | 'vmLck' | 'vmPin' | 'vmHwm' | 'vmRss' | 'rssAnon' | 'rssFile' | 'rssShmem' | 'vmData' | 'vmStk' | 'vmExe' | 'vmLib' | 'vmPte' | 'vmSwap',
    number | null
  >;
}

export type SocketState =
  | 'established' | 'syn-sent' | 'syn-recv' | 'fin-wait1' | 'fin-wait2' | 'time-wait' | 'close' | 'close-wait'
  | 'last-ack' | 'listen' | 'closing' | 'new-syn-recv' | 'unknown';

export interface Endpoint { address: string; port: number }

export interface InetSocket {
  protocol: 'tcp' | 'tcp6' | 'udp' | 'udp6';
  local: Endpoint | null;
  remote: Endpoint | null;
  state: SocketState;
  txQueue: number;
  rxQueue: number;
  uid: number;
}

export type Socket =
  | InetSocket
  | {
      protocol: 'unix';
      type: 'stream' | 'dgram' | 'seqpacket' | 'unknown';
      state: 'unconnected' | 'connecting' | 'connected' | 'disconnecting' | 'unknown';
      listening: boolean;
      /** '@…' for abstract names. */
      path: string | null;
    }
  | { protocol: 'netlink'; netlinkProtocol: number | null }
  | { protocol: 'other'; name: string };

export interface TimeSpec { sec: number; nsec: number }

export type FdKind =
  | { kind: 'regular-file'; path: string; size: number; deleted: boolean }
  | { kind: 'directory'; path: string }
  | { kind: 'pipe'; inode: number }
  | { kind: 'fifo'; path: string; inode: number }
  | { kind: 'socket'; inode: number; socket: Socket }
  | { kind: 'eventfd'; count: number; id: number | null; semaphore: boolean | null }
  | { kind: 'epoll'; targets: { tfd: number; events: number; data: Hex; pos: number; ino: number; sdev: number }[] }
  | { kind: 'signalfd'; sigmask: Hex }
  | { kind: 'timerfd'; clockid: number; ticks: number; settimeFlags: number; itValue: TimeSpec; itInterval: TimeSpec }
  | { kind: 'inotify'; watches: { wd: number; ino: number; sdev: number; mask: number }[] }
  | { kind: 'fanotify' }
  | { kind: 'io-uring' }
  | { kind: 'memfd'; name: string; size: number }
  | { kind: 'char-device' | 'block-device'; path: string; major: number; minor: number }
  | { kind: 'anon-inode-other'; name: string }
  | { kind: 'unknown' };

/** One open file descriptor: the common fdinfo fields, with its kind's fields flattened in. */
export type Fd = { fd: number; link: string; pos: number; flags: number; mntId: number; ino: number } & FdKind;

export interface Rlimit { resource: string; number: number | null; soft: number | null; hard: number | null; unit: string | null }

export type NamespaceKind = 'net' | 'pid' | 'mnt' | 'uts' | 'ipc' | 'user' | 'cgroup' | 'time';

export interface ProcessInventory {
  pid: number;
  /** The pid as the process's own (innermost) pid namespace sees it. */
  nsPid: number;
  comm: string;
  exe: string | null;
  cmdline: string[];
  state: TaskState;
  ppid: number;
  pgrp: number;
  session: number;
  ttyNr: number;
  flags: number;
  startTime: number;
  threads: { tid: number; comm: string; state: TaskState }[];
  vmas: Vma[];
  mm: MmFields;
  status: ProcessStatus;
  fds: Fd[];
  rlimits: Rlimit[];
  cwd: string | null;
  root: string | null;
  children: number[];
  namespaces: Record<NamespaceKind, { inode: number; sameAsEngine: boolean } | null>;
}

export interface Blocker {
  /** "process", "fd 7", "vma 7f00…-7f00…". */
  subject: string;
  /** Stable machine code: io-uring, inotify, traced, children, sysv-shm, terminal, ... */
  kind: string;
  reason: string;
}

export interface InventorySummary {
  threads: number;
  vmaKinds: { kind: VmaKind; count: number; bytes: number }[];
  fdKinds: { kind: string; count: number }[];
}

export interface CheckReport {
  pid: number;
  movable: boolean;
  blockers: Blocker[];
  warnings: string[];
  summary: InventorySummary;
  residentBytes: number;
}

/** Whether one kernel mechanism works here, and if not what failed when it was tried. */
export interface Capability {
  available: boolean;
  error: string | null;
}

export interface KernelProbe {
  kernelRelease: string;
  softDirty: Capability;
  userfaultfd: { available: boolean; apiVersion: number; features: number; featureNames: string[]; error: string | null };
  /** End to end: WP_ASYNC registered and PAGEMAP_SCAN reported exactly the page written. */
  uffdWpAsync: Capability;
  pagemapScan: Capability;
  tcpRepair: Capability;
  clone3SetTid: Capability;
  pidfdGetfd: Capability;
  ptraceGetRseqConfig: Capability;
  dirtyTracking: 'soft-dirty' | 'uffd-wp' | 'none';
  elapsedNs: number;
}

export interface FreezeReport {
  /** Every thread id stopped, as the engine's pid namespace sees them. */
  threads: number[];
  elapsedNs: number;
}

export interface ThawReport {
  elapsedNs: number;
}

export type RegisterName =
  | 'r15' | 'r14' | 'r13' | 'r12' | 'rbp' | 'rbx' | 'r11' | 'r10' | 'r9' | 'r8' | 'rax' | 'rcx' | 'rdx' | 'rsi' | 'rdi'
  | 'origRax' | 'rip' | 'cs' | 'eflags' | 'rsp' | 'ss' | 'fsBase' | 'gsBase' | 'ds' | 'es' | 'fs' | 'gs';

export interface ThreadRegisters {
  tid: number;
  /** Full 64-bit register values as hex strings. */
  regs: Record<RegisterName, Hex>;
  fsBase: Hex;
  gsBase: Hex;
  xstate: { size: number; xstateBv: Hex; bytes: number[] };
  /** Stopped inside a system call (orig_rax ≥ 0), and which. */
  inSyscall: boolean;
  syscallNr: number | null;
  /** A signal the thread was about to take when frozen; delivered at thaw. */
  heldSignal: number | null;
  rseq: { rseqAbiPointer: Hex; rseqAbiSize: number; signature: number; flags: number } | null;
}
