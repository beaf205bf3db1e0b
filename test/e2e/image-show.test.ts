// `migrate image show` on a real image: a live workload is frozen and dumped through the engine
// (pages streamed to a local page server), thawed untouched, and its image file printed.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { newPageCredentials, PageServer, SourceSession } from '@tern/native';
import { runCli } from './helpers.js';
import { waitForStatus, workloadBin } from '../workloads/status.js';

t.test('a dumped memcheck image reads back with its threads, mappings and fds', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tern-image-'));
  const status = join(dir, 'memcheck.status');
  // Its own session (not a child of this Node process, whose child reaping would take ptrace stops).
  spawnSync('setsid', ['-f', workloadBin('memcheck'), '--status', status, '--mib', '8'], { stdio: 'ignore' });
  const s = await waitForStatus(status, (st) => Number(st.tick) > 10, 10_000);
  const pid = Number(s.pid);
  t.teardown(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  });

  const creds = newPageCredentials();
  const server = await PageServer.start({ address: '127.0.0.1', ...creds });
  t.teardown(() => server.close());
  const session = SourceSession.open(pid);
  await session.freeze();
  const { image, dump } = await session.dump({ address: '127.0.0.1', port: server.port, ...creds });
  await session.abort();
  t.ok(dump.dataPages > 8 * 256, `dumped ${dump.dataPages} data pages`);
  const after = await waitForStatus(status, (st) => Number(st.tick) > Number(s.tick) + 10, 10_000);
  t.equal(after.errors, '0', 'the workload was thawed untouched');

  const file = join(dir, 'memcheck.img');
  writeFileSync(file, image);
  const json = await runCli(['image', 'show', file, '--json']);
  t.equal(json.code, 0, json.stderr);
  const doc = JSON.parse(json.stdout) as Record<string, unknown>;
  const img = (doc.image ?? doc) as { version: number; source: { pid: number }; threads: unknown[]; mm: { vmas: unknown[] }; fds: unknown[] };
  t.equal(img.version, 2, 'image version 2');
  t.equal(img.source.pid, pid, 'the source pid');
  const threads = Number(/Threads:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
  t.equal(img.threads.length, threads, `one entry per thread (${threads})`);
  t.ok(img.mm.vmas.length > 10, `${img.mm.vmas.length} VMAs`);
  t.ok(img.fds.length >= 3, `${img.fds.length} fds`);
  const human = await runCli(['image', 'show', file]);
  t.equal(human.code, 0);
  t.match(human.stdout, /threads/i);
  t.match(human.stdout, /memcheck/);
});
