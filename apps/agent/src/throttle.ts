/**
 * Auto-converge CPU throttle (issue 6). When pre-copy cannot keep up — the process dirties memory
 * faster than the link moves it — slow the process down in steps, as QEMU's auto-converge does
 * for a vCPU, until the dirty set shrinks; then give everything back exactly as it was.
 *
 * Mechanism: a CFS bandwidth limit (cgroup cpu quota) on a cgroup of our own. The process's current
 * cpu cgroup may hold other processes, so its quota is never touched; instead a child cgroup
 * `tern-throttle-<migrationId>` is made under it, limited, and every thread of the process moved in.
 * Threads created later inherit their creator's cgroup, so they follow on their own.
 *
 *   - cgroup v1 (cpu controller on a v1 mount): cpu.cfs_quota_us / cpu.cfs_period_us; the pid is
 *     written to cgroup.procs (the kernel moves the whole thread group under the threadgroup lock,
 *     so a thread being cloned at that moment cannot be left behind), then any straggler by tid.
 *   - cgroup v2 (cpu controller on the unified mount): cpu.max "quota period"; the cpu controller has
 *     to be enabled in the parent's cgroup.subtree_control, which the "no internal processes" rule
 *     forbids in a non-root cgroup that has processes — then throttling is reported unavailable
 *     (the migration goes on without it) rather than moving unrelated processes around.
 *
 * Where the hierarchy is mounted is read from /proc/self/mountinfo and the process's place in it
 * from /proc/PID/cgroup (paths there are relative to the mount's root, which need not be "/" inside
 * a container), so nothing about /sys/fs/cgroup is assumed.
 *
 * release() is idempotent and never fails the migration: threads still in our cgroup go back to the
 * cgroup each came from (recorded per thread: in v1 the threads of one process may sit in different
 * cgroups), subtree_control is reset if we changed it, and our directory is removed. If the process
 * exited or someone else moved it meanwhile, only the directory is removed.
 */
import { mkdir, readFile, readdir, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export const THROTTLE_PREFIX = 'tern-throttle-';

export interface ThrottleOptions {
  /** First step, in percent of the baseline taken away (QEMU cpu-throttle-initial). Default 20. */
  initialPercent?: number;
  /** Added by every further step (QEMU cpu-throttle-increment). Default 10. */
  incrementPercent?: number;
  /** Upper bound of percentOff (QEMU's max is 99). Default 99. */
  maxPercent?: number;
  /** CFS period of our cgroup in µs. Default 100000: the kernel's default, and long enough that the
   *  smallest quota the kernel accepts (1000 µs) still expresses 99 % off. A shorter period makes the
   *  pauses shorter but caps how hard we can throttle. */
  periodUs?: number;
  /** What "0 % off" means, in CPUs. Default: min(CPUs in the process's affinity mask, its thread
   *  count, the quota inherited from its cgroup and their ancestors) — the most the process could use.
   *  A caller that measured its actual use can pass that instead so the first step bites at once. */
  baselineCpus?: number;
  /** If > 0 and baselineCpus is not given, open() samples the process's CPU use over this many ms
   *  and uses it (never above the default above, never below 0.05 CPU) as the baseline: a process
   *  with many mostly-idle threads is then throttled relative to what it really uses. Default 0. */
  measureMs?: number;
  /** Where procfs is (tests point this at a fake tree). Default "/proc". */
  procRoot?: string;
}

export interface ThrottleState {
  percentOff: number;
  quotaUs: number;
  periodUs: number;
}

type Version = 1 | 2;

interface Mount {
  root: string;
  mountPoint: string;
  fsType: string;
  superOptions: string[];
}

/** Where a process's cpu accounting lives. */
export interface CpuCgroupLocation {
  version: Version;
  /** Mount point of the hierarchy that carries the cpu controller. */
  mountPoint: string;
  /** The cgroup's path as /proc/PID/cgroup shows it (relative to our cgroup namespace). */
  path: string;
  /** Directory of that cgroup in the filesystem. */
  dir: string;
}

const MIN_QUOTA_US = 1000; // the kernel refuses smaller cfs quotas (EINVAL)

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

async function readMounts(procRoot: string): Promise<Mount[]> {
  const text = await readFile(join(procRoot, 'self', 'mountinfo'), 'utf8');
  const out: Mount[] = [];
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    const post = line.slice(sep + 3).split(' ');
    if (pre.length < 5 || post.length < 3) continue;
    out.push({
      root: unescapeMountField(pre[3]!),
      mountPoint: unescapeMountField(pre[4]!),
      fsType: post[0]!,
      superOptions: post[2]!.split(','),
    });
  }
  return out;
}

