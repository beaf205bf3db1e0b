export { buildAgentApp, HttpError, type AgentApp, type AgentAppOptions } from './app.js';
export { loadAgentConfig, type AgentConfig, ConfigError } from './config.js';
export {
  missingNativeFunctions,
  nativeMigrationEngine,
  isUnavailable,
  EngineUnavailableError,
  UNAVAILABLE_MESSAGE,
  type MigrationEngine,
  type PageServerHandle,
  type SourceSessionHandle,
} from './engine.js';
export { destinationBlockers } from './readiness.js';
export {
  canonicalAddress,
  lockScript,
  parseServiceAddress,
  restoreGuardScript,
  sweepLockTables,
  ternTables,
  type TcpTuple,
} from './network.js';
export { parseSsQuiet, watchTcpResume } from './tcp-resume.js';
export { CommandSpawner, runCommand, runDirect, sharedCommandSpawner, type CommandError, type RunOptions, type RunResult } from './spawner.js';
export { CpuThrottle, sweepThrottleCgroups } from './throttle.js';
