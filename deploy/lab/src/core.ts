// Synchronous building blocks shared by the library, the watchdog and the CLI: naming, the state
// file, /proc inspection and a teardown that works from an 'exit' hook and on half-built labs.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const STATE_DIR = process.env['TERN_LAB_STATE_DIR'] ?? '/run/tern-lab';
export const NETNS_DIR = '/run/netns';
export const SUBNET = '10.77.0.0/24';
export const SERVICE_ADDRESS = '10.77.0.200';
export const CLIENT_ADDRESS = '10.77.0.100';
export const MAX_HOSTS = 8;
/** Size of each lab host's pid range: host i (0-based) hands out pids from (i+1)·PID_RANGE+1. */
export const PID_RANGE = 10000;
export const NAME_RE = /^[a-z0-9-]{1,12}$/;
/** tern-<name>-<part>; <part> never contains '-', so the lab name is unambiguous. */
export const NETNS_RE = /^tern-([a-z0-9-]{1,12})-(host[A-H]|sw|client)$/;

/** Package root (deploy/lab): this file lives in dist/ (or src/). */
export const PKG_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

export interface LabHostInfo {
  name: string;
  netns: string;
  address: string;
  initPid: number;
}

export interface LabInfo {
  name: string;
  hosts: LabHostInfo[];
  client: { netns: string; address: string };
  serviceAddress: string;
  serviceHost: string;
  subnet: string;
  ownerPid: number | null;
  createdAt: string;
  /** Agent URL by host name, when the lab runs agents (`lab up NAME --agents`). */
  agentUrls?: Record<string, string>;
}

/** The agents of a lab: one per host, inside the host's namespaces, listening on the host address. */
export interface LabAgents {
  port: number;
  /** Generated at `--agents` time; every agent of the lab and its coordinator share it. */
  clusterToken: string;
  hosts: Record<string, { url: string; pid: number; log: string; config: string }>;
}

/** What is persisted in STATE_DIR/<name>.json: LabInfo plus bookkeeping. */
export interface LabState extends LabInfo {
  version: 1;
  status: 'creating' | 'ready';
  /** /proc/<ownerPid>/stat starttime, against pid reuse. */
  ownerStart: string | null;
  /** starttime of each host init, by host name. */
  initStarts: Record<string, string>;
  agents?: LabAgents;
}

export function hostLetter(i: number): string {
  return String.fromCharCode('A'.charCodeAt(0) + i);
}
export function hostAddress(i: number): string {
  return `10.77.0.${11 + i}`;
}
export function netnsName(lab: string, part: string): string {
  return `tern-${lab}-${part}`;
}
export function statePath(name: string): string {
  return path.join(STATE_DIR, `${name}.json`);
}
/** Agent configs and logs of lab `name` (removed with the lab). */
export function agentsDir(name: string): string {
  return path.join(STATE_DIR, `${name}.agents`);
}
/** The embedded coordinator's database for `migrate --lab name` (removed with the lab). */
export function coordinatorDbPath(name: string): string {
  return path.join(agentsDir(name), 'coordinator.db');
}

export function validateName(name: string): void {
  if (!NAME_RE.test(name)) throw new Error(`invalid lab name ${JSON.stringify(name)}: must match [a-z0-9-]{1,12}`);
}

export function readState(name: string): LabState | null {
  try {
    return JSON.parse(fs.readFileSync(statePath(name), 'utf8')) as LabState;
  } catch {
    return null;
  }
}

/** Atomic replace of an existing state file. */
export function writeState(st: LabState): void {
  const p = statePath(st.name);
  const tmp = `${p}.${process.pid}.tmp`;
  // With agents the state holds the cluster token: readable by root only.
  fs.writeFileSync(tmp, JSON.stringify(st, null, 2) + '\n', { mode: st.agents ? 0o600 : 0o644 });
  if (st.agents) fs.chmodSync(tmp, 0o600);
  fs.renameSync(tmp, p);
}

/** Creates the state file exclusively; throws if a lab with that name exists. */
export function createStateExclusive(st: LabState): void {
  fs.mkdirSync(STATE_DIR, { recursive: true, mode: 0o755 });
  let fd: number;
  try {
    fd = fs.openSync(statePath(st.name), 'wx', 0o644);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new Error(`lab ${st.name} already exists (${statePath(st.name)})`);
    throw e;
  }
  try {
    fs.writeSync(fd, JSON.stringify(st, null, 2) + '\n');
  } finally {
    fs.closeSync(fd);
  }
}

