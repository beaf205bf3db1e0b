#!/usr/bin/env node
/** `tern-agent --config FILE`: builds the agent app and listens. */
import { parseArgs } from 'node:util';
import { buildAgentApp } from './app.js';
import { loadAgentConfig } from './config.js';
import { sweepLockTables } from './network.js';
import { sweepThrottleCgroups } from './throttle.js';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
try {
  const config = loadAgentConfig(values.config);
  const { app } = buildAgentApp(config, { logger: true });
  // A lock table left by an agent that died would keep a process's connections black-holed.
  const swept = await sweepLockTables().catch((err: Error) => {
    app.log.warn(`could not sweep leftover nftables lock tables: ${err.message}`);
    return [];
  });
  if (swept.length) app.log.warn(`removed lock tables left by a dead agent: ${swept.join(', ')}`);
  // Throttle cgroups a dead agent left: a process still in one would stay CPU-throttled for good.
  // No migration is active in an agent that is just starting, and the processes it can see are
  // this host's (a cgroup holding only other pid namespaces' processes looks empty and stays), so
  // each is moved back to the cgroup it came from and the directory removed.
  const throttles = await sweepThrottleCgroups({ isActive: () => false }).catch(() => null);
  if (throttles?.removed.length) app.log.warn(`gave back the CPU of processes a dead agent left throttled: ${throttles.removed.join(', ')}`);
  const close = () => {
    void app.close().then(() => process.exit(0));
  };
  process.once('SIGINT', close);
  process.once('SIGTERM', close);
  await app.listen({ host: config.listen, port: config.port });
} catch (err) {
  process.stderr.write(`tern-agent: ${(err as Error).message}\n`);
  process.exit(2);
}
