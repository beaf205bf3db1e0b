// Tests of @tern/lab (deploy/lab). Needs root, iproute2, util-linux, gcc; builds on `npm run build`.
import t, { type Test } from 'tap';
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Lab, destroyLab, listLabs, reapStale, PID_RANGE, type ExecResult } from '@tern/lab';

const DIST = fileURLToPath(new URL('../../deploy/lab/dist/index.js', import.meta.url));
const LAB_SH = fileURLToPath(new URL('../../deploy/lab/lab', import.meta.url));
const HAVE_PING = spawnSync('sh', ['-c', 'command -v ping']).status === 0;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function labNetns(name: string): string[] {
  return execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
    .split('\n')
    .map((l) => l.split(' ')[0] ?? '')
    .filter((n) => n.startsWith(`tern-${name}-`));
}
const stateFile = (name: string) => `/run/tern-lab/${name}.json`;
const alive = (pid: number) => {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\S+ \(.*\) [ZX]/.test(s);
  } catch {
    return false;
  }
};

async function waitFor(cond: () => boolean, ms: number): Promise<number> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`condition not met within ${ms} ms`);
    await sleep(50);
  }
  return Date.now() - t0;
}

/** TCP server inside `host` on 0.0.0.0:port answering its hostname; resolves once listening. */
async function hostnameServer(lab: Lab, host: string, port: number): Promise<() => void> {
  const code = `const s=require('net').createServer(c=>c.end(require('os').hostname()+'\\n'));s.listen(${port},'0.0.0.0',()=>console.log('listening'))`;
  const child = lab.spawn(host, [process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server in ${host} did not start`)), 10_000);
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('listening')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (c) => reject(new Error(`server in ${host} exited ${c}`)));
  });
  return () => child.kill('SIGKILL');
}

/** Connects from `from` (a host or 'client') to addr:port; returns what the server said. */
function tcpGet(lab: Lab, from: string, addr: string, port: number): Promise<ExecResult> {
  const code = `const c=require('net').connect(${port},'${addr}');let b='';c.setTimeout(3000,()=>{console.error('timeout');process.exit(3)});c.on('data',d=>b+=d);c.on('end',()=>{process.stdout.write(b);process.exit(0)});c.on('error',e=>{console.error(e.code);process.exit(2)})`;
  return lab.run(from, [process.execPath, '-e', code], { timeoutMs: 8000 });
}


async function reach(t: Test, lab: Lab, from: string, addr: string, expectHost: string, port: number) {
  if (HAVE_PING) {
    const r = await lab.run(from, ['ping', '-c1', '-W1', addr], { timeoutMs: 5000 });
    t.equal(r.code, 0, `${from} pings ${addr}`);
  }
  const r = await tcpGet(lab, from, addr, port);
  t.equal(r.code, 0, `${from} connects to ${addr}:${port} ${r.stderr}`);
  t.equal(r.stdout.trim(), expectHost, `${addr}:${port} answered by ${expectHost}`);
}

t.test('two-host lab: layout, reachability, pids, hostname, service move', async (t) => {
  const lab = await Lab.create({ hosts: 2 });
  t.teardown(() => lab.destroy());
  const { name } = lab.info;
  t.match(name, /^t[a-z0-9]{6}$/);
  t.same(lab.info.hosts.map((h) => [h.name, h.address, h.netns]), [
    ['hostA', '10.77.0.11', `tern-${name}-hostA`],
    ['hostB', '10.77.0.12', `tern-${name}-hostB`],
  ]);
  t.equal(lab.info.serviceHost, 'hostA');
  t.equal(lab.info.ownerPid, process.pid);
  t.same(labNetns(name).sort(), [`tern-${name}-client`, `tern-${name}-hostA`, `tern-${name}-hostB`, `tern-${name}-sw`]);
  t.ok(fs.existsSync(stateFile(name)), 'state file');
  t.ok((await listLabs()).some((l) => l.name === name), 'listed');
  t.throws(() => lab.host('hostZ'));

  // hostname and pid namespace
  const hn = await lab.run('hostA', ['hostname']);
  t.equal(hn.stdout.trim(), 'hostA');
  t.equal((await lab.run('hostB', ['cat', '/proc/sys/kernel/hostname'])).stdout.trim(), 'hostB');
  const self = await lab.run('hostA', ['sh', '-c', 'echo $$; cat /proc/1/cmdline | tr "\\0" " "']);
  const [shPid, initCmd] = self.stdout.split('\n');
  t.ok(Number(shPid) > PID_RANGE && Number(shPid) < PID_RANGE + 100, `hostA's own pid range in its ns (${shPid})`);
  t.match(initCmd, /tern-lab-init hostA/);

  const d = await lab.startDaemon('hostA', ['sleep', '1000']);
  t.ok(d.pid > PID_RANGE && d.pid < PID_RANGE + 100, `daemon pid in hostA's range (${d.pid})`);
  const onB = await lab.run('hostB', ['sh', '-c', 'echo $$']);
  t.ok(Number(onB.stdout) > 2 * PID_RANGE, `hostB hands out pids from its own range (${onB.stdout.trim()})`);
  t.not(d.rootPid, d.pid);
  const nspid = /^NSpid:\s*(.*)$/m.exec(fs.readFileSync(`/proc/${d.rootPid}/status`, 'utf8'))![1]!.trim().split(/\s+/);
  t.equal(nspid[0], String(d.rootPid));
  t.equal(nspid[nspid.length - 1], String(d.pid), 'NSpid ends with the host pid');
  t.equal(lab.toRootPid('hostA', d.pid), d.rootPid);
  t.same(lab.toHostPid(d.rootPid), { host: 'hostA', pid: d.pid });
  t.equal(lab.toHostPid(process.pid), null);
  t.throws(() => lab.toRootPid('hostB', d.pid), 'not in hostB');
  const ps = await lab.run('hostA', ['sh', '-c', `kill -0 ${d.pid} && echo ok`]);
  t.equal(ps.stdout.trim(), 'ok', 'daemon visible by its host pid inside the host');

  // exit code propagation and stdin
  const ex = await lab.run('hostB', ['sh', '-c', 'cat; exit 7'], { input: 'hi' });
  t.same([ex.code, ex.stdout], [7, 'hi']);
  const to = await lab.run('hostB', ['sleep', '30'], { timeoutMs: 300 });
  t.equal(to.signal, 'SIGKILL', 'timeout kills');

  // reachability: hosts each other, client -> hosts, client -> service
  const port = 7000;
  const stopA = await hostnameServer(lab, 'hostA', port);
  const stopB = await hostnameServer(lab, 'hostB', port);
  t.teardown(() => {
    stopA();
    stopB();
  });
  await reach(t, lab, 'hostA', '10.77.0.12', 'hostB', port);
  await reach(t, lab, 'hostB', '10.77.0.11', 'hostA', port);
  await reach(t, lab, 'client', '10.77.0.11', 'hostA', port);
  await reach(t, lab, 'client', '10.77.0.200', 'hostA', port);

  // move the service address
  await lab.moveServiceAddress('hostB');
  t.equal(lab.info.serviceHost, 'hostB');
  await reach(t, lab, 'client', '10.77.0.200', 'hostB', port);
  const addrA = await lab.run('hostA', ['ip', '-br', 'addr', 'show', 'eth0']);
  t.notMatch(addrA.stdout, /10\.77\.0\.200/, 'hostA lost the address');
  await lab.moveServiceAddress('hostA');
  await reach(t, lab, 'client', '10.77.0.200', 'hostA', port);

  // destroy removes everything; idempotent
  const inits = lab.info.hosts.map((h) => h.initPid);
  await lab.destroy();
  t.same(labNetns(name), [], 'no netns left');
  t.notOk(fs.existsSync(stateFile(name)), 'no state file');
  await waitFor(() => !inits.some(alive) && !alive(d.rootPid), 2000);
  t.pass('inits and daemon gone');
  await lab.destroy();
  await destroyLab(name);
});

t.test('two labs created concurrently do not collide', async (t) => {
  const [a, b] = await Promise.all([Lab.create(), Lab.create({ hosts: 3 })]);
  t.teardown(() => Promise.all([a.destroy(), b.destroy()]));
  t.not(a.info.name, b.info.name);
  t.equal(b.info.hosts.length, 3);
  const stop = await hostnameServer(b, 'hostC', 7001);
  t.teardown(stop);
  await reach(t, b, 'client', '10.77.0.13', 'hostC', 7001);
  await a.destroy();
  t.same(labNetns(a.info.name), []);
  t.equal(labNetns(b.info.name).length, 5, 'other lab untouched');
  await reach(t, b, 'hostA', '10.77.0.13', 'hostC', 7001);
  await t.rejects(Lab.create({ name: b.info.name }), /already exists/, 'names are exclusive');
  t.equal(labNetns(b.info.name).length, 5, 'failed duplicate did not touch the lab');
});

t.test('failed creation leaves nothing', async (t) => {
  const name = `f${process.pid.toString(36)}`.slice(0, 12);
  t.teardown(() => destroyLab(name));
  await t.rejects(Lab.create({ name, hosts: 9 }), /hosts must be/);
  await t.rejects(Lab.create({ name, hosts: 0 }), /hosts must be/);
  await t.rejects(Lab.create({ name: 'Bad_Name' }), /invalid lab name/);
  t.notOk(fs.existsSync(stateFile(name)));
  for (const steps of [1, 3, 4]) {
    await t.rejects(Lab.create({ name, hosts: 2, failAfterSteps: steps }), /injected failure/);
    t.same(labNetns(name), [], `nothing left after failure at step ${steps}`);
    t.notOk(fs.existsSync(stateFile(name)), 'no state file');
  }
  const procs = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' });
  t.notMatch(procs, new RegExp(`tern-${name}-`), 'no process left');
});

/** Runs a node child that creates an owned lab, prints its info, then does `then`. */
function ownerChild(then: string) {
  const code = `import {Lab} from ${JSON.stringify(DIST)}; const lab = await Lab.create(); console.log(JSON.stringify(lab.info)); ${then}`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
  const info = new Promise<{ name: string; hosts: { initPid: number }[] }>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d;
      if (out.includes('\n')) resolve(JSON.parse(out.split('\n')[0]!));
    });
    child.once('exit', (c, s) => (out.includes('\n') ? undefined : reject(new Error(`owner exited ${c ?? s}`))));
  });
  const exited = new Promise<[number | null, string | null]>((r) => child.once('exit', (c, s) => r([c, s])));
  return { child, info, exited };
}

