// Cold migration between lab hosts, end to end through `migrate --lab` (embedded coordinator,
// one agent per host): self-verifying C workloads and real servers move from hostA to hostB with
// the same pid, keep running correctly there, and are gone from hostA. Failure paths leave the
// original running on hostA and nothing behind on hostB.
import t from 'tap';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Lab } from '@tern/lab';
import { labWithAgents, migrate, redisCli, runsOn, sleep, waitFor } from './helpers.js';
import { readStatus, waitForStatus, workloadBin } from '../workloads/status.js';

t.test('memcheck (64 MiB, 4 blocked threads) moves with its pid, tids and memory intact', async (t) => {
  const lab = await labWithAgents(t);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-cold-')), 'memcheck.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', '64']);
  await waitForStatus(status, (s) => Number(s.sweeps) >= 1, 20_000);
  const tidsBefore = (await lab.run('hostA', ['ls', `/proc/${wl.pid}/task`])).stdout.trim().split('\n').sort();

  const m = await migrate(lab, wl.pid);
  t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-400)})`);
  t.equal(m.record?.state, 'done');
  t.ok(await runsOn(lab, 'hostB', wl.pid), `pid ${wl.pid} runs on hostB`);
  t.notOk(await runsOn(lab, 'hostA', wl.pid), 'and is gone from hostA');
  const tidsAfter = (await lab.run('hostB', ['ls', `/proc/${wl.pid}/task`])).stdout.trim().split('\n').sort();
  t.same(tidsAfter, tidsBefore, 'same thread ids');

  const moved = readStatus(status);
  const after = await waitForStatus(status, (s) => Number(s.sweeps) >= Number(moved.sweeps) + 2 && Number(s.read_wakeups) > Number(moved.read_wakeups) + 3, 30_000);
  t.equal(after.errors, '0', `memory and threads verify clean on hostB (${after.lasterror ?? 'no error'})`);
  for (const k of ['epoll_wakeups', 'read_wakeups', 'sleeps', 'futex_wakeups']) t.ok(Number(after[k]) > Number(moved[k]), `${k} advances on hostB`);
});

t.test('a 1 GiB region moves byte-exact', async (t) => {
  const lab = await labWithAgents(t);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-cold-1g-')), 'memcheck.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', '1024', '--threads', 'none']);
  await waitForStatus(status, (s) => Number(s.sweeps) >= 1, 120_000);
  const m = await migrate(lab, wl.pid);
  t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-300)})`);
  t.comment(`stats: ${JSON.stringify(m.record?.['stats'] ?? null)}`);
  const moved = readStatus(status);
  // memcheck re-verifies every page of its 1 GiB at least once per sweep.
  const after = await waitForStatus(status, (s) => Number(s.sweeps) >= Number(moved.sweeps) + 2, 120_000);
  t.equal(after.errors, '0', `every page of the 1 GiB verifies on hostB (${after.lasterror ?? 'no error'})`);
  t.ok(await runsOn(lab, 'hostB', wl.pid), 'runs on hostB');
});

t.test('signal handlers, masks and queued signals survive (sigcount)', async (t) => {
  const lab = await labWithAgents(t);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-cold-sig-')), 'sigcount.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('sigcount'), '--status', status]);
  await waitForStatus(status, (s) => Number(s.tick) > 5, 10_000);
  await lab.run('hostA', ['sh', '-c', `kill -USR1 ${wl.pid}`]);
  await waitForStatus(status, (s) => s.usr1 === '1', 5_000);
  const m = await migrate(lab, wl.pid);
  t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-300)})`);
  // Queued real-time signals with values, sent one by one on hostB: exact count and sum.
  for (let v = 1; v <= 5; v++) await lab.run('hostB', ['/bin/kill', '-s', 'RTMIN', '-q', String(v), String(wl.pid)]);
  await lab.run('hostB', ['sh', '-c', `kill -USR1 ${wl.pid}`]);
  const after = await waitForStatus(status, (s) => s.usr1 === '2' && Number(s.rt) >= 5, 10_000);
  t.equal(after.rt, '5', 'five SIGRTMIN handled on hostB');
  t.equal(after.rt_sum, '15', 'with their values (1..5)');
  t.equal(after.errors, '0', `sigcount's own checks pass (${after.lasterror ?? 'no error'})`);
});

t.test('fdzoo: every supported fd kind survives the move', async (t) => {
  const lab = await labWithAgents(t);
  const dir = mkdtempSync(join(tmpdir(), 'tern-fdzoo-'));
  const status = join(dir, 'fdzoo.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('fdzoo'), '--status', status, '--dir', dir, '--no-inotify']);
  await waitForStatus(status, (s) => Number(s.checks) > 5, 10_000);
  const m = await migrate(lab, wl.pid);
  t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-400)})`);
  t.ok(await runsOn(lab, 'hostB', wl.pid), 'fdzoo runs on hostB');
  const moved = readStatus(status);
  const after = await waitForStatus(status, (s) => Number(s.checks) > Number(moved.checks) + 10, 15_000);
  t.equal(after.errors, '0', `fdzoo's own checks pass on hostB (${after.lasterror ?? 'no error'})`);
});

