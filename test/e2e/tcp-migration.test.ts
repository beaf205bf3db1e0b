// TCP connections across a migration, end to end through `migrate --lab`: the lab's client
// namespace talks to the service address (10.77.0.200) on hostA, and after the move to hostB over
// the same connections. The source agent locks the process's connections (nftables), releases
// the service address after the freeze; the destination claims it, restores the sockets in
// repair mode; a failed restore gives everything back to hostA.
import t from 'tap';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import type { Lab } from '@tern/lab';
import { labWithAgents, migrate, redisCli, repoRoot, runsOn, sleep, startRedis, waitFor } from './helpers.js';
import { num, readStatus, waitForStatus, workloadBin } from '../workloads/status.js';

const incrLoop = join(repoRoot, 'test', 'e2e', 'fixtures', 'redis_incr_loop.py');

interface IncrResult {
  replies: number;
  first: number | null;
  last: number | null;
  errors: string[];
  max_gap_ms: number;
  gap_at: number | null;
}

/** Starts the INCR client in the client namespace; stop() ends it and returns its report. */
function incrClient(lab: Lab, key: string): { stop: () => Promise<IncrResult> } {
  const dir = mkdtempSync(join(tmpdir(), 'tern-tcp-'));
  const stopFile = join(dir, 'stop');
  const run = lab.run('client', ['python3', incrLoop, lab.info.serviceAddress, '6379', key, stopFile], { timeoutMs: 300_000 });
  return {
    stop: async () => {
      writeFileSync(stopFile, '');
      const r = await run;
      try {
        return JSON.parse(r.stdout.trim().split('\n').pop()!) as IncrResult;
      } catch {
        return { replies: 0, first: null, last: null, errors: [`client exited ${r.code}: ${r.stdout}${r.stderr}`], max_gap_ms: 0, gap_at: null };
      }
    },
  };
}

