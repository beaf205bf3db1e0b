/**
 * Network side of a migration, run by the agent in its own network namespace (a lab host, or the
 * real host):
 *
 * - Network lock ({@link NetworkLock}). From just before the freeze until commit (or rollback) the
 *   source host drops the migrating process's TCP traffic, both directions, with an nftables table
 *   of our own per migration, `inet tern-<id>`, one rule per connection 4-tuple (connections made
 *   between the lock and the freeze are added right after the freeze). Its kernel then neither
 *   ACKs data the destination will own nor answers with a RST; the peer just retransmits. Removed
 *   on commit and on every failure path ({@link unlockNetwork} is idempotent); the table's comment
 *   names its agent, so an agent starting after a crash removes what a dead agent left
 *   ({@link sweepLockTables}).
 * - Address handoff ({@link AddressHandoff}): the service address leaves the source host after the
 *   freeze and is added on the destination host before the restore, announced by gratuitous ARP /
 *   unsolicited NA; undone in the opposite order on rollback. A user's hook script replaces the
 *   built-in ip(8) handler for networks where addresses move otherwise (keepalived, BGP, a cloud).
 */
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { isIP } from 'node:net';
import { runCommand, type CommandError } from './spawner.js';

export interface TcpTuple {
  v6: boolean;
  localAddress: string;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
}

/** One TCP socket of a process, as /proc/PID/net/tcp{,6} shows it. */
export interface TcpSocketEntry extends TcpTuple {
  /** The kernel's state number (1 ESTABLISHED ... 10 LISTEN). */
  state: number;
}

const TCP_CLOSE = 7;
const TCP_LISTEN = 10;

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
  // IPv4-mapped (::ffff:a.b.c.d): the address a v4 client reaches a dual-stack socket at.
  if (groups.slice(0, 5).every((g) => g === '0') && groups[5] === 'ffff') return bytes.slice(12).join('.');
  return groups.join(':');
}

/** Every TCP socket `pid` holds (listening and connected), from its network namespace's tables. */
/** Inodes of the sockets `pid` holds (empty if it is gone). */
export function socketInodes(pid: number): Set<string> {
  const inodes = new Set<string>();
  let fds: string[] = [];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return inodes; // gone: the engine reports that with its own error
  }
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  return inodes;
}

export function processTcpSockets(pid: number): TcpSocketEntry[] {
  const inodes = socketInodes(pid);
  if (inodes.size === 0) return [];
  const out: TcpSocketEntry[] = [];
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
      if (!inodes.has(inode)) continue;
      const [la, lp] = local.split(':');
      const [ra, rp] = remote.split(':');
      out.push({
        v6,
        state: parseInt(state, 16),
        localAddress: hexToAddress(la!, v6),
        localPort: parseInt(lp!, 16),
        remoteAddress: hexToAddress(ra!, v6),
        remotePort: parseInt(rp!, 16),
      });
    }
  }
  return out;
}

/** The connected (not listening, not closed) TCP sockets `pid` holds. */
export function processConnections(pid: number): TcpTuple[] {
  return processTcpSockets(pid)
    .filter((s) => s.state !== TCP_LISTEN && s.state !== TCP_CLOSE)
    .map(({ state: _state, ...tuple }) => tuple);
}

/** The nftables table of one migration. */
export function lockTableName(migrationId: string): string {
  return `tern-${migrationId.replace(/[^A-Za-z0-9_-]/g, '_')}`;
}

/** The address family a tuple travels in on the wire (a v4-mapped v6 socket speaks IPv4). */
const wireFamily = (t: TcpTuple): 'ip' | 'ip6' => (t.remoteAddress.includes(':') ? 'ip6' : 'ip');

function lockRule(t: TcpTuple, dir: 'in' | 'out'): string {
  const ip = wireFamily(t);
  return dir === 'in'
    ? `${ip} saddr ${t.remoteAddress} ${ip} daddr ${t.localAddress} tcp sport ${t.remotePort} tcp dport ${t.localPort} drop`
    : `${ip} saddr ${t.localAddress} ${ip} daddr ${t.remoteAddress} tcp sport ${t.localPort} tcp dport ${t.remotePort} drop`;
}

/**
 * nft script creating the migration's table, dropping the tuples both ways (exported for tests).
 * The table's comment names the agent process that owns it, so that an agent starting after a
 * crash can tell its leftovers from the tables of agents still alive ({@link sweepLockTables}).
 */