t.test('owner killed with SIGKILL: the watchdog removes the lab', async (t) => {
  const { child, info, exited } = ownerChild('setInterval(() => {}, 1000);');
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const li = await info;
  t.teardown(() => destroyLab(li.name));
  t.equal(labNetns(li.name).length, 4);
  child.kill('SIGKILL');
  await exited;
  const ms = await waitFor(() => labNetns(li.name).length === 0 && !fs.existsSync(stateFile(li.name)), 5000);
  t.ok(ms < 3500, `lab removed ${ms} ms after SIGKILL`);
  t.notOk(li.hosts.some((h) => alive(h.initPid)), 'inits gone');
});

t.test('owner exiting or SIGTERMed removes its lab synchronously', async (t) => {
  const normal = ownerChild('process.exitCode = 0;');
  const li = await normal.info;
  t.teardown(() => destroyLab(li.name));
  t.same(await normal.exited, [0, null]);
  t.same(labNetns(li.name), [], 'exit hook removed the lab');

  const term = ownerChild('setInterval(() => {}, 1000);');
  const lt = await term.info;
  t.teardown(() => destroyLab(lt.name));
  term.child.kill('SIGTERM');
  t.same(await term.exited, [143, null]);
  t.same(labNetns(lt.name), [], 'SIGTERM hook removed the lab');
  t.notOk(fs.existsSync(stateFile(lt.name)));
});

