// Pre-copy through @tern/native with real processes on this host: memcheck (256 MiB, verifying its
// own memory) is moved in rounds while it runs, frozen only for the last dirty set, killed and
// restored here with the same pid from the page server's merged store, and goes on verifying;
// abort at any point before commit leaves the original exactly as it was.
//
// The workload is started by a `sh` of its own session that stays its parent (`cmd & wait`): not a
// child of this Node process (whose child reaping would take ptrace stops) and reaped as soon as
// commit kills it, so its pid is free for the restore (this host's pid 1 does not reap orphans).
import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { newPageCredentials, PageServer, PrecopySession, restoreProcess, type PageDestination, type RoundStats } from '@tern/native';
import { readStatus, waitForStatus, workloadBin, type Status } from '../workloads/status.js';

/** The part of a tap test the helpers need. */
interface Teardownable {
  teardown(fn: () => unknown): void;
}

const MB = 1e6;
const ms = (ns: number) => (ns / 1e6).toFixed(1);
const mb = (bytes: number) => (bytes / MB).toFixed(1);
const n = (s: Status, k: string) => Number(s[k]);

async function sleep(msec: number): Promise<void> {
  await new Promise((r) => setTimeout(r, msec));
}

/** Starts memcheck under its own `sh` (see the header); resolves once it has swept its memory. */
async function startMemcheck(t: Teardownable, mib: number): Promise<{ pid: number; status: string }> {
  const status = join(mkdtempSync(join(tmpdir(), 'tern-precopy-')), 'memcheck.status');
  const sh = spawn('sh', ['-c', '"$0" "$@" & wait', workloadBin('memcheck'), '--status', status, '--mib', String(mib)], {
    detached: true,
    stdio: 'ignore',
  });
  sh.unref();
  const s = await waitForStatus(status, (st) => n(st, 'sweeps') >= 1 && st.phase === 'running', 60_000);
  const pid = n(s, 'pid');
  t.teardown(() => killPid(pid));
  return { pid, status };
}

function killPid(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

function userfaultfds(pid: number): string[] {
  return readdirSync(`/proc/${pid}/fd`)
    .map((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        return '';
      }
    })
    .filter((l) => l.includes('userfaultfd'));
}

/** VMAs registered for userfaultfd write-protect ("uw" in VmFlags). */
function wpRegistered(pid: number): number {
  return readFileSync(`/proc/${pid}/smaps`, 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('VmFlags:') && l.split(/\s+/).includes('uw')).length;
}

function procStatus(pid: number): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const i = line.indexOf(':');
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

function describe(r: RoundStats): string {
  return (
    `round ${r.round}: ${r.pages} pages (${r.zeroPages} zero) ${mb(r.bytes)} MB in ${ms(r.elapsedNs)} ms, scan ${ms(r.scanNs)} ms; ` +
    `dirty ${r.dirtyPages} pages, rate ${mb(r.dirtyRateBytesPerSec)} MB/s, bw ${mb(r.bandwidthBytesPerSec)} MB/s, predicted ${ms(r.predictedDowntimeNs)} ms`
  );
}

async function server(t: Teardownable): Promise<{ srv: PageServer; dest: PageDestination }> {
  const creds = newPageCredentials();
  const srv = await PageServer.start({ address: '127.0.0.1', ...creds });
  t.teardown(() => srv.close());
  return { srv, dest: { address: '127.0.0.1', port: srv.port, ...creds } };
}