export function lockScript(migrationId: string, tuples: TcpTuple[], ownerPid = process.pid): string {
  const table = lockTableName(migrationId);
  const lines = [
    `table inet ${table} {`,
    `  comment "tern agent pid ${ownerPid}"`,
    `  chain in { type filter hook input priority -150; policy accept;`,
  ];
  for (const t of tuples) lines.push(`    ${lockRule(t, 'in')}`);
  lines.push('  }', `  chain out { type filter hook output priority -150; policy accept;`);
  for (const t of tuples) lines.push(`    ${lockRule(t, 'out')}`);
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}

async function nft(args: string[], input?: string): Promise<string> {
  if (input === undefined) return (await runCommand('nft', args)).stdout;
  try {
    return (await runCommand('nft', args, { input })).stdout;
  } catch (err) {
    const e = err as CommandError;
    if (typeof e.code !== 'number') throw err; // not nft's failure (no nft, killed): as it is
    throw new Error(`nft ${args.join(' ')}: ${e.stderr.trim() || `exit ${e.code}`}`);
  }
}

const tupleKey = (t: TcpTuple) => `${t.localAddress}|${t.localPort}|${t.remoteAddress}|${t.remotePort}`;

/**
 * The network lock of one migration. `lock()` before the freeze installs the table for the
 * process's connections; `extend()` right after the freeze adds the ones accepted or connected
 * between the two (the process is stopped then, so the set is final); {@link unlockNetwork}
 * removes it (by name: also from a later request that does not hold this object).
 */
export class NetworkLock {
  private readonly locked = new Map<string, TcpTuple>();

  constructor(
    readonly migrationId: string,
    readonly pid: number,
  ) {}

  get table(): string {
    return lockTableName(this.migrationId);
  }

  /** Drops the process's connections (no connection: no table); returns the tuples locked. */
  async lock(): Promise<TcpTuple[]> {
    return await this.extend();
  }

  /** Adds the connections that appeared since lock() (the table is made by the first); returns them. */
  async extend(): Promise<TcpTuple[]> {
    const fresh = processConnections(this.pid).filter((t) => !this.locked.has(tupleKey(t)));
    if (fresh.length === 0) return [];
    if (this.locked.size === 0) {
      await nft(['-f', '-'], lockScript(this.migrationId, fresh));
    } else {
      const script = fresh.flatMap((t) => [`add rule inet ${this.table} in ${lockRule(t, 'in')}`, `add rule inet ${this.table} out ${lockRule(t, 'out')}`]);
      await nft(['-f', '-'], script.join('\n') + '\n');
    }
    for (const t of fresh) this.locked.set(tupleKey(t), t);
    return fresh;
  }
}

/**
 * The destination's side of the lock: from claiming the service addresses until the restored
 * sockets exist, a peer's segment (a retransmission, or a new SYN) finds no socket here and the
 * kernel would answer with a RST that kills the connection on the peer. This table drops the RSTs
 * this host would send from those addresses, so such segments are just lost and retransmitted.
 * Removed as soon as the restore returns (and on every failure path).
 */
export function restoreGuardScript(migrationId: string, addresses: string[], ownerPid = process.pid): string {
  const table = `${lockTableName(migrationId)}-dst`;
  const lines = [`table inet ${table} {`, `  comment "tern agent pid ${ownerPid}"`, `  chain out { type filter hook output priority -150; policy accept;`];
  for (const text of addresses) {
    const a = parseServiceAddress(text);
    lines.push(`    ${a.address.includes(':') ? 'ip6' : 'ip'} saddr ${a.address} tcp flags & rst == rst drop`);
  }
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}

export async function guardRestore(migrationId: string, addresses: string[]): Promise<void> {
  if (addresses.length === 0) return;
  await nft(['-f', '-'], restoreGuardScript(migrationId, addresses));
}

