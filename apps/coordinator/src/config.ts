/**
 * Coordinator configuration: a JSON file named by `tern-coordinator --config FILE`, overridable by
 * environment (for systemd's environment file):
 *
 *   {
 *     "listen": "127.0.0.1", "port": 7080,              TERN_COORDINATOR_LISTEN, TERN_COORDINATOR_PORT
 *     "clusterToken": "…",                               TERN_CLUSTER_TOKEN   (what the agents expect)
 *     "apiToken": "…",                                   TERN_API_TOKEN       (what API clients send; default: clusterToken)
 *     "database": "/var/lib/tern/coordinator.db",        TERN_COORDINATOR_DB
 *     "hosts": { "hostA": "http://10.0.0.11:7070", … }   (also an array of { name, url })
 *   }
 */
import { readFileSync } from 'node:fs';
import type { HostRecord } from '@tern/protocol';

export interface CoordinatorConfig {
  listen: string;
  port: number;
  clusterToken: string;
  apiToken: string;
  database: string;
  hosts: HostRecord[];
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

export const DEFAULT_DATABASE = '/var/lib/tern/coordinator.db';

/** Hosts as a { name: url } map or a [{ name, url }] list. */
export function parseHosts(raw: unknown, where: string): HostRecord[] {
  if (raw === undefined || raw === null) return [];
  const list: unknown[] = Array.isArray(raw)
    ? raw
    : typeof raw === 'object'
      ? Object.entries(raw as Record<string, unknown>).map(([name, url]) => ({ name, url }))
      : [null];
  return list.map((h) => {
    const { name, url } = (h ?? {}) as { name?: unknown; url?: unknown };
    if (typeof name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(name)) throw new ConfigError(`${where}: host name ${JSON.stringify(name)} is not valid`);
    if (typeof url !== 'string' || !/^https?:\/\/[^\s/]+/.test(url)) throw new ConfigError(`${where}: host ${name} needs an http(s) URL, got ${JSON.stringify(url)}`);
    return { name, url };
  });
}

export function loadCoordinatorConfig(file: string | undefined, env: NodeJS.ProcessEnv = process.env): CoordinatorConfig {
  let raw: Record<string, unknown> = {};
  if (file) {
    try {
      raw = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new ConfigError(`cannot read coordinator config ${file}: ${(err as Error).message}`);
    }
  }
  const clusterToken = env.TERN_CLUSTER_TOKEN ?? raw.clusterToken;
  if (typeof clusterToken !== 'string' || clusterToken.length < 16) {
    throw new ConfigError('clusterToken (or TERN_CLUSTER_TOKEN) must be set to at least 16 characters');
  }
  const apiToken = env.TERN_API_TOKEN ?? raw.apiToken ?? clusterToken;
  if (typeof apiToken !== 'string' || apiToken.length < 16) throw new ConfigError('apiToken (or TERN_API_TOKEN) must be at least 16 characters');
  const port = Number(env.TERN_COORDINATOR_PORT ?? raw.port ?? 7080);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new ConfigError(`port ${String(port)} is not a TCP port`);
  const listen = env.TERN_COORDINATOR_LISTEN ?? raw.listen ?? '127.0.0.1';
  const database = env.TERN_COORDINATOR_DB ?? raw.database ?? DEFAULT_DATABASE;
  if (typeof listen !== 'string' || typeof database !== 'string') throw new ConfigError('listen and database must be strings');
  return { listen, port, clusterToken, apiToken, database, hosts: parseHosts(raw.hosts, file ?? 'config') };
}
