// The self-verifying workloads that measure migrations under load: tcpstream (byte-exact TCP
// streams both ways, half-closed states on demand) and memcheck --write-rate (a controlled dirty
// rate with continuous verification that also catches a stale page). Loopback only.
// Needs `make -C test/workloads`.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { num, parseStatus, readStatus, waitForStatus, workloadBin, type Status } from '../workloads/status.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the helpers need of a (sub)test: somewhere to hang cleanup. */
type Teardown = { teardown(fn: () => unknown): void };

function scratch(t: Teardown): string {
  const dir = mkdtempSync(join(tmpdir(), 'tern-wl-unit-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Start a workload; it is killed (by pid) at teardown if still running. Resolves with its ready line. */
async function start(t: Teardown, args: string[]): Promise<{ child: ChildProcess; ready: Status }> {
  const child = spawn(args[0]!, args.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const ready = await new Promise<Status>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.startsWith('ready '));
      if (line) resolve(parseStatus(line));
    });
    child.once('exit', (code) => reject(new Error(`${args[0]} exited ${code} before ready: ${stderr}`)));
  });
  return { child, ready };
}

async function stop(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const done = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  child.kill('SIGTERM');
  return done;
}

/** TCP states (from /proc/net/tcp) of sockets whose local port is `port`. */
function tcpStatesOnPort(port: number): string[] {
  const names: Record<string, string> = { '01': 'ESTABLISHED', '04': 'FIN_WAIT1', '05': 'FIN_WAIT2', '06': 'TIME_WAIT', '08': 'CLOSE_WAIT', '09': 'LAST_ACK', '0A': 'LISTEN' };
  const out: string[] = [];
  for (const line of readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4) continue;
    if (parseInt(f[1]!.split(':')[1]!, 16) === port) out.push(names[f[3]!] ?? f[3]!);
  }
  return out;
}

async function pair(t: Teardown, serverArgs: string[], clientArgs: string[]) {
  const dir = scratch(t);
  const sStatus = join(dir, 'server.status');
  const cStatus = join(dir, 'client.status');
  const server = await start(t, [workloadBin('tcpstream'), 'server', '--listen', '127.0.0.1:0', '--status', sStatus, ...serverArgs]);
  const port = Number(server.ready.port);
  const client = await start(t, [workloadBin('tcpstream'), 'client', '--connect', `127.0.0.1:${port}`, '--status', cStatus, ...clientArgs]);
  return { server, client, port, sStatus, cStatus };
}

t.test('tcpstream: bytes flow both ways, every byte verified, no pause', async (t) => {
  // Rate-capped so two busy processes do not starve the rest of a 2-core CI machine.
  const p = await pair(t, ['--rate', '200'], ['--rate', '200', '--conns', '2']);
  await waitForStatus(p.sStatus, (s) => s.conns === '2', 5_000);
  const a = readStatus(p.cStatus);
  await sleep(2000);
  const s = readStatus(p.sStatus);
  const c = readStatus(p.cStatus);
  t.comment(`client: ${c.bytes_sent} B sent, ${c.bytes_received} B received, max_gap ${c.max_gap_ms} ms; server max_gap ${s.max_gap_ms} ms`);
  t.equal(c.state, 'running');
  t.equal(c.conns, '2', 'two connections');
  t.equal(s.accepted, '2');
  const mbps = (num(c, 'bytes_sent') - num(a, 'bytes_sent')) / 2 / 1e6;
  t.ok(mbps > 30 && mbps < 260, `client sends at ~200 MB/s (${mbps.toFixed(0)})`);
  t.ok(num(c, 'bytes_received') > 100e6, 'client received > 100 MB');
  t.ok(num(s, 'bytes_received') > 100e6, 'server received > 100 MB');
  t.equal(c.errors, '0', `client verified every byte (${c.lasterror ?? ''})`);
  t.equal(s.errors, '0', `server verified every byte (${s.lasterror ?? ''})`);
  t.equal(c.resets, '0');
  t.ok(num(c, 'max_gap_ms') < 1000 && num(s, 'max_gap_ms') < 1000, 'no read waited long (wide margin: a loaded 2-core CI machine)');
  // Stop the client first: the server then sees resets/EOFs, which are errors by design.
  t.equal(await stop(p.client.child), 0, 'client exits 0');
  await stop(p.server.child);
});