interface CgroupLine {
  id: string;
  controllers: string[];
  path: string;
}

function parseCgroupFile(text: string): CgroupLine[] {
  const out: CgroupLine[] = [];
  for (const line of text.split('\n')) {
    const a = line.indexOf(':');
    const b = a < 0 ? -1 : line.indexOf(':', a + 1);
    if (b < 0) continue;
    out.push({ id: line.slice(0, a), controllers: line.slice(a + 1, b).split(',').filter(Boolean), path: line.slice(b + 1) });
  }
  return out;
}

/** The directory of cgroup `path` on a mount whose root is `root`, or null if the mount does not
 *  show it (a bind mount of a sub-tree that does not contain it). */
function dirOnMount(m: Mount, path: string): string | null {
  const root = m.root === '/' ? '' : m.root.replace(/\/+$/, '');
  if (root && path !== root && !path.startsWith(root + '/')) return null;
  const rel = path.slice(root.length).replace(/^\/+|\/+$/g, '');
  // Normalised (no trailing slash) so a dir can be compared with its mount point.
  return rel ? join(m.mountPoint, rel) : join(m.mountPoint);
}

class Unavailable extends Error {}

/** Pick the cpu cgroup out of /proc/PID/cgroup text and the mounts. Throws Unavailable with the reason. */
async function locate(cgroupText: string, mounts: Mount[]): Promise<CpuCgroupLocation> {
  const lines = parseCgroupFile(cgroupText);
  const v1 = lines.find((l) => l.id !== '0' && l.controllers.includes('cpu'));
  if (v1) {
    if (v1.path.endsWith(' (deleted)')) throw new Unavailable(`the process's cpu cgroup ${v1.path} was removed`);
    for (const m of mounts) {
      if (m.fsType !== 'cgroup' || !m.superOptions.includes('cpu')) continue;
      const dir = dirOnMount(m, v1.path);
      if (dir) return { version: 1, mountPoint: m.mountPoint, path: v1.path, dir };
    }
    throw new Unavailable(`the cpu controller (cgroup v1, ${v1.path}) is not mounted where this agent can see it`);
  }
  const v2 = lines.find((l) => l.id === '0' && l.controllers.length === 0);
  if (!v2) throw new Unavailable('the process is in no cgroup hierarchy with a cpu controller');
  if (v2.path.endsWith(' (deleted)')) throw new Unavailable(`the process's cgroup ${v2.path} was removed`);
  for (const m of mounts) {
    if (m.fsType !== 'cgroup2') continue;
    const dir = dirOnMount(m, v2.path);
    if (!dir) continue;
    const controllers = (await readFile(join(dir, 'cgroup.controllers'), 'utf8').catch(() => '')).split(/\s+/);
    if (!controllers.includes('cpu'))
      throw new Unavailable(
        `the cpu controller is not available in the process's cgroup2 ${v2.path} (bound to a v1 hierarchy, or not enabled by its parent)`,
      );
    return { version: 2, mountPoint: m.mountPoint, path: v2.path, dir };
  }
  throw new Unavailable('cgroup2 is not mounted where this agent can see it, and no v1 hierarchy has the cpu controller');
}

/** Where the cpu accounting of `pid` (or of one of its threads: `tid`) lives. */
export async function locateCpuCgroup(pid: number, opts: { tid?: number; procRoot?: string } = {}): Promise<CpuCgroupLocation> {
  const procRoot = opts.procRoot ?? '/proc';
  const file = opts.tid === undefined ? join(procRoot, String(pid), 'cgroup') : join(procRoot, String(pid), 'task', String(opts.tid), 'cgroup');
  return locate(await readFile(file, 'utf8'), await readMounts(procRoot));
}