export function listStateNames(): string[] {
  let ents: string[];
  try {
    ents = fs.readdirSync(STATE_DIR);
  } catch {
    return [];
  }
  return ents
    .filter((f) => f.endsWith('.json'))
    .map((f) => f.slice(0, -5))
    .filter((n) => NAME_RE.test(n))
    .sort();
}

export function publicInfo(st: LabState): LabInfo {
  return {
    name: st.name,
    hosts: st.hosts.map((h) => ({ ...h })),
    client: { ...st.client },
    serviceAddress: st.serviceAddress,
    serviceHost: st.serviceHost,
    subnet: st.subnet,
    ownerPid: st.ownerPid,
    createdAt: st.createdAt,
    ...(st.agents && { agentUrls: Object.fromEntries(Object.entries(st.agents.hosts).map(([h, a]) => [h, a.url])) }),
  };
}

// ---------------------------------------------------------------- /proc

/** state letter and starttime (field 22) of /proc/<pid>/stat, or null if the pid does not exist. */
export function procStat(pid: number): { state: string; starttime: string } | null {
  let s: string;
  try {
    s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  const rest = s.slice(s.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state); starttime is field 22 -> rest[19]
  return { state: rest[0] ?? '?', starttime: rest[19] ?? '' };
}

export function procStartTime(pid: number): string | null {
  return procStat(pid)?.starttime ?? null;
}

/** Alive (not a zombie) and, if given, with the recorded starttime. */
export function pidAlive(pid: number, starttime?: string | null): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  const st = procStat(pid);
  if (!st || st.state === 'Z' || st.state === 'X') return false;
  return starttime == null || st.starttime === starttime;
}

/** The NSpid line of /proc/<pid>/status: pids from the root pid ns down to the process's own. */
export function nsPids(pid: number | string): number[] | null {
  let s: string;
  try {
    s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return null;
  }
  const m = /^NSpid:\s*(.*)$/m.exec(s);
  if (!m || m[1] === undefined) return null;
  return m[1].trim().split(/\s+/).map(Number);
}

export function nsLink(pid: number | string, kind: 'pid' | 'net' | 'mnt' | 'uts'): string | null {
  try {
    return fs.readlinkSync(`/proc/${pid}/ns/${kind}`);
  } catch {
    return null;
  }
}

export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const t of tasks) {
    try {
      for (const c of fs.readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').trim().split(/\s+/)) {
        if (c) out.push(Number(c));
      }
    } catch {
      /* task gone */
    }
  }
  return out;
}

/** First descendant of `pid` (pid itself included) that is pid 1 of a nested pid namespace. */
export function findNsInit(pid: number): number | null {
  const queue = [pid];
  const seen = new Set<number>();
  while (queue.length) {
    const p = queue.shift()!;
    if (seen.has(p)) continue;
    seen.add(p);
    const ns = nsPids(p);
    if (ns && ns.length >= 2 && ns[ns.length - 1] === 1) return p;
    queue.push(...childrenOf(p));
  }
  return null;
}

/** Root-namespace pid of the process whose innermost pid is `nsPid` in the pid ns `pidNs` (a /proc/x/ns/pid link). */
export function findRootPid(pidNs: string, nsPid: number): number | null {
  let ents: string[];
  try {
    ents = fs.readdirSync('/proc');
  } catch {
    return null;
  }
  for (const d of ents) {
    if (!/^\d+$/.test(d)) continue;
    const ns = nsPids(d);
    if (!ns || ns.length < 2 || ns[ns.length - 1] !== nsPid) continue;
    if (nsLink(d, 'pid') === pidNs) return Number(d);
  }
  return null;
}

// ---------------------------------------------------------------- teardown

const sleepCell = new Int32Array(new SharedArrayBuffer(4));
export function sleepSync(ms: number): void {
  Atomics.wait(sleepCell, 0, 0, ms);
}

export function listNetns(): string[] {
  try {
    return fs.readdirSync(NETNS_DIR).sort();
  } catch {
    return [];
  }
}

/** Names of the netns that belong to lab `name` (exact match: lab names may contain '-'). */
export function labNetns(name: string): string[] {
  return listNetns().filter((n) => NETNS_RE.exec(n)?.[1] === name);
}

export function netnsPids(ns: string): number[] {
  const r = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  if (r.status !== 0 || !r.stdout) return [];
  return r.stdout
    .split(/\s+/)
    .filter((x) => /^\d+$/.test(x))
    .map(Number)
    .filter((p) => p !== process.pid);
}

