// End to end between lab hosts, through the real engine: `migrate --lab` moves a self-verifying
// workload with its pid; a coordinator started as its own process streams every phase in order over
// its WebSocket; killed mid-migration and restarted, it leaves the process in exactly one place.
// Skipped (saying why) only while @tern/native lacks the migration roles.
import t from 'tap';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, statSync, existsSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { missingNativeFunctions } from '@tern/agent';
import { Lab } from '@tern/lab';
import { cliMain, labFor, repoRoot, runCli } from '../e2e/helpers.js';
import { readStatus, waitForStatus, workloadBin } from '../workloads/status.js';

const coordinatorMain = join(repoRoot, 'apps', 'coordinator', 'dist', 'server.js');
const LAB_SH = join(repoRoot, 'deploy', 'lab', 'lab');

function inHost(lab: Lab, host: string, pid: number): boolean {
  try {
    lab.toRootPid(host, pid);
    return true;
  } catch {
    return false;
  }
}

t.test('lab up NAME --agents: an agent in every host, the token in the state, gone at down', async (t) => {
  const name = `a${process.pid.toString(36)}`.slice(0, 12);
  t.teardown(() => spawnSync(LAB_SH, ['down', name]));
  const up = spawnSync(LAB_SH, ['up', name, '--agents'], { encoding: 'utf8', timeout: 60_000 });
  t.equal(up.status, 0, up.stderr);
  const info = JSON.parse(up.stdout);
  t.same(info.agentUrls, { hostA: 'http://10.77.0.11:7070', hostB: 'http://10.77.0.12:7070' });
  t.notMatch(up.stdout, /clusterToken/, 'the token is not printed');
  t.equal(statSync(`/run/tern-lab/${name}.json`).mode & 0o777, 0o600, 'the state holds the token: root only');
  const lab = await Lab.attach(name);
  const agents = lab.agents()!;
  t.equal(agents.clusterToken.length, 48);
  t.ok(inHost(lab, 'hostA', agents.hosts.hostA!.pid), 'the agent runs inside hostA');
  const list = await runCli(['list', '--lab', name]);
  t.equal(list.code, 0, list.stderr);
  t.match(list.stdout, /no migrations/);
  t.equal(spawnSync(LAB_SH, ['down', name]).status, 0);
  t.notOk(existsSync(`/run/tern-lab/${name}.agents`), 'configs, logs and the database are removed with the lab');
});