/** The quota of one cgroup dir as CPUs (Infinity = unlimited), and its period. */
async function readQuota(version: Version, dir: string): Promise<{ quotaUs: number; periodUs: number } | null> {
  try {
    if (version === 1) {
      const q = Number((await readFile(join(dir, 'cpu.cfs_quota_us'), 'utf8')).trim());
      const p = Number((await readFile(join(dir, 'cpu.cfs_period_us'), 'utf8')).trim());
      return { quotaUs: q, periodUs: p };
    }
    const [q, p] = (await readFile(join(dir, 'cpu.max'), 'utf8')).trim().split(/\s+/);
    return { quotaUs: q === 'max' ? -1 : Number(q), periodUs: Number(p) };
  } catch {
    return null; // the root cgroup has no quota files
  }
}

/** The tightest quota from `dir` up to the mount point, in CPUs. */
async function inheritedLimitCpus(version: Version, mountPoint: string, dir: string): Promise<number> {
  let limit = Infinity;
  for (let d = dir; ; d = join(d, '..')) {
    const q = await readQuota(version, d);
    if (q && q.quotaUs > 0 && q.periodUs > 0) limit = Math.min(limit, q.quotaUs / q.periodUs);
    if (d === mountPoint || d === '/' || !d.startsWith(mountPoint)) break;
  }
  return limit;
}

function parseCpuList(s: string): number {
  let n = 0;
  for (const part of s.trim().split(',')) {
    if (!part) continue;
    const [a, b] = part.split('-').map(Number);
    n += b === undefined ? 1 : b - a! + 1;
  }
  return n;
}

async function listTids(procRoot: string, pid: number): Promise<number[]> {
  try {
    return (await readdir(join(procRoot, String(pid), 'task'))).map(Number).filter((n) => Number.isInteger(n) && n > 0);
  } catch {
    return [];
  }
}