function trySignal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* gone */
  }
}

/** pid-ns inits (NSpid ends in 1, nested) among the given pids. */
function initsAmong(pids: number[]): number[] {
  return pids.filter((p) => {
    const ns = nsPids(p);
    return !!ns && ns.length >= 2 && ns[ns.length - 1] === 1;
  });
}

/**
 * Removes everything of lab `name` that exists: SIGTERM to the host inits (each SIGKILLs its whole pid
 * namespace), SIGKILL to whatever is still inside the lab's network namespaces, `ip netns del` of
 * each, then the state file. Synchronous (usable from an 'exit' hook), idempotent, never throws.
 * Only processes inside the lab's own namespaces are signalled.
 */
export function teardownSync(name: string): void {
  if (!NAME_RE.test(name)) return;
  const nss = labNetns(name);
  const pidsIn = () => [...new Set(nss.flatMap(netnsPids))];

  // 1. ask the host inits to stop (they kill their pid namespace)
  let inits = initsAmong(pidsIn());
  for (const p of inits) trySignal(p, 'SIGTERM');
  for (let waited = 0; inits.length && waited < 1000; waited += 20) {
    sleepSync(20);
    inits = inits.filter((p) => pidAlive(p));
  }
  // 2. SIGKILL whatever remains in the lab's netns (inits that did not stop, unshare parents,
  //    `ip netns exec` client processes, nsenter parents…)
  for (let round = 0; round < 100; round++) {
    const left = pidsIn().filter((p) => pidAlive(p));
    if (!left.length) break;
    for (const p of left) trySignal(p, 'SIGKILL');
    sleepSync(20);
  }
  // 3. delete the namespaces (switch last; deleting a netns deletes its veth ends)
  const order = [...nss.filter((n) => !n.endsWith('-sw')), ...nss.filter((n) => n.endsWith('-sw'))];
  for (const ns of order) {
    spawnSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
  }
  // 4. agent configs, logs and the embedded coordinator's database (`--agents`)
  fs.rmSync(agentsDir(name), { recursive: true, force: true });
  // 5. the state file last: its absence tells the watchdog and `reapStale` the lab is gone
  try {
    fs.unlinkSync(statePath(name));
  } catch {
    /* already gone */
  }
}

/** Lab names whose owner process is gone (labs with no owner are never stale). */
export function staleLabNames(): string[] {
  const out: string[] = [];
  for (const n of listStateNames()) {
    const st = readState(n);
    if (!st) continue;
    if (st.ownerPid != null && !pidAlive(st.ownerPid, st.ownerStart)) out.push(n);
  }
  return out;
}

/**
 * Lab netns with no state file. The state file is written before the first netns and removed after
 * the last one, so these can only be leftovers of an interrupted teardown.
 */
export function orphanNetnsLabNames(): string[] {
  const names = new Set<string>();
  for (const ns of listNetns()) {
    const m = NETNS_RE.exec(ns);
    if (m?.[1] && !fs.existsSync(statePath(m[1]))) names.add(m[1]);
  }
  return [...names].sort();
}

export function which(cmd: string): string | null {
  for (const dir of (process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':').concat(['/usr/sbin', '/sbin'])) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return null;
}

/** Compiles deploy/lab/init.c into deploy/lab/bin/tern-lab-init when missing or older than the source. */
export function ensureInitBinary(): string {
  const override = process.env['TERN_LAB_INIT'];
  if (override) return override;
  const src = path.join(PKG_ROOT, 'init.c');
  const bin = path.join(PKG_ROOT, 'bin', 'tern-lab-init');
  const srcM = fs.statSync(src).mtimeMs;
  let binM = -1;
  try {
    binM = fs.statSync(bin).mtimeMs;
  } catch {
    /* missing */
  }
  if (binM >= srcM) return bin;
  fs.mkdirSync(path.dirname(bin), { recursive: true });
  const tmp = `${bin}.${process.pid}.tmp`;
  try {
    execFileSync('gcc', ['-O2', '-Wall', '-o', tmp, src], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (e) {
    const err = (e as { stderr?: Buffer }).stderr?.toString() ?? String(e);
    throw new Error(`lab: cannot compile ${src} with gcc: ${err}`);
  }
  fs.renameSync(tmp, bin); // atomic: concurrent compilers are harmless
  return bin;
}
