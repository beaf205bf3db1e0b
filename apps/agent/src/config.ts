/**
 * Agent configuration: a JSON file named by `tern-agent --config FILE`, overridable by environment
 * (TERN_AGENT_NAME, TERN_AGENT_LISTEN, TERN_AGENT_PORT, TERN_AGENT_ADVERTISE, TERN_CLUSTER_TOKEN,
 * TERN_SERVICE_ADDRESSES, TERN_ADDRESS_DEV, TERN_ADDRESS_HOOK, TERN_AGENT_COMMAND_SPAWNER) so
 * systemd's environment file works. TERN_AGENT_COMMAND_SPAWNER=0 (commandSpawner: false) runs the
 * agent's commands straight from the agent instead of through its spawner child (spawner.ts): an
 * escape hatch, and the baseline of test/bench/handoff.bench.mjs.
 */
import { readFileSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { parseServiceAddress } from './network.js';

export interface AgentConfig {
  /** Host name as the coordinator knows it (hostA, ...). */
  name: string;
  listen: string;
  port: number;
  /** Bearer token every control request must carry. */
  clusterToken: string;
  /** Address the page server is reached at when `listen` is a wildcard (TERN_AGENT_ADVERTISE). */
  advertise?: string;
  /**
   * Addresses (address/prefix) that move with the processes serving on them: released here when
   * such a process leaves, added here when one arrives (TERN_SERVICE_ADDRESSES, comma-separated).
   */
  serviceAddresses?: string[];
  /** Device the service addresses are added on; default: the one the kernel routes them through. */
  addressDev?: string;
  /** Absolute path of a script that moves the addresses instead of the built-in handler. */
  addressHook?: string;
  /**
   * Run the agent's commands (ip, nft, arping, ss, hooks) through a small child forked at start
   * (spawner.ts); default true. false: straight from the agent, which forks the whole agent, page
   * store included (TERN_AGENT_COMMAND_SPAWNER=0|1).
   */
  commandSpawner?: boolean;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

export function loadAgentConfig(file: string | undefined, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  let raw: Record<string, unknown> = {};
  if (file) {
    try {
      raw = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new ConfigError(`cannot read agent config ${file}: ${(err as Error).message}`);
    }
  }
  const config = {
    name: env.TERN_AGENT_NAME ?? raw.name ?? 'local',
    listen: env.TERN_AGENT_LISTEN ?? raw.listen ?? '127.0.0.1',
    port: Number(env.TERN_AGENT_PORT ?? raw.port ?? 7070),
    clusterToken: env.TERN_CLUSTER_TOKEN ?? raw.clusterToken,
  };
  const advertise = env.TERN_AGENT_ADVERTISE ?? raw.advertise;
  if (advertise !== undefined) {
    if (typeof advertise !== 'string') throw new ConfigError('advertise must be a string');
    Object.assign(config, { advertise });
  }
  const services = env.TERN_SERVICE_ADDRESSES !== undefined ? env.TERN_SERVICE_ADDRESSES.split(',').filter((x) => x.trim() !== '') : (raw.serviceAddresses ?? []);
  if (!Array.isArray(services) || services.some((x) => typeof x !== 'string')) throw new ConfigError('serviceAddresses must be a list of address/prefix strings');
  for (const a of services as string[]) {
    try {
      parseServiceAddress(a);
    } catch (err) {
      throw new ConfigError(`serviceAddresses: ${(err as Error).message}`);
    }
  }
  Object.assign(config, { serviceAddresses: (services as string[]).map((a) => a.trim()) });
  const dev = env.TERN_ADDRESS_DEV ?? raw.addressDev;
  if (dev !== undefined) {
    if (typeof dev !== 'string' || !/^[A-Za-z0-9_.:@-]{1,15}$/.test(dev)) throw new ConfigError('addressDev must be a network device name');
    Object.assign(config, { addressDev: dev });
  }
  const hook = env.TERN_ADDRESS_HOOK ?? raw.addressHook;
  if (hook !== undefined) {
    if (typeof hook !== 'string' || !isAbsolute(hook)) throw new ConfigError('addressHook must be an absolute path to an executable');
    Object.assign(config, { addressHook: hook });
  }
  const spawnerEnv = env.TERN_AGENT_COMMAND_SPAWNER;
  if (spawnerEnv !== undefined && spawnerEnv !== '0' && spawnerEnv !== '1') throw new ConfigError('TERN_AGENT_COMMAND_SPAWNER must be 0 or 1');
  const commandSpawner = spawnerEnv !== undefined ? spawnerEnv === '1' : raw.commandSpawner;
  if (commandSpawner !== undefined) {
    if (typeof commandSpawner !== 'boolean') throw new ConfigError('commandSpawner must be true or false');
    Object.assign(config, { commandSpawner });
  }
  if (typeof config.clusterToken !== 'string' || config.clusterToken.length < 16) {
    throw new ConfigError('clusterToken (or TERN_CLUSTER_TOKEN) must be set to at least 16 characters');
  }
  if (!Number.isInteger(config.port) || config.port <= 0 || config.port > 65535) {
    throw new ConfigError(`port ${String(config.port)} is not a TCP port`);
  }
  if (typeof config.name !== 'string' || typeof config.listen !== 'string') {
    throw new ConfigError('name and listen must be strings');
  }
  return config as AgentConfig;
}