/** Output collected from a long-running command in the client namespace. */
function background(lab: Lab, argv: string[]): { child: ChildProcess; output: () => string } {
  const child = lab.spawn('client', argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  return { child, output: () => out };
}

/** Where the service address is configured, and the tern-* nftables tables left anywhere. */
async function networkState(lab: Lab): Promise<{ addressOn: string[]; tables: string[] }> {
  const addressOn: string[] = [];
  const tables: string[] = [];
  for (const h of lab.info.hosts) {
    const addrs = (await lab.run(h.name, ['ip', '-4', '-o', 'addr', 'show'])).stdout;
    if (addrs.includes(`${lab.info.serviceAddress}/32`)) addressOn.push(h.name);
    const nft = (await lab.run(h.name, ['nft', 'list', 'tables'])).stdout;
    for (const m of nft.matchAll(/table \S+ (tern-\S+)/g)) tables.push(`${h.name}:${m[1]}`);
  }
  return { addressOn, tables };
}

/** Sums the matched samples of a host agent's /metrics, read from the client namespace. */
async function agentMetrics(lab: Lab, host: string, re: RegExp): Promise<Record<string, number>> {
  const agents = lab.agents()!;
  const url = `${agents.hosts[host]!.url}/metrics`;
  const script = `fetch(${JSON.stringify(url)},{headers:{authorization:'Bearer ${agents.clusterToken}'}}).then(r=>r.text()).then(t=>process.stdout.write(t))`;
  const text = (await lab.run('client', [process.execPath, '-e', script])).stdout;
  const out: Record<string, number> = {};
  for (const m of text.matchAll(re)) out[m[1]!] = (out[m[1]!] ?? 0) + Number(m[2]);
  return out;
}

t.test('redis with 50 benchmark clients and an INCR loop connected moves without an error', async (t) => {
  const lab = await labWithAgents(t);
  const redis = await startRedis(lab, 'hostA', { extra: ['--maxclients', '1000'] });
  const cli = (...args: string[]) => redisCli(lab, 'client', lab.info.serviceAddress, 6379, args);
  await cli('DEBUG', 'POPULATE', '200000', 'key', '100');
  const digestBefore = await cli('DEBUG', 'DIGEST');
  const dbsizeBefore = await cli('DBSIZE');

  // 50 connections reading the dataset in a loop, plus one connection counting.
  const bench = background(lab, ['redis-benchmark', '-h', lab.info.serviceAddress, '-c', '50', '-t', 'get,ping_mbulk', '-r', '200000', '-l', '-q']);
  const incr = incrClient(lab, 'tern:counter');
  await sleep(2000);
  const connected = Number((await cli('INFO', 'clients')).match(/connected_clients:(\d+)/)?.[1]);
  t.ok(connected >= 50, `${connected} clients connected while the migration starts`);

  const m = await migrate(lab, redis);
  t.equal(m.code, 0, m.code === 0 ? 'migrate exit 0' : `migrate exit ${m.code}: ${m.out.slice(-800)}`);
  t.equal(m.record?.state, 'done');
  await sleep(2000); // the clients keep going on hostB
  const counted = await incr.stop();
  const benchAlive = bench.child.exitCode === null && bench.child.signalCode === null;
  bench.child.kill('SIGINT');
  await new Promise((r) => bench.child.once('close', r));

  const downtime = (m.record?.stats as { downtimeMs?: number } | undefined)?.downtimeMs;
  t.comment(`downtime ${downtime?.toFixed(1)} ms; the INCR client's longest gap between two replies: ${counted.max_gap_ms.toFixed(1)} ms (at ${counted.gap_at} s), ${counted.replies} replies`);
  t.same(counted.errors, [], 'the INCR client saw no error, no reset and no jump in the counter');
  t.ok(counted.replies > 100, 'the INCR client was served before and after the move');
  t.ok(benchAlive, `redis-benchmark (50 clients) was still running at the end: no connection failed (${bench.output().slice(-300)})`);
  t.notMatch(bench.output(), /error|reset|closed|refused/i, 'and reported no error');
  t.equal(await cli('GET', 'tern:counter'), String(counted.last), 'the counter on hostB is the last value the client saw');

  t.ok(await runsOn(lab, 'hostB', redis), 'redis runs on hostB');
  t.notOk(await runsOn(lab, 'hostA', redis), 'and is gone from hostA');
  await cli('DEL', 'tern:counter');
  t.equal(await cli('DBSIZE'), dbsizeBefore, 'DBSIZE unchanged');
  t.equal(await cli('DEBUG', 'DIGEST'), digestBefore, 'DEBUG DIGEST unchanged');
  const resume = await agentMetrics(lab, 'hostB', /^tern_agent_tcp_resume_delay_seconds_(count|sum) (\S+)$/gm);
  t.comment(`hostB agent: ${resume.count} restored connections heard from their peers, mean delay after the resume ${((resume.sum / Math.max(1, resume.count)) * 1000).toFixed(1)} ms`);
  t.ok(resume.count >= 1, 'the destination agent recorded the connections resuming (tern_agent_tcp_resume_delay_seconds)');
  const net = await networkState(lab);
  t.same(net.addressOn, ['hostB'], 'the service address moved to hostB');
  t.same(net.tables, [], 'no nftables lock table left on either host');
  // A wide margin: the pause is the downtime plus the peers' retransmission; seconds would mean a
  // connection waited out an RTO backoff.
  t.ok(counted.max_gap_ms < 5000, 'the client-observed pause stays well under 5 s');
});

t.test('a restore that fails leaves the connections on hostA, the address there and no lock table', async (t) => {
  const lab = await labWithAgents(t);
  const redis = await startRedis(lab, 'hostA', { extra: ['--maxclients', '1000'] });
  const cli = (...args: string[]) => redisCli(lab, 'client', lab.info.serviceAddress, 6379, args);
  await cli('DEBUG', 'POPULATE', '10000', 'key', '100');
  const digestBefore = await cli('DEBUG', 'DIGEST');
  // Something on hostB already listens on redis' port: the restored listener cannot bind.
  await lab.startDaemon('hostB', ['python3', '-c', "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',6379))\ns.listen()\ntime.sleep(600)"]);
  await sleep(300);
  const incr = incrClient(lab, 'tern:counter');
  await sleep(1000);

  const m = await migrate(lab, redis);
  t.not(m.code, 0, 'migrate fails');
  t.equal(m.record?.state, 'failed', `the migration failed (${m.record?.failure?.message})`);
  t.equal(m.record?.failure?.phase, 'restoring', 'in the restore');
  await sleep(1500); // the client keeps being served by the original
  const counted = await incr.stop();
  t.comment(`the INCR client's longest gap: ${counted.max_gap_ms.toFixed(1)} ms, ${counted.replies} replies`);
  t.same(counted.errors, [], 'the INCR client saw no error: its connection carried on at the source');
  t.ok(await runsOn(lab, 'hostA', redis), 'redis still runs on hostA');
  t.notOk(await runsOn(lab, 'hostB', redis), 'nothing of it is left on hostB');
  const net = await networkState(lab);
  t.same(net.addressOn, ['hostA'], 'the service address is back on hostA only');
  t.same(net.tables, [], 'no nftables lock table left on either host');
  await cli('DEL', 'tern:counter');
  t.equal(await cli('DEBUG', 'DIGEST'), digestBefore, 'the dataset is untouched');
});

/**
 * tcpstream (test/workloads): a server on hostA and a client in the client namespace exchange a
 * verifiable pseudo-random stream both ways on 4 connections at full speed; the server moves.
 * Every byte is checked at its offset on both sides, so a lost, duplicated or reordered byte, a
 * reset or an unannounced EOF is an error. `clientArgs` puts the connections into a half-closed
 * state first (the server's socket in CLOSE_WAIT or FIN_WAIT2 while data still flows the other way).
 */
const streamCases: { name: string; clientArgs: string[]; serverState: string | null; flows: { toClient: boolean; toServer: boolean } }[] = [
  { name: 'established', clientArgs: [], serverState: null, flows: { toClient: true, toServer: true } },
  // The client sends 8 MB, then shuts its write side: the server holds CLOSE_WAIT and keeps sending.
  { name: 'server in CLOSE_WAIT', clientArgs: ['--half-close-after', '8000000'], serverState: 'CLOSE-WAIT', flows: { toClient: true, toServer: false } },
  // The server sends 8 MB, then shuts its write side: it holds FIN_WAIT2 and keeps receiving.
  { name: 'server in FIN_WAIT2', clientArgs: ['--server-half-close-after', '8000000'], serverState: 'FIN-WAIT-2', flows: { toClient: false, toServer: true } },
];

for (const c of streamCases) {
  t.test(`a byte-exact stream (${c.name}) carries on across the move`, async (t) => {
    const lab = await labWithAgents(t);
    const dir = mkdtempSync(join(tmpdir(), 'tern-tcpstream-'));
    const serverStatus = join(dir, 'server.status');
    const clientStatus = join(dir, 'client.status');
    const server = await lab.startDaemon('hostA', [workloadBin('tcpstream'), 'server', '--listen', '0.0.0.0:7000', '--status', serverStatus]);
    await waitForStatus(serverStatus, (s) => s.state === 'running', 10_000);
    const client = lab.spawn('client', [workloadBin('tcpstream'), 'client', '--connect', `${lab.info.serviceAddress}:7000`, '--status', clientStatus, '--conns', '4', ...c.clientArgs], { stdio: 'ignore' });
    t.teardown(() => client.kill('SIGKILL'));
    // Flowing well in every direction that is still open.
    const flowing = (base: { sent: number; received: number }, enough: number) => (s: Record<string, string>) =>
      (!c.flows.toClient || num(s, 'bytes_received') > base.received + enough) && (!c.flows.toServer || num(s, 'bytes_sent') > base.sent + enough);
    const before = await waitForStatus(clientStatus, flowing({ sent: 0, received: 0 }, 20_000_000), 30_000);
    const inState = async (host: string) => (await lab.run(host, ['ss', '-tanH', 'sport', '=', ':7000'])).stdout.split('\n').filter((l) => l.startsWith(c.serverState!)).length;
    if (c.serverState) {
      await waitFor(`4 connections in ${c.serverState}`, async () => ((await inState('hostA')) === 4 ? true : null), 30_000);
      t.pass(`the server's 4 connections are in ${c.serverState} before the move`);
    }

    const m = await migrate(lab, server.pid);
    t.equal(m.code, 0, m.code === 0 ? 'migrate exit 0' : `migrate exit ${m.code}: ${m.out.slice(-800)}`);
    const movedAt = { sent: num(readStatus(clientStatus), 'bytes_sent'), received: num(readStatus(clientStatus), 'bytes_received') };
    await waitForStatus(clientStatus, flowing(movedAt, 20_000_000), 30_000);
    if (c.serverState) t.equal(await inState('hostB'), 4, `and in ${c.serverState} on hostB after it`);
    const cs = readStatus(clientStatus);
    const ss = readStatus(serverStatus);
    const downtime = (m.record?.stats as { downtimeMs?: number } | undefined)?.downtimeMs;
    t.comment(`downtime ${downtime?.toFixed(1)} ms; client-observed pause (longest gap between reads) ${cs.max_gap_ms} ms; ${(num(cs, 'bytes_received') / 1e6).toFixed(0)} MB received and ${(num(cs, 'bytes_sent') / 1e6).toFixed(0)} MB sent by the client`);
    t.equal(num(cs, 'errors'), 0, `the client saw no wrong byte, reset or unannounced EOF (${cs.lasterror ?? ''})`);
    t.equal(num(cs, 'resets'), 0, 'no reset');
    t.equal(num(ss, 'errors'), 0, `the server, now on hostB, saw none either (${ss.lasterror ?? ''})`);
    t.equal(num(cs, 'conns'), num(before, 'conns'), 'every connection is still open');
    t.ok(await runsOn(lab, 'hostB', server.pid), 'the server runs on hostB');
    t.notOk(await runsOn(lab, 'hostA', server.pid), 'and is gone from hostA');
    t.same((await networkState(lab)).tables, [], 'no lock table left');
  });
}