t.test('redis-server with a dataset: DBSIZE and DEBUG DIGEST equal, answers on hostB', async (t) => {
  const lab = await labWithAgents(t);
  const dir = mkdtempSync(join(tmpdir(), 'tern-cold-redis-'));
  const redis = await lab.startDaemon('hostA', [
    'redis-server', '--port', '6379', '--bind', '0.0.0.0', '--protected-mode', 'no', '--save', '', '--appendonly', 'no',
    '--enable-debug-command', 'yes', '--dir', dir,
  ], { logFile: join(dir, 'redis.log') });
  const a = lab.host('hostA').address;
  await waitFor('redis on hostA', async () => (await redisCli(lab, 'client', a, 6379, ['PING'])) === 'PONG');
  await redisCli(lab, 'client', a, 6379, ['DEBUG', 'POPULATE', '100000', 'key', '100']);
  const dbsize = await redisCli(lab, 'client', a, 6379, ['DBSIZE']);
  const digest = await redisCli(lab, 'client', a, 6379, ['DEBUG', 'DIGEST']);
  await sleep(200); // let redis close the short-lived client connections

  const m = await migrate(lab, redis.pid);
  t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-400)})`);
  const b = lab.host('hostB').address;
  t.equal(await redisCli(lab, 'client', b, 6379, ['DBSIZE']), dbsize, 'DBSIZE equal on hostB');
  t.equal(await redisCli(lab, 'client', b, 6379, ['DEBUG', 'DIGEST']), digest, 'DEBUG DIGEST equal on hostB');
  t.equal(await redisCli(lab, 'client', b, 6379, ['SET', 'after', 'move']), 'OK', 'accepts writes on hostB');
  t.notOk(await runsOn(lab, 'hostA', redis.pid), 'nothing of it remains on hostA');
});

const servers: { name: string; argv: (dir: string) => string[]; probe: (lab: Lab, address: string) => Promise<boolean> }[] = [
  {
    name: 'memcached -t 4',
    argv: () => ['memcached', '-u', 'root', '-t', '4', '-p', '11211', '-l', '0.0.0.0'],
    probe: async (lab, address) => {
      const script = `const s=require('net').connect(11211,'${address}');let d='';s.on('data',c=>{d+=c;if(d.includes('END'))s.end()});s.on('end',()=>{console.log(d.includes('VALUE tern')?'ok':'bad:'+d)});s.write('set tern 0 0 5\\r\\nhello\\r\\nget tern\\r\\n')`;
      const r = await lab.run('client', [process.execPath, '-e', script], { timeoutMs: 10_000 });
      return r.stdout.trim() === 'ok';
    },
  },
  {
    name: 'python3 -m http.server',
    argv: (dir) => ['python3', '-m', 'http.server', '8000', '--directory', dir],
    probe: async (lab, address) => {
      const r = await lab.run('client', [process.execPath, '-e', `fetch('http://${address}:8000/hello.txt').then(r=>r.text()).then(t=>console.log(t.trim()))`], { timeoutMs: 10_000 });
      return r.stdout.trim() === 'hello from tern';
    },
  },
  {
    name: 'node http server',
    argv: () => [process.execPath, '-e', "let n=0;require('http').createServer((q,s)=>s.end('n='+(++n))).listen(8080)"],
    probe: async (lab, address) => {
      const r = await lab.run('client', [process.execPath, '-e', `fetch('http://${address}:8080/').then(r=>r.text()).then(t=>console.log(t))`], { timeoutMs: 10_000 });
      return /^n=\d+$/.test(r.stdout.trim());
    },
  },
];

for (const server of servers) {
  t.test(`${server.name} answers a new request on hostB`, async (t) => {
    const lab = await labWithAgents(t);
    const dir = mkdtempSync(join(tmpdir(), 'tern-cold-srv-'));
    writeFileSync(join(dir, 'hello.txt'), 'hello from tern\n');
    const proc = await lab.startDaemon('hostA', server.argv(dir), { logFile: join(dir, 'server.log') });
    await waitFor(`${server.name} on hostA`, () => server.probe(lab, lab.host('hostA').address), 15_000, 200);
    await sleep(300); // idle: no client connected during the move
    const m = await migrate(lab, proc.pid);
    t.equal(m.code, 0, `migrate exit 0 (${m.out.slice(-400)})`);
    t.ok(await server.probe(lab, lab.host('hostB').address), 'answers on hostB');
    t.notOk(await runsOn(lab, 'hostA', proc.pid), 'gone from hostA');
  });
}

t.test('a restore made to fail leaves the original running on hostA and nothing on hostB', async (t) => {
  const lab = await labWithAgents(t);

  await t.test('the pid is taken on hostB', async (t) => {
    const status = join(mkdtempSync(join(tmpdir(), 'tern-fail-')), 'memcheck.status');
    const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', '16']);
    await waitForStatus(status, (s) => Number(s.tick) > 10, 10_000);
    // Take the same pid on hostB: make its next pid be ours, then start a sleeper.
    const squat = await lab.run('hostB', ['sh', '-c', `echo ${wl.pid - 1} > /proc/sys/kernel/ns_last_pid; sleep 600 </dev/null >/dev/null 2>&1 & echo $!`]);
    t.equal(Number(squat.stdout.trim()), wl.pid, `hostB's pid ${wl.pid} is taken by a sleeper`);
    const before = readStatus(status);
    const m = await migrate(lab, wl.pid);
    t.not(m.code, 0, 'migrate fails');
    t.match(m.out, /in use|taken|PidTaken|already/i, 'and says the pid is taken');
    t.comment(`failure: ${JSON.stringify(m.record?.failure)}`);
    const after = await waitForStatus(status, (s) => Number(s.tick) > Number(before.tick) + 20, 10_000);
    t.equal(after.errors, '0', 'the original keeps running on hostA, its own counter advancing');
    t.ok(await runsOn(lab, 'hostA', wl.pid), 'still on hostA');
    const comm = (await lab.run('hostB', ['cat', `/proc/${wl.pid}/comm`])).stdout.trim();
    t.equal(comm, 'sleep', 'hostB still holds only its own sleeper at that pid');
  });

  await t.test('the pid is taken on hostB while the source is frozen: the restore itself fails', async (t) => {
    const status = join(mkdtempSync(join(tmpdir(), 'tern-fail3-')), 'memcheck.status');
    const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', '512']);
    await waitForStatus(status, (s) => Number(s.sweeps) >= 1, 30_000);
    const migration = migrate(lab, wl.pid);
    // The checks have passed once the source is frozen (tracing stop): squat its pid on hostB
    // while its 512 MiB are being dumped, so that only the restore can notice.
    await waitFor('the source frozen', () => /^State:\s+t/m.test(readFileSync(`/proc/${wl.rootPid}/status`, 'utf8')), 30_000, 2);
    const squat = await lab.run('hostB', ['sh', '-c', `echo ${wl.pid - 1} > /proc/sys/kernel/ns_last_pid; sleep 600 </dev/null >/dev/null 2>&1 & echo $!`]);
    t.equal(Number(squat.stdout.trim()), wl.pid, `hostB's pid ${wl.pid} taken during the dump`);
    const m = await migration;
    t.not(m.code, 0, 'migrate fails');
    t.comment(`failure: ${JSON.stringify(m.record?.failure)}`);
    t.match(m.out, /in use|taken|already/i, 'and says the pid is taken');
    const before = readStatus(status);
    const after = await waitForStatus(status, (s) => Number(s.tick) > Number(before.tick) + 20, 15_000);
    t.equal(after.errors, '0', 'the original was thawed and runs on hostA, memory intact');
    t.ok(await runsOn(lab, 'hostA', wl.pid), 'still on hostA');
    t.match(readFileSync(`/proc/${wl.rootPid}/status`, 'utf8'), /TracerPid:\s+0\b/, 'no longer traced');
    const comm = (await lab.run('hostB', ['cat', `/proc/${wl.pid}/comm`])).stdout.trim();
    t.equal(comm, 'sleep', 'hostB holds only its own sleeper at that pid: no stub left');
  });

  await t.test('a file the process uses is missing on hostB', async (t) => {
    // A directory private to hostA's mount namespace: the file exists there only.
    const priv = `/run/tern-hosta-only-${process.pid}`;
    await lab.run('hostA', ['sh', '-c', `mkdir -p ${priv} && mount -t tmpfs none ${priv} && echo data > ${priv}/held`]);
    const dir = mkdtempSync(join(tmpdir(), 'tern-fail2-'));
    // One process, no children: holds the file open and counts into a file of its own.
    const holder = `import os, time\nheld = open('${priv}/held')\nn = 0\nwhile True:\n    n += 1\n    with open('${dir}/count.tmp', 'w') as f: f.write(str(n))\n    os.replace('${dir}/count.tmp', '${dir}/count')\n    time.sleep(0.05)\n`;
    const p = await lab.startDaemon('hostA', ['python3', '-c', holder]);
    await waitFor('holder counting', () => Number(readFileSync(join(dir, 'count'), 'utf8')) > 3, 10_000);
    const m = await migrate(lab, p.pid);
    t.not(m.code, 0, 'migrate fails');
    t.match(m.out, new RegExp(`${priv}/held|missing|not found|No such file`, 'i'), 'naming the missing file');
    const n0 = Number(readFileSync(join(dir, 'count'), 'utf8'));
    await waitFor('the original counting on', () => Number(readFileSync(join(dir, 'count'), 'utf8')) > n0 + 5, 10_000);
    t.ok(await runsOn(lab, 'hostA', p.pid), 'still on hostA');
    t.notOk(await runsOn(lab, 'hostB', p.pid), 'nothing at that pid on hostB');
  });
});