t.test('reapStale removes labs of dead owners only', async (t) => {
  const lab = await Lab.create();
  t.teardown(() => lab.destroy());
  const reaped = await reapStale();
  t.notOk(reaped.includes(lab.info.name), 'live owner kept');
  t.equal(labNetns(lab.info.name).length, 4);
});

t.test('shell entry point: up / exec / ls / down', async (t) => {
  const name = `s${process.pid.toString(36)}`.slice(0, 12);
  t.teardown(() => destroyLab(name));
  const sh = (...args: string[]) => spawnSync(LAB_SH, args, { encoding: 'utf8', timeout: 20_000 });
  const up = sh('up', name, '--hosts', '2');
  t.equal(up.status, 0, up.stderr);
  const info = JSON.parse(up.stdout);
  t.equal(info.name, name);
  t.equal(info.ownerPid, null, 'no owner: persists');
  const ex = sh('exec', name, 'hostB', '--', 'sh', '-c', 'sleep 100 >/dev/null 2>&1 & echo $!; hostname');
  t.equal(ex.status, 0, ex.stderr);
  const [pidS, host] = ex.stdout.trim().split('\n');
  t.equal(host, 'hostB');
  const lab = await Lab.attach(name);
  const rootPid = lab.toRootPid('hostB', Number(pidS));
  t.ok(alive(rootPid));
  t.equal(sh('exec', name, 'hostA', '--', 'sh', '-c', 'exit 5').status, 5, 'exit code propagated');
  t.equal(sh('exec', name, 'client', '--', 'ip', '-br', 'addr', 'show', 'eth0').stdout.includes('10.77.0.100'), true);
  t.match(sh('ls').stdout, new RegExp(`^${name} `, 'm'));
  t.match(sh('up', 'x', '--bogus').stderr, /unknown option --bogus/); // --agents: test/control/lab-agents.test.ts
  t.equal(sh('down', name).status, 0);
  t.same(labNetns(name), []);
  await waitFor(() => !alive(rootPid), 2000);
  t.pass('processes gone');
});