t.test('tcpstream: the client half-closes; the server holds CLOSE_WAIT and keeps sending', async (t) => {
  const p = await pair(t, [], ['--rate', '20', '--half-close-after', '100000']);
  const s = await waitForStatus(p.sStatus, (x) => x.eofs === '1', 5_000);
  t.equal(s.errors, '0', `the EOF came at the announced offset (${s.lasterror ?? ''})`);
  t.equal(s.bytes_received, '100000');
  t.same(tcpStatesOnPort(p.port).filter((x) => x !== 'LISTEN'), ['CLOSE_WAIT'], 'server side is in CLOSE_WAIT');
  const c0 = num(readStatus(p.cStatus), 'bytes_received');
  await sleep(300);
  const c = readStatus(p.cStatus);
  t.ok(num(c, 'bytes_received') > c0, 'the client still receives');
  t.equal(c.shut_wr, '1');
  t.equal(c.errors, '0');
  await stop(p.client.child);
  await stop(p.server.child);
});

t.test('tcpstream: the server half-closes; it holds FIN_WAIT2 while the client keeps sending', async (t) => {
  const p = await pair(t, [], ['--rate', '20', '--server-half-close-after', '100000']);
  const c = await waitForStatus(p.cStatus, (x) => x.eofs === '1', 5_000);
  t.equal(c.errors, '0', `the EOF came at the announced offset (${c.lasterror ?? ''})`);
  t.equal(c.bytes_received, '100000');
  t.same(tcpStatesOnPort(p.port).filter((x) => x !== 'LISTEN'), ['FIN_WAIT2'], 'server side is in FIN_WAIT2');
  const s0 = num(readStatus(p.sStatus), 'bytes_received');
  await sleep(300);
  const s = readStatus(p.sStatus);
  t.ok(num(s, 'bytes_received') > s0, 'the server still receives');
  t.equal(s.errors, '0');
  await stop(p.client.child);
  await stop(p.server.child);
});

t.test('tcpstream: --shut-after-eof finishes both directions cleanly', async (t) => {
  const p = await pair(t, [], ['--half-close-after', '100000', '--shut-after-eof', '50000']);
  const c = await waitForStatus(p.cStatus, (x) => x.closed === '1', 5_000);
  const s = await waitForStatus(p.sStatus, (x) => x.closed === '1', 5_000);
  t.equal(c.errors, '0', `client: ${c.lasterror ?? 'clean'}`);
  t.equal(s.errors, '0', `server: ${s.lasterror ?? 'clean'}`);
  t.equal(c.conns, '0');
  t.equal(await stop(p.client.child), 0);
  t.equal(await stop(p.server.child), 0);
});

t.test('memcheck --write-rate: dirties at the asked rate and verifies clean', async (t) => {
  const dir = scratch(t);
  const status = join(dir, 'memcheck.status');
  const { child } = await start(t, [workloadBin('memcheck'), '--status', status, '--mib', '64', '--write-rate', '50']);
  const first = readStatus(status);
  await sleep(2000);
  const s = readStatus(status);
  const pages = num(s, 'pages_written') - num(first, 'pages_written');
  t.comment(`write_mbps=${s.write_mbps} avg=${s.write_mbps_avg} sweeps=${s.sweeps} verify_skips=${s.verify_skips} pages_written(2 s)=${pages}`);
  t.equal(s.errors, '0', `no error (${s.lasterror ?? ''})`);
  t.ok(num(s, 'write_mbps') > 35 && num(s, 'write_mbps') < 65, `write_mbps ${s.write_mbps} ≈ 50`);
  t.ok((pages * 4096) / 2 / 1e6 > 35, 'pages_written advances at that rate');
  t.ok(num(s, 'sweeps') >= 5, 'the verifier sweeps continuously');
  for (const k of ['verified_pages', 'rewrites', 'epoll_wakeups', 'read_wakeups', 'region', 'pages']) t.ok(k in s, `key ${k} kept`);

  // A page put back to an older, self-consistent version (what a missed dirty page looks like after
  // a migration) must be caught, not only garbage.
  const region = Number(s.region);
  const page = 1234;
  const fd = openSync(`/proc/${child.pid}/mem`, 'r+');
  t.teardown(() => closeSync(fd));
  const old = Buffer.alloc(4096);
  readSync(fd, old, 0, 4096, region + page * 4096);
  const oldGen = old.readBigUInt64LE(0);
  // 16384 pages at ~12200 pages/s: every page is rewritten within ~1.4 s.
  const deadline = Date.now() + 5000;
  const cur = Buffer.alloc(4096);
  do {
    await sleep(200);
    readSync(fd, cur, 0, 4096, region + page * 4096);
  } while (cur.readBigUInt64LE(0) === oldGen && Date.now() < deadline);
  t.not(cur.readBigUInt64LE(0), oldGen, 'the writer rewrote the page');
  writeSync(fd, old, 0, 4096, region + page * 4096);
  const bad = await waitForStatus(status, (x) => x.errors !== '0', 3000);
  t.match(bad.lasterror, /stale-page_page_1234|memory-mismatch/, `detected: ${bad.lasterror}`);
  t.equal(await stop(child), 1, 'exit 1 after an error');
});
