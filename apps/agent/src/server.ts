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
  // Empty throttle cgroups a dead agent left (one still holding a process is left to its owner).
  await sweepThrottleCgroups().catch(() => {});
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
