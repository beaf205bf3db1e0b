// `migrate check` against real servers from Debian packages and a node server, started by the test
// inside a lab host: the inventory matches /proc (the test compares counts), the verdict is
// "movable"; an io_uring user is "cannot move" with the reason; bad input gives exit 2 and one line.
import t, { type Test } from 'tap';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CheckReport, ProcessInventory } from '@tern/protocol';
import { labFor, procCounts, runCli, runCliInHost, waitFor } from './helpers.js';
import { waitForStatus, workloadBin } from '../workloads/status.js';

interface CheckJson {
  movable: boolean;
  report: CheckReport;
  inventory: ProcessInventory;
}

const servers: Record<string, (dir: string) => string[]> = {
  'redis-server': (dir) => ['redis-server', '--port', '6380', '--save', '', '--appendonly', 'no', '--dir', dir],
  'memcached -t 4': () => ['memcached', '-u', 'root', '-t', '4', '-p', '11211', '-l', '0.0.0.0'],
  'python3 -m http.server': (dir) => ['python3', '-m', 'http.server', '8000', '--directory', dir],
  'node http server': () => [process.execPath, '-e', "require('http').createServer((q, s) => s.end('ok')).listen(8080)"],
};

t.test('inventory of real servers matches /proc and they are movable', async (t) => {
  const lab = await labFor(t, 1);
  for (const [name, argv] of Object.entries(servers)) {
    await t.test(name, async (t) => {
      const dir = mkdtempSync(join(tmpdir(), 'tern-check-'));
      const server = await lab.startDaemon('hostA', argv(dir));
      // Servers finish starting (threads, listening sockets) a moment after exec.
      let last: { json: CheckJson; proc: ReturnType<typeof procCounts> } | undefined;
      await waitFor(`${name} inventory to settle and match /proc`, async () => {
        const r = await runCliInHost(lab, 'hostA', ['check', '--pid', String(server.pid), '--json']);
        if (r.code !== 0) throw new Error(`exit ${r.code}: ${r.stderr}${r.stdout.slice(0, 2000)}`);
        const json = JSON.parse(r.stdout) as CheckJson;
        const proc = procCounts(server.rootPid);
        last = { json, proc };
        return (
          json.inventory.threads.length === proc.threads &&
          json.inventory.fds.length === proc.fds &&
          json.inventory.vmas.length === proc.vmas &&
          json.inventory.threads.length > 0 &&
          json.inventory.fds.some((fd) => fd.kind === 'socket')
        );
      }, 15_000, 200);
      const { json, proc } = last!;
      t.equal(json.inventory.threads.length, proc.threads, `threads: ${proc.threads}`);
      t.equal(json.inventory.fds.length, proc.fds, `fds: ${proc.fds}`);
      t.equal(json.inventory.vmas.length, proc.vmas, `vmas: ${proc.vmas}`);
      t.equal(json.inventory.nsPid, server.pid, 'pid as the lab host sees it');
      t.equal(json.movable, true, `movable (blockers: ${JSON.stringify(json.report.blockers)})`);

      const human = await runCliInHost(lab, 'hostA', ['check', '--pid', String(server.pid)]);
      t.equal(human.code, 0, 'exit 0 when movable');
      t.match(human.stdout, /movable: yes/);
      t.match(human.stdout, /threads \(\d+\)/);
      t.match(human.stdout, /memory mappings \(\d+\)/);
      t.match(human.stdout, /file descriptors \(\d+\)/);
    });
  }
});