const missing = missingNativeFunctions();
if (missing.length) {
  t.skip(`end-to-end migration: the cold migration engine is not built (@tern/native lacks ${missing.join(', ')})`);
} else {
  t.test('end to end through the engine', async (t) => {
    const lab = await labFor(t, 2);
    const agents = await lab.startAgents();
    const dir = mkdtempSync(join(tmpdir(), 'tern-e2e-migrate-'));
    const memcheck = async (mib: number, tag: string) => {
      const file = join(dir, `${tag}.status`);
      const { pid } = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', file, '--mib', String(mib), '--threads', 'read,sleep']);
      await waitForStatus(file, (s) => Number(s.sweeps ?? 0) >= 1, 30_000);
      return { pid, file };
    };
    const stillVerifying = async (file: string) => {
      const before = Number(readStatus(file).tick);
      const s = await waitForStatus(file, (x) => Number(x.tick) > before + 20, 15_000);
      t.equal(s.errors, '0', `${file}: no self-check error (${s.lasterror ?? 'ok'})`);
    };

    await t.test('migrate --lab moves the process with its pid; it keeps verifying itself', async (t) => {
      const w = await memcheck(64, 'cli');
      const r = await runCli(['--lab', lab.name, '--from', 'hostA', '--to', 'hostB', '--pid', String(w.pid), '--json']);
      t.equal(r.code, 0, r.stderr + r.stdout.slice(-2000));
      const doc = JSON.parse(r.stdout);
      t.equal(doc.migration.state, 'done');
      t.equal(doc.migration.stats.restoredPid, w.pid, 'same pid on the destination');
      t.ok(doc.migration.stats.bytes >= 64 * 2 ** 20, 'at least the 64 MiB region moved');
      t.ok(doc.migration.stats.downtimeMs > 0);
      t.same(doc.events.filter((e: { type: string }) => e.type === 'phase').map((e: { state: string }) => e.state), ['checking', 'precopy', 'switchover', 'restoring', 'postcopy']);
      t.ok(inHost(lab, 'hostB', w.pid), 'running on hostB');
      t.notOk(inHost(lab, 'hostA', w.pid), 'gone from hostA');
      await stillVerifying(w.file);
    });

    // A coordinator as its own process, in the client namespace (where the agents are reachable).
    const url = 'http://10.77.0.100:7080';
    const config = join(dir, 'coordinator.json');
    writeFileSync(config, JSON.stringify({ listen: '10.77.0.100', port: 7080, clusterToken: agents.clusterToken, database: join(dir, 'coordinator.db'), hosts: lab.info.agentUrls }));
    const startCoordinator = async (): Promise<{ child: ChildProcess; lines: string[] }> => {
      const child = lab.spawn('client', [process.execPath, coordinatorMain, '--config', config], { stdio: ['ignore', 'pipe', 'pipe'] });
      const lines: string[] = [];
      let buf = '';
      child.stdout!.on('data', (d: Buffer) => {
        buf += d.toString();
        const parts = buf.split('\n');
        buf = parts.pop()!;
        lines.push(...parts);
        child.emit('lines');
      });
      child.stderr!.on('data', (d: Buffer) => lines.push(d.toString()));
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`coordinator did not start: ${lines.join('\n')}`)), 20_000);
        child.on('lines', () => {
          if (lines.some((l) => l.includes('Server listening'))) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      return { child, lines };
    };
    const cliInClient = (args: string[]) => lab.run('client', [process.execPath, cliMain, ...args, '--coordinator', url, '--token', agents.clusterToken], { timeoutMs: 120_000 });

    await t.test('through tern-coordinator: the CLI follows the WebSocket, every phase in order', async (t) => {
      const { child } = await startCoordinator();
      t.teardown(() => child.kill('SIGKILL'));
      const w = await memcheck(32, 'remote');
      const r = await cliInClient(['--from', 'hostA', '--to', 'hostB', '--pid', String(w.pid), '--json']);
      t.equal(r.code, 0, r.stderr);
      const doc = JSON.parse(r.stdout);
      t.equal(doc.migration.state, 'done');
      t.same(doc.events.filter((e: { type: string }) => e.type === 'phase').map((e: { state: string }) => e.state), ['checking', 'precopy', 'switchover', 'restoring', 'postcopy']);
      t.same(doc.events.map((e: { seq: number }) => e.seq), doc.events.map((_: unknown, i: number) => i + 1));
      t.ok(inHost(lab, 'hostB', w.pid) && !inHost(lab, 'hostA', w.pid));
      await stillVerifying(w.file);
    });

    await t.test('migrate abort during the switchover: the source is thawed, the destination drops what it got', async (t) => {
      const coordinator = await startCoordinator();
      t.teardown(() => coordinator.child.kill('SIGKILL'));
      const w = await memcheck(256, 'aborted');
      // 256 MiB at 40 MB/s: the page stream takes seconds, the abort lands inside it.
      const migrate = lab.spawn('client', [process.execPath, cliMain, '--coordinator', url, '--token', agents.clusterToken, '--from', 'hostA', '--to', 'hostB', '--pid', String(w.pid), '--bandwidth', '40', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      migrate.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number | null>((r) => migrate.on('close', (code) => r(code)));
      const id = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no switchover logged')), 60_000);
        const look = () => {
          const m = coordinator.lines.map((l) => /(m[0-9a-f]{12}) phase switchover: /.exec(l)).find(Boolean);
          if (!m) return;
          clearTimeout(timer);
          resolve(m[1]!);
        };
        coordinator.child.on('lines', look);
        look();
      });
      const abort = await cliInClient(['abort', id, '--json']);
      if (abort.code === 1) {
        // The dump and restore beat the abort to the commit point ("too late"): then it is done.
        t.match(abort.stderr, /past its commit point|already done/);
        await exited;
        t.equal(JSON.parse((await cliInClient(['status', id, '--json'])).stdout).state, 'done');
        t.ok(inHost(lab, 'hostB', w.pid) && !inHost(lab, 'hostA', w.pid), 'done: on the destination only');
      } else {
        t.equal(abort.code, 0, abort.code === 0 ? 'abort: exit 0' : `${abort.stdout} ${abort.stderr}`);
        const rec = JSON.parse(abort.stdout);
        t.equal(rec.state, 'aborted');
        t.equal(rec.committed, false);
        t.equal(await exited, 4, 'the migrating CLI ends with 4 (aborted)');
        t.equal(JSON.parse(out).migration.state, 'aborted');
        t.ok(inHost(lab, 'hostA', w.pid), 'alive on the source');
        t.notOk(inHost(lab, 'hostB', w.pid), 'nothing left on the destination');
      }
      await stillVerifying(w.file);
    });

    await t.test('coordinator killed mid-migration and restarted: the process is in exactly one place', async (t) => {
      const first = await startCoordinator();
      const w = await memcheck(256, 'killed');
      // Throttled to 40 MB/s so that the kill surely lands while the source is frozen and streaming.
      const migrate = lab.spawn('client', [process.execPath, cliMain, '--coordinator', url, '--token', agents.clusterToken, '--from', 'hostA', '--to', 'hostB', '--pid', String(w.pid), '--bandwidth', '40', '--json'], { stdio: 'ignore' });
      t.teardown(() => migrate.kill('SIGKILL'));
      // Kill it the moment it logs the switchover: the source is frozen and streaming.
      const id = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no switchover logged: ${first.lines.join('\n')}`)), 60_000);
        const look = () => {
          const line = first.lines.find((l) => / phase switchover: /.test(l));
          if (!line) return;
          first.child.kill('SIGKILL');
          clearTimeout(timer);
          resolve(/(m[0-9a-f]{12}) phase switchover/.exec(line)![1]!);
        };
        first.child.on('lines', look);
        look();
      });
      await new Promise((r) => (first.child.exitCode !== null || first.child.signalCode !== null ? r(null) : first.child.once('exit', r)));
      const second = await startCoordinator();
      t.teardown(() => second.child.kill('SIGKILL'));
      let rec: { state: string; committed: boolean } | undefined;
      let last = '';
      for (let i = 0; i < 100; i++) {
        const s = await cliInClient(['status', id, '--json']);
        last = `${s.code} ${s.stdout} ${s.stderr}`;
        if (s.code === 0) rec = JSON.parse(s.stdout);
        if (rec && ['done', 'aborted', 'failed'].includes(rec.state)) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      const resolved = !!rec && ['done', 'aborted'].includes(rec.state);
      t.ok(resolved, resolved ? `resolved: ${rec!.state}` : `not resolved: ${last.slice(0, 500)}; coordinator: ${second.lines.slice(-5).join('\n')}`);
      const onA = inHost(lab, 'hostA', w.pid);
      const onB = inHost(lab, 'hostB', w.pid);
      t.ok(onA !== onB, `never both, never neither (hostA: ${onA}, hostB: ${onB})`);
      t.equal(onB, rec!.state === 'done', rec!.state === 'done' ? 'done: on the destination' : 'aborted: alive on the source');
      await stillVerifying(w.file);
    });
  });
}
