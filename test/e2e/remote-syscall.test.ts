// Remote syscalls inside a live, self-checking workload (test/workloads/memcheck) running in a lab
// host: getpid, mmap, a write into the new mapping, munmap. The workload keeps checksumming its own
// memory and counting; its threads blocked in epoll_wait, read, nanosleep and a futex must resume
// their calls correctly (no EINTR, exact data), which the workload verifies itself.
import t from 'tap';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SYS, Tracer } from '@tern/native';
import { labFor, sleep } from './helpers.js';
import { readStatus, waitForStatus, workloadBin } from '../workloads/status.js';

const PAGE = 4096;
const PROT_READ = 1, PROT_WRITE = 2, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20;

const counters = ['tick', 'epoll_wakeups', 'read_wakeups', 'sleeps', 'futex_wakeups'] as const;

t.test('getpid, mmap, write, munmap injected into memcheck; it carries on unharmed', async (t) => {
  const lab = await labFor(t, 1);
  const status = join(mkdtempSync(join(tmpdir(), 'tern-wl-')), 'memcheck.status');
  const wl = await lab.startDaemon('hostA', [workloadBin('memcheck'), '--status', status, '--mib', '64']);
  await waitForStatus(status, (s) => Number(s.tick) > 20 && Number(s.read_wakeups) > 2, 10_000);

  const tracer = Tracer.open(wl.rootPid);
  t.teardown(() => tracer.close());

  for (let round = 0; round < 3; round++) {
    const before = readStatus(status);
    const freeze = await tracer.freeze();
    t.ok(freeze.threads.length >= 5, `froze ${freeze.threads.length} threads`);

    const pid = await tracer.syscall(SYS.getpid);
    t.equal(pid, wl.pid, 'getpid() inside the target returns its pid in the host namespace');

    const addr = await tracer.syscall(SYS.mmap, 0, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    t.ok(addr > 0 && addr % PAGE === 0, `mmap returned a page-aligned address 0x${addr.toString(16)}`);
    const hex = addr.toString(16);
    t.match(readFileSync(`/proc/${wl.rootPid}/maps`, 'utf8'), new RegExp(`^0*${hex}-`, 'm'), 'the mapping is in the target');

    const pattern = Buffer.alloc(2 * PAGE, `tern-remote-${round}-`);
    await tracer.writeMemory(addr, pattern);
    t.ok((await tracer.readMemory(addr, pattern.length)).equals(pattern), 'bytes written into the new mapping read back equal');

    t.equal(await tracer.syscall(SYS.munmap, addr, 2 * PAGE), 0, 'munmap returned 0');
    t.notMatch(readFileSync(`/proc/${wl.rootPid}/maps`, 'utf8'), new RegExp(`^0*${hex}-`, 'm'), 'the mapping is gone');

    await tracer.thaw();
    // Every blocked thread must wake again and the memory checks must stay clean.
    const after = await waitForStatus(
      status,
      (s) => counters.every((k) => Number(s[k]) > Number(before[k]) + 1),
      10_000,
    );
    t.equal(after.errors, '0', `no self-check error after round ${round} (${after.lasterror ?? 'clean'})`);
    await sleep(100);
  }
  const final = readStatus(status);
  t.equal(final.errors, '0', 'workload reports zero errors at the end');
});
