/**
 * Destination-side readiness, checked before anything is started for a migration: the pid is free in
 * this host's pid namespace (restore reuses it), the kernel is the same (the vdso ABI the process was
 * built against), every file the process maps or holds open exists here with the same size, and there
 * is memory for it. Reads /proc and stats files only.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { release } from 'node:os';
import type { Blocker, PrepareRequest } from '@tern/protocol';

function memAvailableBytes(): number | null {
  try {
    const m = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    return m?.[1] ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

export function destinationBlockers(req: PrepareRequest): Blocker[] {
  const blockers: Blocker[] = [];
  // /proc here is this host's: the agent runs inside the host's pid and mount namespaces.
  if (existsSync(`/proc/${req.pid}`)) {
    blockers.push({ subject: 'process', kind: 'pid-taken', reason: `pid ${req.pid} is already in use on this host; restore needs the same pid` });
  }
  if (req.kernelRelease !== undefined && req.kernelRelease !== release()) {
    blockers.push({
      subject: 'kernel',
      kind: 'kernel-mismatch',
      reason: `the source runs kernel ${req.kernelRelease}, this host ${release()}: the vdso ABI may differ`,
    });
  }
  for (const f of req.files ?? []) {
    let size: number;
    let regular: boolean;
    try {
      const st = statSync(f.path);
      size = st.size;
      regular = st.isFile();
    } catch {
      blockers.push({ subject: f.path, kind: 'file-missing', reason: `${f.path} does not exist on this host` });
      continue;
    }
    if (f.size !== undefined && regular && size !== f.size) {
      blockers.push({ subject: f.path, kind: 'file-changed', reason: `${f.path} is ${size} bytes here and ${f.size} at the source` });
    }
  }
  const available = memAvailableBytes();
  if (req.residentBytes !== undefined && available !== null && available < req.residentBytes) {
    blockers.push({
      subject: 'memory',
      kind: 'memory',
      reason: `the process has ${req.residentBytes} bytes resident and this host only ${available} available`,
    });
  }
  return blockers;
}
