export * from './codec.js';
export * from './engine.js';
export * from './schemas.js';
export * from './control.js';
export * from './auth.js';
