/**
 * Network side of a migration, run by the agent in its own network namespace (a lab host, or the
 * real host):
 *
 * - Network lock. From just before the freeze until commit (or rollback) the source host drops the
 *   migrating process's TCP traffic, both directions, with an nftables table of our own per
 *   migration, `inet tern-<id>`, one rule per connection 4-tuple. Its kernel then neither ACKs
 *   data the destination will own nor answers with a RST; the peer just retransmits. Removed on
 *   commit and on every failure path ({@link unlockNetwork} is idempotent); {@link ternTables}
 *   lists what is left, for tests and for the agent's start-up sweep.
 * - Address handoff: {@link releaseAddress} / {@link claimAddress} (ip addr del/add + gratuitous
 *   ARP or unsolicited NA) for plain Linux hosts and the lab, and {@link runAddressHook}, which
 *   runs a user's script with the migration's details in its environment (keepalived, BGP, cloud).
 */
import { execFile, spawn } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface TcpTuple {
  v6: boolean;
  localAddress: string;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
}

/** /proc/net/tcp hex address (host byte order words) → text. */
function hexToAddress(hex: string, v6: boolean): string {
  const bytes: number[] = [];
  for (let w = 0; w < hex.length; w += 8) {
    const word = hex.slice(w, w + 8);
    // each 32-bit word is printed in host (little-endian) order
    for (let i = 6; i >= 0; i -= 2) bytes.push(parseInt(word.slice(i, i + 2), 16));
  }
  if (!v6) return bytes.join('.');
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  return groups.join(':');
}

/** The connected (not listening, not closed) TCP sockets `pid` holds. */
export function processConnections(pid: number): TcpTuple[] {
  const inodes = new Set<string>();
  let fds: string[] = [];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return []; // gone: the engine reports that with its own error
  }
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  const out: TcpTuple[] = [];
  for (const [file, v6] of [['tcp', false], ['tcp6', true]] as const) {
    let text = '';
    try {
      text = readFileSync(`/proc/${pid}/net/${file}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10) continue;
      const [local, remote, state, inode] = [f[1]!, f[2]!, f[3]!, f[9]!];
      if (!inodes.has(inode) || state === '0A' || state === '07') continue;
      const [la, lp] = local.split(':');
      const [ra, rp] = remote.split(':');
      out.push({
        v6,
        localAddress: hexToAddress(la!, v6),
        localPort: parseInt(lp!, 16),
        remoteAddress: hexToAddress(ra!, v6),
        remotePort: parseInt(rp!, 16),
      });
    }
  }
  return out;
}

/** The nftables table of one migration. */
export function lockTableName(migrationId: string): string {
  return `tern-${migrationId.replace(/[^A-Za-z0-9_-]/g, '_')}`;
}

/** nft script dropping the tuples both ways (exported for tests). */
export function lockScript(migrationId: string, tuples: TcpTuple[]): string {
  const table = lockTableName(migrationId);
  const lines = [
    `table inet ${table} {`,
    `  chain in { type filter hook input priority -150; policy accept;`,
  ];
  const rule = (t: TcpTuple, dir: 'in' | 'out') => {
    const ip = t.v6 ? 'ip6' : 'ip';
    return dir === 'in'
      ? `    ${ip} saddr ${t.remoteAddress} ${ip} daddr ${t.localAddress} tcp sport ${t.remotePort} tcp dport ${t.localPort} drop`
      : `    ${ip} saddr ${t.localAddress} ${ip} daddr ${t.remoteAddress} tcp sport ${t.localPort} tcp dport ${t.remotePort} drop`;
  };
  for (const t of tuples) lines.push(rule(t, 'in'));
  lines.push('  }', `  chain out { type filter hook output priority -150; policy accept;`);
  for (const t of tuples) lines.push(rule(t, 'out'));
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}

async function nft(args: string[], input?: string): Promise<string> {
  if (input === undefined) return (await execFileP('nft', args)).stdout;
  return await new Promise((resolve, reject) => {
    const child = spawn('nft', args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`nft ${args.join(' ')}: ${err.trim() || `exit ${code}`}`))));
    child.stdin.end(input);
  });
}

/**
 * Installs the lock for `pid`'s connections; returns the tuples locked (none: no table is made).
 * Call before the freeze.
 */
export async function lockNetwork(migrationId: string, pid: number): Promise<TcpTuple[]> {
  const tuples = processConnections(pid);
  if (tuples.length === 0) return tuples;
  await nft(['-f', '-'], lockScript(migrationId, tuples));
  return tuples;
}

/** Removes the migration's table if it exists. Never throws for a missing table. */
export async function unlockNetwork(migrationId: string): Promise<void> {
  const table = lockTableName(migrationId);
  if (!(await ternTables().catch(() => [table])).includes(table)) return;
  await nft(['delete', 'table', 'inet', table]).catch((err: Error) => {
    if (!/No such file|does not exist/i.test(err.message)) throw err;
  });
}

/** Names of every tern-* table in this network namespace. */
export async function ternTables(): Promise<string[]> {
  const out = await nft(['list', 'tables']);
  return out
    .split('\n')
    .map((l) => /^table\s+\S+\s+(tern-\S+)/.exec(l.trim())?.[1])
    .filter((t): t is string => t !== undefined);
}

// ---------------------------------------------------------------- address handoff

export interface AddressSpec {
  /** e.g. 10.77.0.200/32 or fd00::200/128 */
  cidr: string;
  dev: string;
}

export async function releaseAddress(a: AddressSpec): Promise<void> {
  await execFileP('ip', ['addr', 'del', a.cidr, 'dev', a.dev]).catch(() => {});
}

/** Adds the address and announces it (gratuitous ARP / unsolicited NA where the tools exist). */
export async function claimAddress(a: AddressSpec): Promise<void> {
  const v6 = a.cidr.includes(':');
  await execFileP('ip', v6 ? ['-6', 'addr', 'add', a.cidr, 'dev', a.dev, 'nodad'] : ['addr', 'add', a.cidr, 'dev', a.dev]).catch((err: Error) => {
    if (!/File exists/.test(err.message)) throw err;
  });
  const addr = a.cidr.split('/')[0]!;
  if (!v6) await execFileP('arping', ['-U', '-c', '1', '-I', a.dev, addr]).catch(() => {});
  else await execFileP('ndisc6', ['-q', addr, a.dev]).catch(() => {});
}

/** Runs a user's handoff script: TERN_PHASE=release|claim|rollback and the migration's details. */
export async function runAddressHook(
  script: string,
  phase: 'release' | 'claim' | 'rollback',
  details: { migrationId: string; pid: number; from: string; to: string; address?: string },
): Promise<void> {
  await execFileP(script, [phase], {
    env: {
      ...process.env,
      TERN_PHASE: phase,
      TERN_MIGRATION_ID: details.migrationId,
      TERN_PID: String(details.pid),
      TERN_FROM: details.from,
      TERN_TO: details.to,
      TERN_ADDRESS: details.address ?? '',
    },
    timeout: 30_000,
  });
}