t.test('memcheck 256 MiB: rounds while it runs, a short final freeze, restored here and verifying', async (t) => {
  const { pid, status } = await startMemcheck(t, 256);
  const { srv, dest } = await server(t);

  const pre = await PrecopySession.open(pid);
  let committed = false;
  t.teardown(async () => {
    if (!committed) await pre.abort();
  });
  t.comment(`setup: tracking ${pre.setup.tracking}, frozen ${ms(pre.setup.frozenNs)} ms, fixed cost ${ms(pre.setup.fixedCostNs)} ms, ${pre.setup.fullPages} pages to send`);
  t.ok(pre.setup.fullPages >= 65536, `the first full set covers the 256 MiB region (${pre.setup.fullPages} pages)`);

  const limits = { maxDowntimeMs: 20, maxRounds: 8 };
  const capped = 8 * MB;
  let verdict = 'continue';
  while (pre.rounds.length < 3 || (verdict === 'continue' && pre.rounds.length < limits.maxRounds)) {
    // Give memcheck time to dirty pages (~800 rewrites/s), as a control plane between rounds would.
    if (pre.rounds.length > 0) await sleep(150);
    // Round 1 runs under a bandwidth cap; the others as fast as loopback goes.
    const r = await pre.round(pre.rounds.length === 1 ? { ...dest, bandwidthBytesPerSec: capped } : dest);
    const got = await srv.wait(10_000);
    verdict = await pre.decide(limits);
    t.comment(`${describe(r)} → ${verdict}`);
    t.equal(r.round, pre.rounds.length - 1, 'rounds are numbered from 0');
    t.ok(r.transfer, 'each round reports its confirmed stream');
    t.equal(r.pages, (r.transfer?.dataPages ?? 0) + (r.transfer?.zeroPages ?? 0), 'the stream carried exactly the round\'s pages');
    t.same([got.dataPages, got.zeroPages, got.payloadBytes], [r.transfer?.dataPages, r.transfer?.zeroPages, r.bytes], 'and the page server committed the same pages and bytes');
    if (r.round === 1 && r.transfer) {
      const { wireBytes, elapsedSecs } = r.transfer;
      t.comment(`round 1 under an ${mb(capped)} MB/s cap: ${mb(wireBytes)} MB in ${(elapsedSecs * 1e3).toFixed(1)} ms`);
      // The sender's token bucket starts full (50 ms of the rate): only the rest is paced.
      const paced = Math.max(0, wireBytes - capped / 20);
      t.ok(elapsedSecs >= (paced / capped) * 0.9, `the cap holds: at least ${((paced / capped) * 1e3).toFixed(0)} ms for the paced part`);
    }
  }
  const [first, ...later] = pre.rounds;
  if (!first) throw new Error('no round ran');
  t.ok(first.pages >= 65536 && first.bytes >= 200 * MB, `round 0 sent the whole region (${mb(first.bytes)} MB)`);
  for (const r of later) t.ok(r.pages < first.pages / 4, `round ${r.round} sent only the dirty set (${r.pages} pages)`);
  const progress = srv.progress();
  t.equal(progress.streamsCompleted, pre.rounds.length, 'one stream per round, all committed');
  t.equal(progress.streamsFailed, 0);

  await sleep(150);
  const before = readStatus(status);
  const fin = await pre.finish(dest);
  // The final stream is not waited for here: restoreProcess must take it from the server itself
  // (a control plane need not wait for every stream; the latest committed pages must still win).
  t.comment(
    `final (${verdict}): ${fin.finalDirtyPages} dirty pages, ${fin.dump.dataPages} data + ${fin.dump.zeroPages} zero sent, ${fin.stalePages} stale overwritten, ` +
      `frozen ${ms(fin.frozenNs)} ms, stream ${mb(fin.transfer.wireBytes)} MB in ${(fin.transfer.elapsedSecs * 1e3).toFixed(1)} ms`,
  );
  t.ok(fin.image.length > 0, 'an image');
  t.equal(fin.rounds.length, pre.rounds.length, 'the final stats carry every round');
  t.ok(fin.dump.dataPages + fin.dump.zeroPages < first.pages / 4, 'the freeze moved only the last dirty set');
  t.ok(fin.finalDirtyPages > 0 && fin.dump.dataPages > 0, 'pages written since the last round moved in the freeze (and overwrite older copies)');
  const committedStreams = srv.progress().streamsCompleted;
  t.equal(committedStreams, pre.rounds.length + 1, 'the page server committed the final stream too');
  t.equal(procStatus(pid).State?.[0], 't', 'the original is frozen (ptrace stop) until commit');

  await pre.commit();
  committed = true;
  for (let i = 0; existsSync(`/proc/${pid}`); i++) {
    if (i > 500) throw new Error(`pid ${pid} still exists 5 s after commit`);
    await sleep(10);
  }
  const restored = await restoreProcess(fin.image, srv);
  t.teardown(() => killPid(restored.pid));
  t.comment(
    `restore: ${restored.pagesWritten} pages (${mb(restored.bytesWritten)} MB) in ${ms(restored.timings.totalNs)} ms ` +
      `(memory ${ms(restored.timings.memoryNs)} ms); warnings: ${restored.warnings.join('; ') || 'none'}`,
  );
  t.equal(restored.pid, pid, 'restored with the same pid');
  // memcheck verifies every page of its region at least once per sweep.
  const after = await waitForStatus(status, (s) => n(s, 'sweeps') >= n(before, 'sweeps') + 2 && n(s, 'tick') > n(before, 'tick') + 100, 60_000);
  t.equal(after.errors, '0', `every page verifies after the move (${after.lasterror ?? 'no error'})`);
  t.same(userfaultfds(pid), [], 'no userfaultfd in the restored process');
  t.equal(wpRegistered(pid), 0, 'no write-protect registration in the restored process');
});

