#!/usr/bin/env node
/** `tern-coordinator --config FILE`: builds the coordinator app (recovering interrupted migrations) and listens. */
import { parseArgs } from 'node:util';
import { buildCoordinatorApp } from './app.js';
import { loadCoordinatorConfig } from './config.js';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
try {
  const config = loadCoordinatorConfig(values.config);
  const { app } = buildCoordinatorApp(config, { logger: true });
  const close = () => {
    void app.close().then(() => process.exit(0));
  };
  process.once('SIGINT', close);
  process.once('SIGTERM', close);
  await app.listen({ host: config.listen, port: config.port });
} catch (err) {
  process.stderr.write(`tern-coordinator: ${(err as Error).message}\n`);
  process.exit(2);
}
