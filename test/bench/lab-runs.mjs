// What the lab benchmarks share: memcheck status files, an agent's /metrics from the client
// namespace, and one verified move of a memcheck from hostA to hostB through `migrate --lab`.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const cli = join(root, 'apps', 'cli', 'dist', 'main.js');
export const memcheck = join(root, 'test', 'workloads', 'bin', 'memcheck');
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A memcheck status file as { key: value } strings. */
export function status(file) {
  return Object.fromEntries(readFileSync(file, 'utf8').trim().split(/\s+/).map((kv) => kv.split('=')));
}

export async function waitStatus(file, what, pred, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let s = null;
    try {
      s = status(file);
    } catch {}
    if (s && pred(s)) return s;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (${file}: ${s ? JSON.stringify(s) : 'no status'})`);
    await sleep(100);
  }
}

/** An agent's Prometheus text, fetched from the lab's client namespace with the cluster token. */
export async function agentMetrics(lab, host) {
  const agents = lab.agents();
  const url = `${agents.hosts[host].url}/metrics`;
  const headers = { authorization: `Bearer ${agents.clusterToken}` };
  const r = await lab.run('client', [process.execPath, '-e', `fetch(${JSON.stringify(url)},{headers:${JSON.stringify(headers)}}).then(r=>r.text()).then(t=>process.stdout.write(t))`], { timeoutMs: 10_000 });
  return r.stdout;
}

/** A memcheck on this machine (not in the lab), under its own `setsid sh`, once it has swept once. */
export async function startHostMemcheck(mib, rate, file) {
  rmSync(file, { force: true });
  spawnSync('setsid', ['-f', 'sh', '-c', `${memcheck} --status ${file} --mib ${mib} --write-rate ${rate} --threads none >/dev/null 2>&1; true`], { stdio: 'ignore' });
  const s = await waitStatus(file, `memcheck ${mib} MiB first sweep`, (st) => Number(st.sweeps) >= 1, 60_000);
  return { pid: Number(s.pid), region: s.region };
}

/**
 * One move of a fresh memcheck (`mib` MiB, writer at `rate` MB/s) from hostA to hostB in `mode`;
 * `measure(phase)` runs before ('before') and after ('after') the move for figures of the caller's.
 * Correct or worthless: the moved memcheck must verify its whole region twice more on hostB with
 * errors=0, else this throws. Resolves to the record, its events, the resident bytes the check
 * reported and the status at the move. The memcheck is killed (by its pid, in the host it is in).
 */
export async function moveMemcheck(lab, { mib, rate, mode, measure = async () => {} }) {
  const file = join(mkdtempSync(join(tmpdir(), `tern-bench-${mode}-`)), 'memcheck.status');
  // A full verifier sweep is well under 1 s per GiB here; allow generously (4 GiB, 2 shared cores).
  const sweepMs = 2000 + mib * 8;
  const wl = await lab.startDaemon('hostA', [memcheck, '--status', file, '--mib', String(mib), '--write-rate', String(rate), '--threads', 'none']);
  let onB = false;
  try {
    await waitStatus(file, `memcheck ${mib} MiB first sweep`, (s) => Number(s.sweeps) >= 1, 30_000 + sweepMs * 3);
    await sleep(1000); // the writer at its steady rate
    await measure('before');
    const r = await lab.run('client', [process.execPath, cli, '--lab', lab.name, '--from', 'hostA', '--to', 'hostB', '--pid', String(wl.pid), '--mode', mode, '--json'], { timeoutMs: 600_000 });
    let doc = null;
    try {
      doc = JSON.parse(r.stdout);
    } catch {}
    const rec = doc?.migration;
    if (r.code !== 0 || rec?.state !== 'done') throw new Error(`${mode} ${mib} MiB: migrate exit ${r.code}, state ${rec?.state}: ${JSON.stringify(rec?.failure ?? null)} ${r.stderr.slice(-500)}`);
    onB = true;
    await measure('after');
    const events = doc.events ?? [];
    const resident = Number(/(\d+) bytes resident/.exec(events.find((e) => /bytes resident/.test(e.message))?.message ?? '')?.[1]);
    const moved = status(file);
    const after = await waitStatus(file, `${mode} ${mib} MiB: two more sweeps on hostB`, (s) => Number(s.sweeps) >= Number(moved.sweeps) + 2 || s.errors !== '0', 30_000 + sweepMs * 4);
    if (after.errors !== '0') throw new Error(`${mode} ${mib} MiB: memcheck on hostB reports errors=${after.errors} (${after.lasterror})`);
    const there = await lab.run('hostB', ['sh', '-c', `test -d /proc/${wl.pid} && grep -q memcheck /proc/${wl.pid}/comm`]);
    if (there.code !== 0) throw new Error(`${mode} ${mib} MiB: pid ${wl.pid} does not run on hostB`);
    return { rec, events, resident, moved };
  } finally {
    // Only the memcheck this run started, by its pid in the host it is in now; wait until its
    // memory is given back before the next migration.
    const host = onB ? 'hostB' : 'hostA';
    await lab.run(host, ['sh', '-c', `kill -9 ${wl.pid} 2>/dev/null; for i in $(seq 300); do test -d /proc/${wl.pid} || exit 0; sleep 0.05; done`]).catch(() => {});
    if (onB) await lab.run('hostA', ['sh', '-c', `kill -9 ${wl.pid} 2>/dev/null; true`]).catch(() => {}); // (gone after a done migration)
    rmSync(dirname(file), { recursive: true, force: true });
  }
}