t.test('abort leaves the original running, untracked, unharmed; failed steps lose nothing', async (t) => {
  const { pid, status } = await startMemcheck(t, 64);
  const { srv, dest } = await server(t);
  const pre = await PrecopySession.open(pid);
  t.teardown(() => pre.abort());
  if (pre.setup.tracking === 'uffd-wp') t.ok(wpRegistered(pid) > 0, 'tracking is on (write-protect registered)');

  const r0 = await pre.round(dest);
  t.comment(describe(r0));
  // A round the destination refuses (wrong token) fails without losing the pending set.
  await t.rejects(pre.round({ ...dest, token: 'ff'.repeat(32) }), /refused|token/i, 'a refused stream fails the round');
  const r1 = await pre.round(dest);
  t.comment(describe(r1));
  t.equal(r1.round, 1, 'the failed attempt is not a round');
  // finish towards nobody: nothing is frozen, the session still tracks.
  const closed = await PageServer.start({ address: '127.0.0.1', ...newPageCredentials() });
  const deadPort = closed.port;
  await closed.close();
  await t.rejects(pre.finish({ ...dest, port: deadPort }), /connect/i, 'finish to an unreachable destination fails');
  t.not(procStatus(pid).State?.[0], 't', 'and froze nothing');
  const r2 = await pre.round(dest);
  t.equal(r2.round, 2, 'the session goes on after it');
  t.equal(srv.progress().streamsCompleted, 3, 'three committed streams');

  await pre.abort();
  await pre.abort();
  t.pass('abort is idempotent');
  await t.rejects(pre.round(dest), /over/, 'no round after abort');

  t.same(userfaultfds(pid), [], 'no userfaultfd fd left in the process');
  t.equal(wpRegistered(pid), 0, 'no "uw" left in /proc/PID/smaps');
  const ps = procStatus(pid);
  t.equal(ps.TracerPid, '0', 'not traced');
  t.not(ps.State?.[0], 't', 'not stopped');
  const s = readStatus(status);
  const after = await waitForStatus(status, (x) => n(x, 'tick') > n(s, 'tick') + 100 && n(x, 'sweeps') >= n(s, 'sweeps') + 1, 30_000);
  t.equal(after.errors, '0', `memcheck runs on and verifies clean (${after.lasterror ?? 'no error'})`);
});

t.test('a child of this Node process is refused, as in the cold path', async (t) => {
  const status = join(mkdtempSync(join(tmpdir(), 'tern-precopy-child-')), 'memcheck.status');
  const child = spawn(workloadBin('memcheck'), ['--status', status, '--mib', '4', '--threads', 'none'], { stdio: 'ignore' });
  t.teardown(() => child.kill('SIGKILL'));
  await waitForStatus(status, (s) => n(s, 'tick') > 2, 10_000);
  await t.rejects(PrecopySession.open(child.pid ?? -1), /child of this Node process/);
});
