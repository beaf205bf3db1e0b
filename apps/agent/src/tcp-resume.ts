/**
 * After a restore, how long each restored TCP connection waits for its peer: from the moment the
 * process runs again until the first data from the peer arrives.
 *
 * A client's pause is the downtime plus this delay. When the peer sent something during the
 * freeze, the source's network lock dropped it, and the peer only sends it again on its
 * retransmission timer — so a delay of hundreds of milliseconds here means a peer waited out its
 * RTO (backed off during a long freeze), which the peer nudge (TCP issue) exists to cut short.
 * Connections whose peer stays silent (an idle client) are counted as idle, not as a delay.
 *
 * Read from the kernel through ss(8) (sock_diag): `lastrcv` is the milliseconds since the socket
 * last received data. (Not `lastack`: leaving repair mode sends a window probe that every peer
 * ACKs at once, which says nothing about the data it still has to send again.)
 */
import { socketInodes } from './network.js';
import { runCommand } from './spawner.js';

export interface TcpResumeReport {
  /** Established connections of the process when the watch started. */
  connections: number;
  /** Per connection that heard from its peer: seconds from the resume to that first segment. */
  delaysSeconds: number[];
  /** Connections that heard nothing within the watch. */
  idle: number;
}

/** `ss -tinHe state established` → inode → ms since the last data from the peer. */
export function parseSsQuiet(text: string): Map<string, number> {
  const records: string[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    if (/^\s/.test(line) && records.length) records[records.length - 1] += ` ${line.trim()}`;
    else records.push(line.trim());
  }
  const out = new Map<string, number>();
  for (const r of records) {
    const ino = /\bino:(\d+)/.exec(r)?.[1];
    if (!ino) continue;
    const rcv = /\blastrcv:(\d+)/.exec(r)?.[1];
    out.set(ino, rcv !== undefined ? Number(rcv) : Infinity);
  }
  return out;
}

/**
 * Watches `pid`'s established connections from `resumedAt` (performance.now() when the process
 * resumed) until each heard from its peer or `timeoutMs` passed.
 */
export async function watchTcpResume(pid: number, resumedAt: number, opts: { timeoutMs?: number; everyMs?: number } = {}): Promise<TcpResumeReport> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  const everyMs = opts.everyMs ?? 10;
  const inodes = socketInodes(pid);
  const pending = new Set<string>();
  const delays: number[] = [];
  let first = true;
  for (;;) {
    let text = '';
    try {
      text = (await runCommand('ss', ['-tinHe', 'state', 'established'])).stdout;
    } catch {
      break; // no ss: nothing to report
    }
    const elapsedMs = performance.now() - resumedAt;
    const quiet = parseSsQuiet(text);
    if (first) {
      for (const ino of quiet.keys()) if (inodes.has(ino)) pending.add(ino);
      first = false;
    }
    for (const ino of [...pending]) {
      const q = quiet.get(ino);
      if (q === undefined) {
        pending.delete(ino); // closed: neither a delay nor idle
        continue;
      }
      if (q < elapsedMs) {
        delays.push(Math.max(0, elapsedMs - q) / 1000);
        pending.delete(ino);
      }
    }
    if (pending.size === 0 || elapsedMs > timeoutMs) break;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  return { connections: delays.length + pending.size, delaysSeconds: delays, idle: pending.size };
}
