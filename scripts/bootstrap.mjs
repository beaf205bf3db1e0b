#!/usr/bin/env node
// Bootstrap: the one entry point behind `npm test`, `npm run demo`, `npm run bench` and `npm run build`.
//
// It brings a fresh clone to a runnable state using only Node built-ins, doing each step only when
// it is missing or stale, then runs the requested command:
//   1. Debian packages the tests and demo need (only as root; apt-get update once, then install).
//   2. npm dependencies (`npm ci` when node_modules is missing or older than package-lock.json).
//   3. The Rust workspace in release mode; the Neon addon copied to packages/native/index.node with
//      @neon-rs/cli (`neon dist`), reading cargo's JSON messages to find the cdylib.
//   4. The C workloads under test/workloads (make).
//   5. The TypeScript project references (`tsc -b`).
//
// Usage: node scripts/bootstrap.mjs setup|build|test|demo|bench [args passed on to the command]

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** Debian packages the engine's tests, the lab and the demo use. */
const DEBIAN_PACKAGES = [
  'build-essential', // cc + make for test/workloads and the lab's init
  'iproute2', // ip netns, veth, bridge
  'util-linux', // unshare, nsenter
  'iputils-ping',
  'iputils-arping', // gratuitous ARP when the service address moves
  'nftables',
  'procps',
  'python3',
  'redis-server',
  'redis-tools', // redis-cli, redis-benchmark
  'memcached',
  'prometheus', // promtool and a real Prometheus for the metrics tests (test/control/prometheus.test.ts)
];

function log(msg) {
  process.stderr.write(`[bootstrap] ${msg}\n`);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root, ...opts });
  if (r.error) throw new Error(`${cmd} could not start: ${r.error.message}`);
  if (r.status !== 0) {
    const why = r.signal ? `signal ${r.signal}` : `exit code ${r.status}`;
    throw new Error(`${cmd} ${args.join(' ')} failed with ${why}`);
  }
}

function missingDebianPackages() {
  return DEBIAN_PACKAGES.filter((pkg) => {
    const r = spawnSync('dpkg-query', ['-W', '-f=${Status}', pkg], { encoding: 'utf8' });
    return r.status !== 0 || !r.stdout.includes('install ok installed');
  });
}

function ensureDebianPackages() {
  const missing = missingDebianPackages();
  if (missing.length === 0) return;
  if (process.getuid?.() !== 0) {
    log(`not root: cannot install ${missing.join(' ')}; tests that need them will fail`);
    return;
  }
  log(`installing Debian packages: ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  run('apt-get', ['update', '-qq'], { env });
  run('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], { env });
}

function mtime(path) {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return 0;
  }
}

/** True if PREFIX/include/node has the headers of exactly this Node version. */
function nodeHeadersMatch(prefix) {
  try {
    const h = readFileSync(join(prefix, 'include', 'node', 'node_version.h'), 'utf8');
    const v = ['MAJOR', 'MINOR', 'PATCH'].map((k) => new RegExp(`#define NODE_${k}_VERSION (\\d+)`).exec(h)?.[1]);
    return `v${v.join('.')}` === process.version;
  } catch {
    return false;
  }
}

function ensureNodeModules() {
  const marker = join(root, 'node_modules', '.package-lock.json');
  if (mtime(marker) >= mtime(join(root, 'package-lock.json')) && existsSync(marker)) return;
  log('installing npm dependencies (npm ci)');
  // better-sqlite3 builds from source (its prebuilt binaries are not reachable here): point node-gyp
  // at the headers of the Node we run when they are installed, instead of downloading them.
  const env = { ...process.env };
  if (!env.npm_config_nodedir && nodeHeadersMatch('/usr')) env.npm_config_nodedir = '/usr';
  run('npm', ['ci', '--no-audit', '--no-fund'], { env });
}

function buildRust() {
  log('building the Rust workspace (release)');
  mkdirSync(join(root, 'target'), { recursive: true });
  const messages = join(root, 'target', 'cargo-messages.json');
  const out = openSync(messages, 'w');
  try {
    run('cargo', ['build', '--release', '--workspace', '--message-format=json-render-diagnostics'], {
      stdio: ['ignore', out, 'inherit'],
    });
  } finally {
    closeSync(out);
  }
  // `neon dist -d` writes ./index.node in its working directory: the native package's folder.
  run(join(root, 'node_modules', '.bin', 'neon'), ['dist', '-n', 'tern-node', '-l', messages, '-d'], {
    cwd: join(root, 'packages', 'native'),
  });
}

function buildWorkloads() {
  if (!existsSync(join(root, 'test', 'workloads', 'Makefile'))) return;
  log('building C workloads');
  run('make', ['-s', '-C', join(root, 'test', 'workloads')]);
}

function buildTypeScript() {
  log('building TypeScript (tsc -b)');
  run(join(root, 'node_modules', '.bin', 'tsc'), ['-b']);
  // The workspace bins (migrate, tern-agent, tern-coordinator) point into dist/, which `npm ci` did
  // not have yet: link them now and make them executable (no install script runs again).
  run('npm', ['rebuild', '--ignore-scripts', '--no-audit', '--no-fund'], { stdio: ['ignore', 'ignore', 'inherit'] });
}

function setup() {
  ensureDebianPackages();
  ensureNodeModules();
  buildRust();
  buildWorkloads();
  buildTypeScript();
}

const [command = 'setup', ...rest] = process.argv.slice(2);
try {
  switch (command) {
    case 'setup':
    case 'build':
      setup();
      break;
    case 'test':
      setup();
      log('running cargo test');
      run('cargo', ['test', '--release', '--workspace', ...(process.env.CARGO_TEST_ARGS?.split(' ') ?? [])]);
      log('running tap');
      run(join(root, 'node_modules', '.bin', 'tap'), rest);
      if (rest.length === 0) run(process.execPath, [join(root, 'scripts', 'coverage-gate.mjs')]);
      break;
    case 'demo':
      setup();
      run(process.execPath, [join(root, 'apps', 'cli', 'dist', 'demo.js'), ...rest]);
      break;
    case 'bench':
      setup();
      run(process.execPath, [join(root, 'test', 'bench', 'run.mjs'), ...rest]);
      break;
    default:
      throw new Error(`unknown command '${command}' (setup, build, test, demo, bench)`);
  }
} catch (err) {
  log(err instanceof Error ? err.message : String(err));
  process.exit(1);
}