/** Field 22 of /proc/PID/stat: tells a pid apart from a later process that reuses it. */
async function startTime(procRoot: string, pid: number): Promise<string | null> {
  try {
    const s = await readFile(join(procRoot, String(pid), 'stat'), 'utf8');
    return s.slice(s.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

/** CPU time (utime + stime) of a process in seconds, from /proc/PID/stat. */
export async function cpuSeconds(pid: number, procRoot = '/proc'): Promise<number | null> {
  try {
    const s = await readFile(join(procRoot, String(pid), 'stat'), 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

/** USER_HZ: 100 on every Linux architecture Tern runs on (the ABI fixes it for x86_64). */
const CLK_TCK = 100;

/** CPUs used by a process over `ms` milliseconds (null if it is gone). */
export async function measureCpus(procRoot: string, pid: number, ms: number): Promise<number | null> {
  const t0 = performance.now();
  const a = await cpuSeconds(pid, procRoot);
  await new Promise((r) => setTimeout(r, ms));
  const b = await cpuSeconds(pid, procRoot);
  const dt = (performance.now() - t0) / 1000;
  return a === null || b === null ? null : (b - a) / dt;
}

async function readIds(file: string): Promise<number[]> {
  try {
    return (await readFile(file, 'utf8')).split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** rmdir a cgroup; right after its last task exited the kernel may still count it populated for a
 *  moment (EBUSY), so retry briefly. ENOENT counts as done. */
async function removeCgroupDir(dir: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await rmdir(dir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || i >= 50) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/** Write a cgroup control file. 'r+' never creates: a wrong path must fail, not leave a regular
 *  file behind (on a tmpfs above the cgroup mounts, say). */
function writeCg(file: string, text: string): Promise<void> {
  return writeFile(file, text, { flag: 'r+' });
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Throttles one process for one migration. Create with CpuThrottle.open(); call step() each time the
 * pre-copy loop sees the dirty rate outrun the bandwidth; release() when the migration ends (either
 * way). All methods are safe to call after the process is gone.
 */
export class CpuThrottle {
  /** Why throttling cannot be done for this process, or null. step() is a no-op returning null then. */
  unavailable: string | null = null;
  /** The location the process had when we found it (per thread in `origByTid`). */
  readonly origin: CpuCgroupLocation | null;
  /** Quota of the original cgroup when we started (we never change it; recorded for reporting). */
  originalQuota: { quotaUs: number; periodUs: number } | null = null;

  private readonly initial: number;
  private readonly increment: number;
  private readonly max: number;
  private readonly period: number;
  private readonly procRoot: string;
  private baseline: number;
  private readonly origByTid = new Map<number, string>();
  private startTime: string | null = null;
  private ourDir: string | null = null;
  private enabledSubtreeCpu = false;
  private state: ThrottleState | null = null;
  private released = false;

  private constructor(
    readonly pid: number,
    readonly migrationId: string,
    origin: CpuCgroupLocation | null,
    opts: ThrottleOptions,
  ) {
    this.origin = origin;
    this.initial = opts.initialPercent ?? 20;
    this.increment = opts.incrementPercent ?? 10;
    this.max = Math.min(opts.maxPercent ?? 99, 99);
    this.period = opts.periodUs ?? 100_000;
    this.procRoot = opts.procRoot ?? '/proc';
    this.baseline = opts.baselineCpus ?? NaN;
  }

  /** Find the process's cpu cgroup and record where every thread is. Never throws for "cannot
   *  throttle here": the returned object then has `unavailable` set. */
  static async open(pid: number, migrationId: string, opts: ThrottleOptions = {}): Promise<CpuThrottle> {
    if (!/^[A-Za-z0-9._-]{1,200}$/.test(migrationId)) throw new Error(`migration id ${JSON.stringify(migrationId)} is not usable in a cgroup name`);
    const procRoot = opts.procRoot ?? '/proc';
    let origin: CpuCgroupLocation | null = null;
    let reason: string | null = null;
    try {
      origin = await locateCpuCgroup(pid, { procRoot });
    } catch (e) {
      reason = e instanceof Unavailable ? e.message : `cannot read the cgroup of pid ${pid}: ${errText(e)}`;
    }
    const t = new CpuThrottle(pid, migrationId, origin, opts);
    t.unavailable = reason;
    if (!origin) return t;
    t.startTime = await startTime(procRoot, pid);
    t.originalQuota = await readQuota(origin.version, origin.dir);
    if (!Number.isFinite(t.baseline)) {
      let cpus = Infinity;
      try {
        const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(await readFile(join(procRoot, String(pid), 'status'), 'utf8'));
        if (m) cpus = parseCpuList(m[1]!);
      } catch {
        /* gone: step() will notice */
      }
      const threads = Math.max(1, (await listTids(procRoot, pid)).length);
      t.baseline = Math.min(cpus, threads, await inheritedLimitCpus(origin.version, origin.mountPoint, origin.dir));
      if ((opts.measureMs ?? 0) > 0) {
        const used = await measureCpus(procRoot, pid, opts.measureMs!);
        if (used !== null) t.baseline = Math.min(t.baseline, Math.max(0.05, used));
      }
    }
    if (!(t.baseline > 0) || !Number.isFinite(t.baseline)) t.baseline = 1;
    return t;
  }

  /** The cgroup directory we create (whether or not it exists yet). */
  get cgroupDir(): string | null {
    return this.origin ? join(this.origin.dir, THROTTLE_PREFIX + this.migrationId) : null;
  }

  /** The current limit, or null when not throttling. */
  current(): ThrottleState | null {
    return this.state ? { ...this.state } : null;
  }

  /** One auto-converge step: the first takes initialPercent off, each further one incrementPercent
   *  more, up to maxPercent. Returns the new state, or null if throttling is unavailable. */
  async step(): Promise<ThrottleState | null> {
    const next = this.state ? Math.min(this.max, this.state.percentOff + this.increment) : Math.min(this.max, this.initial);
    return this.setPercent(next);
  }

  /** Set an exact throttle (0..maxPercent % off). */
  async setPercent(percentOff: number): Promise<ThrottleState | null> {
    if (this.unavailable || !this.origin) return null;
    if (this.released) throw new Error('CpuThrottle: already released');
    const off = Math.max(0, Math.min(this.max, percentOff));
    const quotaUs = Math.max(MIN_QUOTA_US, Math.round((this.period * this.baseline * (100 - off)) / 100));
    try {
      if (!this.ourDir) await this.enter(quotaUs);
      else await this.writeQuota(this.ourDir, quotaUs);
    } catch (e) {
      // Anything that stops us here means "no throttle", never "no migration": put back what we did.
      this.unavailable = e instanceof Unavailable ? e.message : `throttling failed: ${errText(e)}`;
      this.state = null;
      await this.undo().catch(() => undefined);
      return null;
    }
    this.state = { percentOff: off, quotaUs, periodUs: this.period };
    return this.current();
  }

  private async writeQuota(dir: string, quotaUs: number): Promise<void> {
    if (this.origin!.version === 1) {
      // Quota first to -1 so a period change never meets an old quota it would violate.
      await writeCg(join(dir, 'cpu.cfs_quota_us'), '-1');
      await writeCg(join(dir, 'cpu.cfs_period_us'), String(this.period));
      await writeCg(join(dir, 'cpu.cfs_quota_us'), String(quotaUs));
    } else {
      await writeCg(join(dir, 'cpu.max'), `${quotaUs} ${this.period}`);
    }
  }

  /** Create our cgroup under the process's, limit it, move every thread in. */
  private async enter(quotaUs: number): Promise<void> {
    const origin = this.origin!;
    const st = await startTime(this.procRoot, this.pid);
    if (st === null || st !== this.startTime) throw new Unavailable(`pid ${this.pid} is gone`);
    // Record where each thread is now, so release() can put each back exactly.
    for (const tid of await listTids(this.procRoot, this.pid)) {
      try {
        this.origByTid.set(tid, (await locateCpuCgroup(this.pid, { tid, procRoot: this.procRoot })).dir);
      } catch {
        /* thread exited meanwhile */
      }
    }
    if (origin.version === 2) {
      const sub = join(origin.dir, 'cgroup.subtree_control');
      const enabled = (await readFile(sub, 'utf8')).split(/\s+/).includes('cpu');
      if (!enabled) {
        try {
          await writeCg(sub, '+cpu');
          this.enabledSubtreeCpu = true;
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          throw new Unavailable(
            code === 'EBUSY'
              ? `cgroup v2 "no internal processes": cannot enable the cpu controller below ${origin.path}, which holds processes`
              : `cannot enable the cpu controller below ${origin.path}: ${errText(e)}`,
          );
        }
      }
    }
    const dir = this.cgroupDir!;
    try {
      await mkdir(dir);
    } catch (e) {
      // A leftover from an earlier attempt of the same migration is ours to reuse.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    this.ourDir = dir;
    await this.writeQuota(dir, quotaUs);
    try {
      // The whole thread group at once, under the kernel's threadgroup lock: no clone slips through.
      await writeCg(join(dir, 'cgroup.procs'), String(this.pid));
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ESRCH') throw new Unavailable(`pid ${this.pid} is gone`);
      if (code === 'EINVAL' && origin.version === 1)
        throw new Unavailable(`pid ${this.pid} cannot join a cpu cgroup without real-time runtime (it has real-time threads?)`);
      throw e;
    }
    if (origin.version === 1) {
      // In v1 a thread may have been placed apart from its group; cgroup.procs moved it too, but
      // check and move any straggler by tid.
      const inOurs = new Set(await readIds(join(dir, 'tasks')));
      for (const tid of await listTids(this.procRoot, this.pid))
        if (!inOurs.has(tid)) await writeCg(join(dir, 'tasks'), String(tid)).catch(() => undefined);
    }
  }

  /** Put the threads back, remove our cgroup (and the subtree_control change). */
  private async undo(): Promise<void> {
    const dir = this.ourDir ?? this.cgroupDir;
    const origin = this.origin;
    if (!dir || !origin) return;
    const alive = (await startTime(this.procRoot, this.pid)) === this.startTime && this.startTime !== null;
    // Lift the limit before moving anyone out: a thread moved while its group is throttled could
    // sit unscheduled for a while after the move (seen here: 0 % CPU for ~1 s after a release at
    // 99 % off). With no quota the kernel unthrottles the group at once.
    await writeCg(join(dir, this.origin!.version === 1 ? 'cpu.cfs_quota_us' : 'cpu.max'), this.origin!.version === 1 ? '-1' : `max ${this.period}`).catch(() => undefined);
    if (alive) {
      const leaderHome = this.origByTid.get(this.pid) ?? origin.dir;
      const procs = new Set(await readIds(join(dir, 'cgroup.procs')));
      if (procs.has(this.pid)) {
        // Whole group back to where the leader was (atomic w.r.t. clone), then threads that lived
        // elsewhere to their own cgroups (v1 only: v2 domain cgroups hold whole processes).
        await writeCg(join(leaderHome, 'cgroup.procs'), String(this.pid)).catch(() => undefined);
        if (origin.version === 1)
          for (const [tid, home] of this.origByTid)
            if (home !== leaderHome) await writeCg(join(home, 'tasks'), String(tid)).catch(() => undefined);
      } else if (origin.version === 1) {
        // The group was moved away by someone else; only threads still in ours are ours to return.
        const mine = new Set(await listTids(this.procRoot, this.pid));
        for (const tid of await readIds(join(dir, 'tasks')))
          if (mine.has(tid)) await writeCg(join(this.origByTid.get(tid) ?? leaderHome, 'tasks'), String(tid)).catch(() => undefined);
      }
    }
    await removeCgroupDir(dir);
    this.ourDir = null;
    if (this.enabledSubtreeCpu) {
      // Only undo our own change, and only if no other child cgroup has come to rely on it.
      const others = (await readdir(origin.dir, { withFileTypes: true }).catch(() => [])).filter((d) => d.isDirectory());
      if (others.length === 0) await writeCg(join(origin.dir, 'cgroup.subtree_control'), '-cpu').catch(() => undefined);
      this.enabledSubtreeCpu = false;
    }
  }

  /** Give everything back. Idempotent; safe after the process exited or was moved elsewhere. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    this.state = null;
    await this.undo();
  }
}

export interface SweepResult {
  /** Directories removed. */
  removed: string[];
  /** Directories left because a process is still in them and isActive did not say it is an orphan. */
  kept: string[];
  /** Problems (the sweep goes on past them). */
  errors: string[];
}

/**
 * Remove leftover tern-throttle-* cgroups, e.g. after an agent crash. The agent calls it at start.
 *
 * An empty one (its process exited or was moved away) is always removed. One still holding a process
 * is removed only if `isActive` is given and returns false for its migration id: the process is then
 * returned to the parent cgroup — where it was created, so where the leader came from — first.
 * Without isActive, populated ones are left: several agents (lab hosts) can share one kernel's cgroup
 * tree, and a live migration of another agent must not lose its throttle.
 */
export async function sweepThrottleCgroups(
  opts: {
    isActive?: (migrationId: string) => boolean;
    /** Only consider dirs whose migration id passes (tests use it to stay within their own). */
    filter?: (migrationId: string) => boolean;
    /** An empty dir younger than this is left: a CpuThrottle may be between mkdir and moving its
     *  process in. Default 10000 ms. */
    minAgeMs?: number;
    procRoot?: string;
  } = {},
): Promise<SweepResult> {
  const minAgeMs = opts.minAgeMs ?? 10_000;
  const res: SweepResult = { removed: [], kept: [], errors: [] };
  const mounts = (await readMounts(opts.procRoot ?? '/proc')).filter(
    (m) => m.fsType === 'cgroup2' || (m.fsType === 'cgroup' && m.superOptions.includes('cpu')),
  );
  const seen = new Set<string>();
  const visit = async (dir: string, depth: number, version: Version): Promise<void> => {
    if (depth > 32) return;
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      if (!e.isDirectory()) continue;
      const sub = join(dir, e.name);
      if (!e.name.startsWith(THROTTLE_PREFIX)) {
        await visit(sub, depth + 1, version);
        continue;
      }
      const id = e.name.slice(THROTTLE_PREFIX.length);
      if (opts.filter && !opts.filter(id)) continue;
      // The same hierarchy can be mounted more than once (bind mounts): identify by inode.
      const st = await stat(sub).catch(() => null);
      if (!st) continue;
      const key = `${st.dev}:${st.ino}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const procs = await readIds(join(sub, 'cgroup.procs'));
      if (procs.length === 0 && Date.now() - st.mtimeMs < minAgeMs) {
        res.kept.push(sub);
        continue;
      }
      if (procs.length > 0) {
        if (!opts.isActive || opts.isActive(id)) {
          res.kept.push(sub);
          continue;
        }
        for (const pid of procs) await writeCg(join(dir, 'cgroup.procs'), String(pid)).catch(() => undefined);
        if (version === 1)
          for (const tid of await readIds(join(sub, 'tasks'))) await writeCg(join(dir, 'tasks'), String(tid)).catch(() => undefined);
      }
      try {
        await removeCgroupDir(sub);
        res.removed.push(sub);
      } catch (err) {
        res.errors.push(`${sub}: ${errText(err)}`);
      }
    }
  };
  for (const m of mounts) await visit(m.mountPoint, 0, m.fsType === 'cgroup2' ? 2 : 1);
  return res;
}
