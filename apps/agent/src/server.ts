#!/usr/bin/env node
/** `tern-agent --config FILE`: builds the agent app and listens. */
import { parseArgs } from 'node:util';
import { buildAgentApp } from './app.js';
import { loadAgentConfig } from './config.js';

const { values } = parseArgs({ options: { config: { type: 'string' } } });
try {
  const config = loadAgentConfig(values.config);
  const { app } = buildAgentApp(config, { logger: true });
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