t.test('an io_uring user cannot be moved, and says why', async (t) => {
  const lab = await labFor(t, 1);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-uring-')), 'status');
  const wl = await lab.startDaemon('hostA', [workloadBin('iouring'), '--status', status]);
  const ready = await waitForStatus(status, (s) => Number(s.tick) > 2, 10_000);
  const r = await runCliInHost(lab, 'hostA', ['check', '--pid', String(wl.pid)]);
  t.equal(r.code, 1, 'exit 1: not movable');
  t.match(r.stdout, /movable: no/);
  t.match(r.stdout, new RegExp(`fd ${ready.ring_fd}\\b.*io[-_]uring`), 'the io_uring fd is named as the reason');
  const json = JSON.parse((await runCliInHost(lab, 'hostA', ['check', '--pid', String(wl.pid), '--json'])).stdout) as CheckJson;
  t.equal(json.movable, false);
  t.ok(json.report.blockers.some((b) => b.kind === 'io-uring'), 'blocker kind io-uring');
});

t.test('bad input: one clear line, exit 2, target untouched', async (t) => {
  const lab = await labFor(t, 1);
  const dir = mkdtempSync(join(tmpdir(), 'tern-bad-'));
  const target = await lab.startDaemon('hostA', ['sleep', '600'], { logFile: join(dir, 'log') });

  const oneLine = (t: Test, r: { code: number | null; stderr: string; stdout: string }, re: RegExp, what: string) => {
    t.equal(r.code, 2, `${what}: exit 2`);
    t.match(r.stderr, re, `${what}: says why`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
    t.equal(r.stdout, '', `${what}: nothing on stdout`);
  };

  oneLine(t, await runCliInHost(lab, 'hostA', ['check', '--pid', '4000000']), /no such process|does not exist|4000000/, 'no such pid');
  oneLine(t, await runCliInHost(lab, 'hostA', ['check', '--pid', 'abc']), /not a process id/, 'not a number');
  oneLine(t, await runCliInHost(lab, 'hostA', ['check', '--pid', '1']), /init/, 'the init of a pid namespace');
  oneLine(t, await runCliInHost(lab, 'hostA', ['check']), /--pid/, 'no pid');
  const own = await lab.run('hostA', ['sh', '-c', `exec ${process.execPath} ${join(process.cwd(), 'apps/cli/dist/main.js')} check --pid $$`]);
  oneLine(t, { code: own.code, stderr: own.stderr, stdout: own.stdout }, /own|itself|engine/, 'our own pid');
  const ancestor = await lab.run('hostA', ['sh', '-c', `${process.execPath} ${join(process.cwd(), 'apps/cli/dist/main.js')} check --pid $$`]);
  oneLine(t, { code: ancestor.code, stderr: ancestor.stderr, stdout: ancestor.stdout }, /ancestor|parent/, 'an ancestor of ours');
  oneLine(t, await runCli(['check', '--pid', String(target.rootPid)], { asUid: 65534 }), /root|permission|privilege/i, 'not root');

  // The target never noticed.
  const status = (await lab.run('hostA', ['cat', `/proc/${target.pid}/status`])).stdout;
  t.match(status, /TracerPid:\s+0\b/, 'target not traced');
  t.match(status, /State:\s+S/, 'target still sleeping');
});

t.test('migrate check --kernel reports this machine', async (t) => {
  const r = await runCli(['check', '--kernel', '--json']);
  t.equal(r.code, 0);
  const probe = JSON.parse(r.stdout) as Record<string, unknown>;
  t.type(probe.kernelRelease, 'string');
  t.ok(['soft-dirty', 'uffd-wp', 'none'].includes(String(probe.dirtyTracking)), `dirty tracking: ${String(probe.dirtyTracking)}`);
  const human = await runCli(['check', '--kernel']);
  t.equal(human.code, 0);
  t.match(human.stdout, /userfaultfd/);
  t.match(human.stdout, /PAGEMAP_SCAN/);
});

t.test('a migration with no coordinator and no agents to go through is refused clearly', async (t) => {
  // (Migrations themselves: test/control. A lab with agents left running would be used instead,
  // and pid 1234 would then be refused there as bad input: exit 2 either way.)
  const r = await runCli(['--from', 'hostA', '--to', 'hostB', '--pid', '1234'], { env: { TERN_CONFIG: '' } });
  t.equal(r.code, 2);
  t.match(r.stderr + r.stdout, /no coordinator and no agents|no process|1234/);
});
