export { buildAgentApp, type AgentApp } from './app.js';
export { loadAgentConfig, type AgentConfig, ConfigError } from './config.js';
