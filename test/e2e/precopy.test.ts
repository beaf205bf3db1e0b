// Pre-copy end to end through `migrate --lab --mode precopy`: memory moves in rounds while the
// process runs (userfaultfd write-protect + PAGEMAP_SCAN on this kernel), the freeze carries only
// the last dirty set, and the process continues on hostB with its memory exactly as it was at the
// freeze — memcheck's verifier catches a wrong page, and a stale one (a dirty page a round missed).
import t, { type Test } from 'tap';
import { mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { MigrationEvent } from '@tern/protocol';
import { labWithAgents, migrate, redisCli, runsOn, sleep, startRedis } from './helpers.js';
import { num, readStatus, waitForStatus, workloadBin } from '../workloads/status.js';

const GiB = 1024 ** 3;

function rounds(events: MigrationEvent[]) {
  return events.filter((e) => e.type === 'progress' && e.state === 'precopy' && e.progress?.pages !== undefined).map((e) => e.progress!);
}

function summary(m: Awaited<ReturnType<typeof migrate>>): string {
  const stats = m.record?.stats as { downtimeMs?: number; bytes?: number; rounds?: number; pages?: { dirty?: number } } | undefined;
  const end = m.events.find((e) => /pre-copy ends after/.test(e.message))?.message ?? 'no pre-copy end';
  const frozen = m.events.find((e) => /ms frozen/.test(e.message))?.message ?? '';
  const perRound = rounds(m.events).map((p) => `r${p.round} ${p.pages}p${p.throttlePercent ? ` thr ${p.throttlePercent}%` : ''}${p.predictedDowntimeMs != null ? ` ~${p.predictedDowntimeMs.toFixed(0)}ms` : ''}`).join(', ');
  return `downtime ${stats?.downtimeMs?.toFixed(1)} ms; ${end}; switchover ${frozen}; ${stats?.pages?.dirty} pages in the freeze; ${((stats?.bytes ?? 0) / 1e6).toFixed(0)} MB sent in all; rounds: ${perRound}`;
}

/** Throttle cgroups (apps/agent/src/throttle.ts) left anywhere in the cpu hierarchy. */
function throttleLeftovers(): string[] {
  const out: string[] = [];
  const walk = (dir: string, depth: number) => {
    let names: string[] = [];
    try {
      names = readdirSync(dir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name);
    } catch {
      return;
    }
    for (const n of names) {
      if (n.startsWith('tern-throttle-')) out.push(join(dir, n));
      else if (depth < 3) walk(join(dir, n), depth + 1);
    }
  };
  for (const root of ['/sys/fs/cgroup/cpu', '/sys/fs/cgroup/unified', '/sys/fs/cgroup']) walk(root, 0);
  return [...new Set(out)];
}

async function memcheckCase(t: Test, opts: { mib: number; rate: number; args: string[] }) {
  const lab = await labWithAgents(t);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-pre-')), 'memcheck.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', String(opts.mib), '--write-rate', String(opts.rate)]);
  await waitForStatus(status, (s) => num(s, 'sweeps') >= 1 && num(s, 'pages_written') > 0, 60_000);
  const m = await migrate(lab, wl.pid, 'hostA', 'hostB', ['--mode', 'precopy', ...opts.args]);
  t.comment(summary(m));
  t.equal(m.code, 0, m.code === 0 ? 'migrate --mode precopy exit 0' : `migrate exit ${m.code}: ${m.out.slice(-800)}`);
  t.equal(m.record?.state, 'done');
  t.ok(await runsOn(lab, 'hostB', wl.pid), 'memcheck runs on hostB');
  t.notOk(await runsOn(lab, 'hostA', wl.pid), 'and is gone from hostA');
  // Two full sweeps after the move: every page checked against its own header and the writer's record.
  const at = num(readStatus(status), 'sweeps');
  const after = await waitForStatus(status, (s) => num(s, 'sweeps') >= at + 2 && s.pid === String(wl.pid), 60_000);
  t.equal(num(after, 'errors'), 0, `memory verified on hostB: no wrong and no stale page (${after.lasterror ?? ''})`);
  t.ok(num(after, 'pages_written') > 0, 'and the writer goes on there');
  t.same(throttleLeftovers(), [], 'no throttle cgroup left behind');
  return { m, after };
}

t.test('1 GiB written at 5 MB/s: rounds while it runs, only the last dirty pages in the freeze', async (t) => {
  const { m } = await memcheckCase(t, { mib: 1024, rate: 5, args: ['--max-downtime', '100'] });
  const r = rounds(m.events);
  t.ok(r.length >= 1, `${r.length} pre-copy rounds`);
  t.ok((r[0]?.pages ?? 0) >= (GiB / 4096) * 0.9, 'round 0 sent the whole region while the process ran');
  const stats = m.record!.stats as { pages: { dirty: number } };
  t.ok(stats.pages.dirty < (GiB / 4096) * 0.05, `the freeze carried ${stats.pages.dirty} pages, under 5 % of the region`);
  t.notOk(r.some((p) => (p.throttlePercent ?? 0) > 0), 'no throttling at a low rate');
  t.ok(m.events.some((e) => /pre-copy ends after \d+ rounds: the predicted downtime is under the limit/.test(e.message)), 'converged under --max-downtime 100 ms (the verdict, not a figure: the downtime is printed above)');
});

t.test('a writer that outruns the link (as fast as its CPU allows): auto-converge throttles it, and the memory is still right', async (t) => {
  // memcheck's writer bound only by its CPU (~1.4 GB/s here) dirties 256 MiB faster than rounds
  // can send it: every round is the whole region until the throttle takes its CPU away.
  const mib = 256;
  const { m } = await memcheckCase(t, { mib, rate: 100_000, args: ['--max-downtime', '100', '--max-rounds', '20'] });
  const r = rounds(m.events);
  t.ok(r.some((p) => (p.throttlePercent ?? 0) > 0), `the CPU was throttled (${r.map((p) => p.throttlePercent ?? 0).join(' ')} %)`);
  const dirty = (m.record!.stats as { pages: { dirty: number } }).pages.dirty;
  // Every unthrottled round was the whole region; the quota is given back right before the final
  // freeze (a throttled process answers a freeze only when its quota lets it run), so the writer
  // gets a few ms at full speed: a quarter of the region is a wide margin.
  t.ok(dirty < (mib * 256) / 4, `and the dirty set shrank: ${dirty} pages in the freeze, under 25 % of the region`);
});

t.test('redis with a ~1 GiB dataset under redis-benchmark moves in pre-copy mode without an error', async (t) => {
  const lab = await labWithAgents(t);
  const pid = await startRedis(lab);
  // DEBUG POPULATE and DEBUG DIGEST over 1 GiB take seconds, more on a busy machine.
  const cli = (...args: string[]) => redisCli(lab, 'client', lab.info.serviceAddress, 6379, args, 180_000);
  await cli('DEBUG', 'POPULATE', '4000000', 'key', '200');
  const used = Number((await cli('INFO', 'memory')).match(/used_memory:(\d+)/)?.[1]);
  t.ok(used > 0.9 * GiB, `dataset ${(used / GiB).toFixed(2)} GiB`);
  const digest = await cli('DEBUG', 'DIGEST');
  const dbsize = await cli('DBSIZE');

  const bench = lab.spawn('client', ['redis-benchmark', '-h', lab.info.serviceAddress, '-c', '50', '-t', 'get', '-r', '4000000', '-l', '-q'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let benchOut = '';
  bench.stdout!.setEncoding('utf8').on('data', (d: string) => (benchOut += d));
  bench.stderr!.setEncoding('utf8').on('data', (d: string) => (benchOut += d));
  t.teardown(() => bench.kill('SIGKILL'));
  await sleep(1500);

  const m = await migrate(lab, pid, 'hostA', 'hostB', ['--mode', 'precopy']);
  t.comment(summary(m));
  t.equal(m.code, 0, m.code === 0 ? 'migrate --mode precopy exit 0' : `migrate exit ${m.code}: ${m.out.slice(-800)}`);
  await sleep(1500);
  const alive = bench.exitCode === null && bench.signalCode === null;
  bench.kill('SIGINT');
  t.ok(alive, `redis-benchmark's 50 connections were still running after the move (${benchOut.slice(-200)})`);
  t.notMatch(benchOut, /error|reset|closed|refused/i, 'and reported no error');
  t.ok(await runsOn(lab, 'hostB', pid), 'redis runs on hostB');
  t.equal(await cli('DBSIZE'), dbsize, 'DBSIZE unchanged');
  t.equal(await cli('DEBUG', 'DIGEST'), digest, 'DEBUG DIGEST unchanged');
  t.ok(rounds(m.events).length >= 1, 'at least one pre-copy round');
  t.same(throttleLeftovers(), [], 'no throttle cgroup left behind');
});


