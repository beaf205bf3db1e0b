export { buildCoordinatorApp, type CoordinatorApp, type CoordinatorAppOptions } from './app.js';
export { Coordinator, CoordinatorError, filesOf, type CoordinatorOptions } from './coordinator.js';
export { MigrationStore } from './store.js';
export { AgentClient, AgentCallError } from './agent-client.js';
export { loadCoordinatorConfig, parseHosts, ConfigError, DEFAULT_DATABASE, type CoordinatorConfig } from './config.js';
