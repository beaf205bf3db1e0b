// The auto-converge CPU throttle (apps/agent/src/throttle.ts) against real processes and the real
// cpu cgroup of this machine: a busy loop really slows down, comes back to exactly the cgroup it was
// in, threads created while throttled follow, and nothing of ours is left behind in any outcome.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CpuThrottle, sweepThrottleCgroups, THROTTLE_PREFIX } from '../../apps/agent/src/throttle.js';
import { workloadBin, waitForStatus } from '../workloads/status.js';

const CLK_TCK = 100;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A migration id unique to this run: pid + random, so parallel runs never share a cgroup. */
const newId = () => `test-${process.pid}-${randomBytes(4).toString('hex')}`;

/** Every cgroup this test may have made, removed at the end even after a failure. */
const madeDirs = new Set<string>();
t.teardown(async () => {
  for (const d of madeDirs) {
    if (!existsSync(d)) continue;
    // Move anything still inside back to the parent, then remove.
    const parent = join(d, '..');
    for (const f of ['cgroup.procs', 'tasks'])
      for (const id of readIdsSafe(join(d, f))) {
        try {
          writeFileSync(join(parent, f), String(id), { flag: 'r+' });
        } catch {
          /* gone */
        }
      }
    try {
      rmdirSync(d);
    } catch {
      /* reported by the assertions */
    }
  }
});