export async function unguardRestore(migrationId: string): Promise<void> {
  await unlockNetwork(`${migrationId}-dst`);
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

/**
 * Removes the lock tables left by agents that died (their owner pid, in the table's comment, is
 * no longer a tern agent). Called when the agent starts: a crashed agent must not leave a
 * process's connections black-holed. Returns the tables removed.
 */
export async function sweepLockTables(isAlive: (pid: number) => boolean = agentAlive): Promise<string[]> {
  const removed: string[] = [];
  for (const table of await ternTables()) {
    let owner: number | null = null;
    try {
      const text = await nft(['list', 'table', 'inet', table]);
      const m = /comment "tern agent pid (\d+)"/.exec(text);
      owner = m ? Number(m[1]) : null;
    } catch {
      continue; // not an inet table, or gone meanwhile
    }
    if (owner !== null && owner !== process.pid && isAlive(owner)) continue;
    if (owner === null) continue; // not made by an agent (an operator's table): leave it
    await nft(['delete', 'table', 'inet', table]).catch(() => {});
    removed.push(table);
  }
  return removed;
}

function agentAlive(pid: number): boolean {
  try {
    process.kill(pid, 0); // existence only: no signal is sent
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

// ---------------------------------------------------------------- address handoff

/** An address the agent may hand off, with its prefix: 10.77.0.200/32, fd00::200/128. */
export interface ServiceAddress {
  address: string;
  prefix: number;
}

export function parseServiceAddress(text: string): ServiceAddress {
  const m = /^([^/\s]+)(?:\/(\d{1,3}))?$/.exec(text.trim());
  const family = m ? isIP(m[1]!) : 0;
  const prefix = m?.[2] !== undefined ? Number(m[2]) : family === 6 ? 128 : 32;
  if (!m || family === 0 || prefix > (family === 6 ? 128 : 32)) {
    throw new Error(`${JSON.stringify(text)} is not an address or address/prefix`);
  }
  return { address: m[1]!.toLowerCase(), prefix };
}

/**
 * One spelling per address, to compare what /proc, ip(8) and a config file say: IPv6 fully
 * expanded, groups without leading zeros, lowercase (/proc/net/tcp6 is turned into that form).
 */
export function canonicalAddress(address: string): string {
  if (!address.includes(':')) return address;
  const [head, tail] = address.toLowerCase().split('::') as [string, string | undefined];
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const groups = tail === undefined ? left : [...left, ...Array(8 - left.length - right.length).fill('0'), ...right];
  return groups.map((g: string) => (parseInt(g, 16) || 0).toString(16)).join(':');
}

export const formatServiceAddress = (a: ServiceAddress): string => `${a.address}/${a.prefix}`;

/** What the handoff needs to know about the migration (also the hook's environment). */
export interface HandoffDetails {
  migrationId: string;
  pid: number;
  from: string;
  to: string;
}

export interface AddressHandoffOptions {
  /** Addresses this host may give away or take over (TERN_SERVICE_ADDRESSES). */
  serviceAddresses: string[];
  /** The device to add them on; default: the one the kernel routes the address through. */
  dev?: string;
  /** A user's script that does the handoff instead of the built-in handler (TERN_ADDRESS_HOOK). */
  hook?: string;
}

/**
 * Address handoff at switchover: the service address leaves the source host (after the freeze, so
 * nothing new connects to the original) and appears on the destination host before the restore
 * (the restored sockets are bound to it), announced with a gratuitous ARP / unsolicited neighbour
 * advertisement so that peers send to the new host at once. On rollback each side does the
 * opposite. The built-in handler uses ip(8) on this host; a hook script replaces it for networks
 * where the address is moved elsewhere (keepalived, BGP, a cloud API): it gets the phase as its
 * argument and TERN_PHASE, TERN_ROLE, TERN_MIGRATION_ID, TERN_PID, TERN_FROM, TERN_TO,
 * TERN_ADDRESSES (comma-separated address/prefix) in its environment, and a non-zero exit fails
 * the step (before the commit point: the migration rolls back).
 */
export class AddressHandoff {
  private readonly addresses: ServiceAddress[];

  constructor(readonly opts: AddressHandoffOptions) {
    this.addresses = opts.serviceAddresses.map(parseServiceAddress);
  }

  get enabled(): boolean {
    return this.addresses.length > 0 || this.opts.hook !== undefined;
  }

  /**
   * The service addresses `pid` serves on that this host holds now: an address counts when one of
   * the process's TCP sockets is bound to it, or when the process listens on a wildcard address.
   */
  async addressesOf(pid: number): Promise<string[]> {
    if (this.addresses.length === 0) return [];
    const sockets = processTcpSockets(pid);
    const here = await hostAddresses();
    const wildcard = sockets.some((s) => s.state === TCP_LISTEN && (s.localAddress === '0.0.0.0' || s.localAddress === '0:0:0:0:0:0:0:0'));
    return this.addresses
      .filter((a) => here.has(canonicalAddress(a.address)))
      .filter((a) => wildcard || sockets.some((s) => s.localAddress === canonicalAddress(a.address)))
      .map(formatServiceAddress);
  }

  /** Takes `addresses` off this host. */
  async release(addresses: string[], role: 'source' | 'destination', details: HandoffDetails): Promise<void> {
    if (this.opts.hook) return await this.runHook('release', role, addresses, details);
    for (const text of addresses) {
      const a = parseServiceAddress(text);
      const dev = this.opts.dev ?? (await hostAddresses()).get(canonicalAddress(a.address));
      if (!dev) continue; // not here any more
      await runCommand('ip', [a.address.includes(':') ? '-6' : '-4', 'addr', 'del', formatServiceAddress(a), 'dev', dev]).catch((err: Error) => {
        if (!/Cannot assign|not found|No such/i.test(err.message)) throw new Error(`releasing ${text}: ${err.message.trim()}`);
      });
    }
  }

  /** Puts `addresses` on this host and announces them. */
  async claim(addresses: string[], role: 'source' | 'destination', details: HandoffDetails): Promise<void> {
    if (this.opts.hook) return await this.runHook('claim', role, addresses, details);
    for (const text of addresses) {
      const a = parseServiceAddress(text);
      const v6 = a.address.includes(':');
      const dev = this.opts.dev ?? (await routeDevice(a.address));
      if (!dev) throw new Error(`claiming ${text}: no device routes to it on this host (set the agent's addressDev)`);
      await runCommand('ip', v6 ? ['-6', 'addr', 'add', formatServiceAddress(a), 'dev', dev, 'nodad'] : ['-4', 'addr', 'add', formatServiceAddress(a), 'dev', dev]).catch((err: Error) => {
        if (!/File exists/.test(err.message)) throw new Error(`claiming ${text}: ${err.message.trim()}`);
      });
      announce(a.address, dev);
    }
  }

  private async runHook(phase: 'release' | 'claim', role: 'source' | 'destination', addresses: string[], details: HandoffDetails): Promise<void> {
    try {
      await runCommand(this.opts.hook!, [phase], {
        env: {
          ...process.env,
          TERN_PHASE: phase,
          TERN_ROLE: role,
          TERN_MIGRATION_ID: details.migrationId,
          TERN_PID: String(details.pid),
          TERN_FROM: details.from,
          TERN_TO: details.to,
          TERN_ADDRESSES: addresses.join(','),
        },
        timeoutMs: 30_000,
      });
    } catch (err) {
      const e = err as Error & { stderr?: string; code?: number | string };
      throw new Error(`address hook ${this.opts.hook} ${phase} failed (${e.code ?? 'error'}): ${(e.stderr ?? e.message).trim().slice(0, 500)}`);
    }
  }
}

/** Every address configured on this host (network namespace). */
/** Every address configured on this host (network namespace), canonical, → its device. */
async function hostAddresses(): Promise<Map<string, string>> {
  const { stdout } = await runCommand('ip', ['-j', 'addr', 'show']);
  const out = new Map<string, string>();
  for (const link of JSON.parse(stdout) as { ifname: string; addr_info?: { local?: string }[] }[]) {
    for (const a of link.addr_info ?? []) if (a.local) out.set(canonicalAddress(a.local), link.ifname);
  }
  return out;
}

/** The device this host would send to `address` through (its subnet's interface). */
async function routeDevice(address: string): Promise<string | null> {
  try {
    const { stdout } = await runCommand('ip', ['-j', 'route', 'get', address]);
    const dev = (JSON.parse(stdout) as { dev?: string }[])[0]?.dev;
    return dev && dev !== 'lo' ? dev : null;
  } catch {
    return null;
  }
}

/**
 * Tells the link the address moved: gratuitous ARP, in both the request and the reply form (peers
 * differ in which they honour), or an unsolicited neighbour advertisement. arping sends at once but
 * then waits a second for answers, so the announcement is not awaited: the switchover does not
 * wait for it. Best effort: a peer that misses it re-resolves when its entry goes stale.
 */
export function announce(address: string, dev: string): void {
  const run = (cmd: string, args: string[]) => void runCommand(cmd, args).catch(() => {});
  if (address.includes(':')) return run('ndisc6', ['-q', address, dev]);
  run('arping', ['-q', '-U', '-c', '1', '-I', dev, address]);
  run('arping', ['-q', '-A', '-c', '1', '-I', dev, address]);
}