function readIdsSafe(file: string): number[] {
  try {
    return readFileSync(file, 'utf8').split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

function cpuSeconds(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** Fraction of one CPU the process used over ~ms. */
async function cpuUse(pid: number, ms = 1000): Promise<number> {
  const t0 = performance.now();
  const a = cpuSeconds(pid);
  await sleep(ms);
  const b = cpuSeconds(pid);
  return (b - a) / ((performance.now() - t0) / 1000);
}

function cpuLine(pid: number, tid?: number): string {
  const file = tid === undefined ? `/proc/${pid}/cgroup` : `/proc/${pid}/task/${tid}/cgroup`;
  const lines = readFileSync(file, 'utf8').split('\n');
  // v1: the hierarchy listing the cpu controller; otherwise the unified line.
  return lines.find((l) => /^\d+:([^:]*,)?cpu(,[^:]*)?:/.test(l)) ?? lines.find((l) => l.startsWith('0::')) ?? '';
}

/** Is there a cpu controller this test can expect the throttle to use? */
function cpuControllerPresent(): boolean {
  const mi = readFileSync('/proc/self/mountinfo', 'utf8').split('\n');
  if (mi.some((l) => / - cgroup \S+ (\S*,)?cpu(,|$)/.test(l))) return true;
  const v2 = mi.find((l) => / - cgroup2 /.test(l));
  if (!v2) return false;
  try {
    return readFileSync(join(v2.split(' ')[4]!, 'cgroup.controllers'), 'utf8').split(/\s+/).includes('cpu');
  } catch {
    return false;
  }
}

/** What the helpers need of a (sub)test: somewhere to hang cleanup. */
type Teardown = { teardown(fn: () => unknown): void };

function startSpinner(t: Teardown): ChildProcess & { pid: number } {
  // Detached: its own process group, so nothing of the test runner is in its way; killed by pid.
  const child = spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore', detached: true });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  if (!child.pid) throw new Error('spawn failed');
  return child as ChildProcess & { pid: number };
}

async function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  await new Promise((r) => child.once('exit', r));
}

const present = cpuControllerPresent();

t.test('a busy loop is throttled in steps and given back exactly', { skip: !present && 'no cpu controller on this machine' }, async (t) => {
  const child = startSpinner(t);
  const before = readFileSync(`/proc/${child.pid}/cgroup`, 'utf8');
  await sleep(200);
  const base = await cpuUse(child.pid);
  t.comment(`unthrottled: ${(base * 100).toFixed(0)} % of a CPU`);

  const id = newId();
  const thr = await CpuThrottle.open(child.pid, id);
  t.equal(thr.unavailable, null, 'throttling is available here');
  t.equal(thr.current(), null, 'nothing set before the first step');
  const dir = thr.cgroupDir!;
  madeDirs.add(dir);
  t.ok(dir.endsWith(`/${THROTTLE_PREFIX}${id}`), `our cgroup: ${dir}`);

  const seen: number[] = [];
  for (const want of [20, 30, 40, 50]) {
    const st = await thr.step();
    t.equal(st?.percentOff, want, `step to ${want} % off`);
    const use = await cpuUse(child.pid, want === 50 ? 1500 : 800);
    seen.push(use);
    t.comment(`${want} % off: quota ${st?.quotaUs}/${st?.periodUs} µs → ${(use * 100).toFixed(0)} % of a CPU`);
  }
  t.ok(existsSync(dir), 'our cgroup exists while throttled');
  t.match(cpuLine(child.pid), new RegExp(`/${THROTTLE_PREFIX}${id}$`), 'the process is in our cgroup');
  const half = seen[3]!;
  // Wide margins: the machine is shared with other tests. The quota is an upper bound, so the
  // throttled use must not exceed ~half by much whatever the load; compared with the unthrottled
  // use only when the spinner had a CPU to itself (on a saturated machine it gets ~half anyway).
  t.ok(half < 0.65, `at 50 % off the spinner uses ${(half * 100).toFixed(0)} % (< 65 %)`);
  t.ok(half > 0.2, `at 50 % off it still runs (${(half * 100).toFixed(0)} %)`);
  if (base > 0.8) t.ok(half / base < 0.7, `50 % off cuts use to ${((half / base) * 100).toFixed(0)} % of unthrottled`);
  else t.comment(`machine busy (unthrottled ${(base * 100).toFixed(0)} %): ratio not checked`);
  t.same(thr.current(), { percentOff: 50, quotaUs: 50_000, periodUs: 100_000 }, 'current() reports the limit');

  // The cap.
  for (let i = 0; i < 10; i++) await thr.step();
  t.equal(thr.current()?.percentOff, 99, 'steps stop at 99 % off');
  const capped = await cpuUse(child.pid, 800);
  t.comment(`99 % off: ${(capped * 100).toFixed(1)} % of a CPU`);
  t.ok(capped < 0.1, '99 % off leaves almost nothing');

  await thr.release();
  t.equal(readFileSync(`/proc/${child.pid}/cgroup`, 'utf8'), before, 'back in exactly the cgroups it came from');
  t.notOk(existsSync(dir), 'our cgroup is gone');
  t.equal(thr.current(), null, 'current() is null after release');
  await thr.release();
  t.pass('a second release is fine');
  const after = await cpuUse(child.pid, 800);
  t.comment(`released: ${(after * 100).toFixed(0)} % of a CPU`);
  t.ok(after > capped + 0.2, 'it runs freely again after release');
});

t.test('threads created while throttled follow; release returns all of them', { skip: !present && 'no cpu controller on this machine' }, async (t) => {
  const dirTmp = mkdtempSync(join(tmpdir(), 'tern-throttle-test-'));
  t.teardown(() => rmSync(dirTmp, { recursive: true, force: true }));
  const status = join(dirTmp, 'status');
  const child = spawn(workloadBin('threads_churn'), ['--status', status, '--long', '2', '--churners', '2'], { stdio: 'ignore' });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const pid = child.pid!;
  await waitForStatus(status, (s) => s.phase === 'running', 10_000);
  const origin = cpuLine(pid);

  const thr = await CpuThrottle.open(pid, newId());
  madeDirs.add(thr.cgroupDir!);
  t.equal(thr.unavailable, null);
  await thr.setPercent(30);
  const suffix = thr.cgroupDir!.slice(thr.origin!.mountPoint.length);
  let checked = 0;
  let outside = 0;
  for (let round = 0; round < 20; round++) {
    for (const tid of readdirSync(`/proc/${pid}/task`).map(Number)) {
      let line: string;
      try {
        line = cpuLine(pid, tid);
      } catch {
        continue; // a short-lived thread already gone
      }
      checked++;
      if (!line.endsWith(`:${suffix}`)) outside++;
    }
    await sleep(20);
  }
  t.ok(checked > 40, `sampled ${checked} thread placements`);
  t.equal(outside, 0, 'every thread, including ones born after the move, is in our cgroup');

  await thr.release();
  for (const tid of readdirSync(`/proc/${pid}/task`).map(Number)) {
    try {
      t.equal(cpuLine(pid, tid), origin, `thread ${tid} is back`);
    } catch {
      /* exited */
    }
  }
  t.notOk(existsSync(thr.cgroupDir!), 'our cgroup is gone');
  child.kill('SIGTERM');
  await exited(child);
  t.equal(child.exitCode, 0, 'threads_churn saw no error (a throttle is not a stall)');
});

t.test('a process that exits or is moved away meanwhile', { skip: !present && 'no cpu controller on this machine' }, async (t) => {
  const a = startSpinner(t);
  const ta = await CpuThrottle.open(a.pid, newId());
  madeDirs.add(ta.cgroupDir!);
  t.ok(await ta.step(), 'throttled');
  a.kill('SIGKILL');
  await exited(a);
  await ta.release();
  t.notOk(existsSync(ta.cgroupDir!), 'exited: our cgroup is removed');
  await ta.release();

  const b = startSpinner(t);
  const tb = await CpuThrottle.open(b.pid, newId());
  madeDirs.add(tb.cgroupDir!);
  await tb.step();
  // Somebody else (an operator, systemd) moves it to another cgroup: release must leave it there.
  const elsewhere = join(tb.origin!.dir, `tern-test-elsewhere-${process.pid}-${randomBytes(4).toString('hex')}`);
  mkdirSync(elsewhere);
  madeDirs.add(elsewhere);
  writeFileSync(join(elsewhere, 'cgroup.procs'), String(b.pid), { flag: 'r+' });
  const moved = cpuLine(b.pid);
  t.match(moved, /tern-test-elsewhere-/, 'moved by the other party');
  await tb.release();
  t.notOk(existsSync(tb.cgroupDir!), 'moved away: our cgroup is removed');
  t.equal(cpuLine(b.pid), moved, 'and the process stays where the other party put it');
  b.kill('SIGKILL');
  await exited(b);

  const c = startSpinner(t);
  c.kill('SIGKILL');
  await exited(c);
  const tc = await CpuThrottle.open(c.pid, newId());
  t.match(tc.unavailable ?? '', /./, `a pid that is gone before open: ${tc.unavailable}`);
  t.equal(await tc.step(), null, 'step() is a no-op then');
  await tc.release();
});

t.test('sweepThrottleCgroups removes leftovers whose owner is gone', { skip: !present && 'no cpu controller on this machine' }, async (t) => {
  const ids = new Set<string>();
  const mine = (id: string) => ids.has(id);

  // Agent "crashed" with a throttled process that then exited: an empty leftover.
  const a = startSpinner(t);
  const idA = newId();
  ids.add(idA);
  const ta = await CpuThrottle.open(a.pid, idA);
  madeDirs.add(ta.cgroupDir!);
  await ta.step();
  a.kill('SIGKILL');
  await exited(a);

  // And one whose process still runs.
  const b = startSpinner(t);
  const before = readFileSync(`/proc/${b.pid}/cgroup`, 'utf8');
  const idB = newId();
  ids.add(idB);
  const tb = await CpuThrottle.open(b.pid, idB);
  madeDirs.add(tb.cgroupDir!);
  await tb.setPercent(50);

  // filter keeps the sweep to this test's dirs (other runs may share this machine's cgroup tree).
  const young = await sweepThrottleCgroups({ filter: mine });
  t.ok(existsSync(ta.cgroupDir!), 'a just-made empty dir is left alone (it may be mid-setup)');
  t.same(young.removed, []);

  const r1 = await sweepThrottleCgroups({ filter: mine, minAgeMs: 0 });
  t.same(r1.removed, [ta.cgroupDir], 'the empty leftover is removed');
  t.same(r1.kept, [tb.cgroupDir], 'the populated one is kept without isActive');
  t.same(r1.errors, []);
  t.ok(existsSync(tb.cgroupDir!));

  const r2 = await sweepThrottleCgroups({ filter: mine, minAgeMs: 0, isActive: (id) => id !== idB });
  t.same(r2.removed, [tb.cgroupDir], 'an orphan (not active) populated one is removed');
  t.notOk(existsSync(tb.cgroupDir!));
  t.equal(readFileSync(`/proc/${b.pid}/cgroup`, 'utf8'), before, 'its process is back where it was');
  await tb.release();
  t.pass('releasing after a sweep is fine');
});

t.test('cgroup v2 location and the unavailable reasons (fake /proc and cgroupfs)', async (t) => {
  // The real machine has its cpu controller on v1; the v2 code path is checked on a fake tree.
  const root = mkdtempSync(join(tmpdir(), 'tern-throttle-fake-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const proc = join(root, 'proc');
  const cg = join(root, 'cg');
  const pid = 4242;
  mkdirSync(join(proc, 'self'), { recursive: true });
  mkdirSync(join(proc, String(pid), 'task', String(pid)), { recursive: true });
  // A container view: the cgroup2 mount's root is /kubepods/x, the process sits in /kubepods/x/app.
  writeFileSync(join(proc, 'self', 'mountinfo'), `41 31 0:38 /kubepods/x ${cg.replace(/ /g, '\\040')} rw,relatime - cgroup2 cgroup2 rw\n`);
  const cgText = '0::/kubepods/x/app\n';
  writeFileSync(join(proc, String(pid), 'cgroup'), cgText);
  writeFileSync(join(proc, String(pid), 'task', String(pid), 'cgroup'), cgText);
  const stat = `${pid} (spin) R 1 1 1 0 -1 0 0 0 0 0 5 5 0 0 20 0 1 0 777 0 0`;
  writeFileSync(join(proc, String(pid), 'stat'), stat);
  writeFileSync(join(proc, String(pid), 'status'), 'Name:\tspin\nCpus_allowed_list:\t0-3\n');
  const app = join(cg, 'app');
  mkdirSync(app, { recursive: true });

  writeFileSync(join(app, 'cgroup.controllers'), 'memory pids\n');
  const none = await CpuThrottle.open(pid, 'fake1', { procRoot: proc });
  t.match(none.unavailable, /cpu controller is not available .*\/kubepods\/x\/app/, `no cpu: ${none.unavailable}`);
  t.equal(await none.step(), null);
  await none.release();

  writeFileSync(join(app, 'cgroup.controllers'), 'cpu memory pids\n');
  writeFileSync(join(app, 'cpu.max'), '200000 100000\n');
  // subtree_control readable but not writable (even for root): writing "+cpu" fails, as EBUSY
  // would under the no-internal-processes rule.
  symlinkSync('/proc/version', join(app, 'cgroup.subtree_control'));
  const busy = await CpuThrottle.open(pid, 'fake2', { procRoot: proc });
  t.equal(busy.unavailable, null, 'located');
  t.equal(busy.origin?.version, 2);
  t.equal(busy.origin?.dir, app, 'the path is taken relative to the mount root');
  t.same(busy.originalQuota, { quotaUs: 200000, periodUs: 100000 }, 'old quota recorded');
  t.equal(await busy.step(), null, 'step fails softly');
  t.match(busy.unavailable, /cannot enable the cpu controller below \/kubepods\/x\/app/, `reason: ${busy.unavailable}`);
  t.notOk(existsSync(join(app, `${THROTTLE_PREFIX}fake2`)), 'nothing left behind');
  await busy.release();

  await t.rejects(CpuThrottle.open(pid, '../evil'), /not usable in a cgroup name/, 'migration ids are checked');
});
