// A real Prometheus (Debian package) scrapes a coordinator and an agent on loopback with the bearer
// token, loads deploy/prometheus/tern-rules.yml, and answers every expression of the rules and of the
// Grafana dashboard with a valid result after a migration and a check. promtool checks the deploy
// files. Prometheus runs on a free loopback port with a temp config and storage, for a bounded time.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { repoRoot } from '../e2e/helpers.js';
import { auth, coordinatorOn, fakeAgent, realAgent, tempDir, token, waitFor } from './helpers.js';

const deploy = join(repoRoot, 'deploy');
const rulesFile = join(deploy, 'prometheus', 'tern-rules.yml');
const dashboard = JSON.parse(readFileSync(join(deploy, 'grafana', 'tern-dashboard.json'), 'utf8')) as {
  templating: { list: { name: string; type: string }[] };
  panels: { title: string; datasource: { uid: string }; targets: { expr: string }[] }[];
};

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as AddressInfo;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/** Every `expr:` of the rules file, with whether it belongs to an alert (alerts may well be empty). */
function ruleExpressions(): { name: string; expr: string; alert: boolean }[] {
  const out: { name: string; expr: string; alert: boolean }[] = [];
  const lines = readFileSync(rulesFile, 'utf8').split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^\s+- (record|alert): (\S+)/.exec(lines[i]!);
    if (!m) continue;
    const exprLine = lines[i + 1]!;
    let expr = exprLine.replace(/^\s+expr:\s*/, '');
    if (expr === '|') {
      const block: string[] = [];
      for (let j = i + 2; j < lines.length && /^\s{10}/.test(lines[j]!); j++) block.push(lines[j]!.trim());
      expr = block.join(' ');
    }
    out.push({ name: m[2]!, expr, alert: m[1] === 'alert' });
  }
  return out;
}

t.test('promtool: the deploy config and rules are clean', async (t) => {
  const rules = spawnSync('promtool', ['check', 'rules', rulesFile], { encoding: 'utf8' });
  t.equal(rules.status, 0, rules.stdout + rules.stderr);
  t.match(rules.stdout, /SUCCESS: 17 rules found/);
  // The full check also opens the token files the config names: point them at temp ones.
  const dir = tempDir(t);
  writeFileSync(join(dir, 'token'), token);
  copyFileSync(rulesFile, join(dir, 'tern-rules.yml'));
  const config = readFileSync(join(deploy, 'prometheus', 'prometheus.yml'), 'utf8').replace(/\/etc\/prometheus\/tern-[a-z-]+-token/g, join(dir, 'token'));
  writeFileSync(join(dir, 'prometheus.yml'), config);
  const check = spawnSync('promtool', ['check', 'config', join(dir, 'prometheus.yml')], { encoding: 'utf8' });
  t.equal(check.status, 0, check.stdout + check.stderr);
});

t.test('the dashboard has a datasource variable and every panel uses it', async (t) => {
  t.ok(dashboard.templating.list.some((v) => v.name === 'datasource' && v.type === 'datasource'));
  for (const p of dashboard.panels) t.equal(p.datasource.uid, '${datasource}', p.title);
  const titles = dashboard.panels.map((p) => p.title).join('|');
  for (const want of ['Downtime distribution', 'Downtime p50 / p99', 'Migrations by result', 'Bytes per migration', 'rounds', 'fault latency']) t.match(titles, new RegExp(want, 'i'));
});

t.test('a real Prometheus scrapes coordinator and agent; every expression answers', async (t) => {
  const dir = tempDir(t, 'tern-prom-');
  // Targets: a real agent (one real check) and a coordinator that ran one migration through scripted
  // agents (so every migration series has an observation).
  const agent = await realAgent(t, 'hostA');
  const child = spawn('sleep', ['120'], { stdio: 'ignore' });
  t.teardown(() => child.kill('SIGKILL'));
  const check = await agent.app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid: child.pid } });
  t.equal(check.statusCode, 200);
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB');
  const c = coordinatorOn(t, join(dir, 'c.db'), [a.host, b.host], { listen: true });
  const coordinatorUrl = await c.listening;
  t.equal((await c.coordinator.settled(c.coordinator.create({ from: 'hostA', to: 'hostB', pid: 42 }).id)).state, 'done');

  writeFileSync(join(dir, 'token'), token, { mode: 0o600 });
  copyFileSync(rulesFile, join(dir, 'tern-rules.yml'));
  const hostPort = (u: string) => new URL(u).host;
  writeFileSync(
    join(dir, 'prometheus.yml'),
    `global: { scrape_interval: 1s, evaluation_interval: 1s }
rule_files: [tern-rules.yml]
scrape_configs:
  - job_name: tern-coordinator
    authorization: { type: Bearer, credentials_file: ${join(dir, 'token')} }
    static_configs: [{ targets: ['${hostPort(coordinatorUrl)}'] }]
  - job_name: tern-agent
    authorization: { type: Bearer, credentials_file: ${join(dir, 'token')} }
    static_configs: [{ targets: ['${hostPort(agent.url)}'] }]
`,
  );
  const port = await freePort();
  const prom = spawn('prometheus', [
    `--config.file=${join(dir, 'prometheus.yml')}`,
    `--storage.tsdb.path=${join(dir, 'data')}`,
    `--web.listen-address=127.0.0.1:${port}`,
    '--log.level=warn',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  prom.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  // Bounded in time whatever happens; killed by its pid at teardown.
  const limit = setTimeout(() => prom.pid && process.kill(prom.pid, 'SIGKILL'), 120_000);
  t.teardown(() => {
    clearTimeout(limit);
    if (prom.pid && prom.exitCode === null) process.kill(prom.pid, 'SIGKILL');
  });
  const api = async (path: string) => {
    const r = await fetch(`http://127.0.0.1:${port}${path}`);
    return (await r.json()) as { status: string; data: any; error?: string };
  };
  const query = (expr: string) => api(`/api/v1/query?query=${encodeURIComponent(expr)}`);

  await waitFor(
    `both targets up (prometheus: ${log})`,
    async () => {
      try {
        const targets = (await api('/api/v1/targets')).data.activeTargets as { health: string; labels: { job: string } }[];
        return targets.length === 2 && targets.every((x) => x.health === 'up');
      } catch {
        return false;
      }
    },
    60_000,
  );
  // Enough scrapes for rate() over the dashboard's interval.
  await waitFor('6 samples of up', async () => {
    const r = await query('count_over_time(up{job="tern-agent"}[1m])');
    return Number(r.data?.result?.[0]?.value?.[1] ?? 0) >= 6;
  }, 60_000);

  const total = await query('sum(tern_migrations_total{result="done"})');
  t.equal(total.data.result[0]?.value[1], '1', 'the coordinator\'s migration is there');
  const checks = await query('tern_agent_engine_operations_total{operation="check"}');
  t.equal(checks.data.result[0]?.value[1], '1', 'the agent\'s check is there');

  for (const r of ruleExpressions()) {
    const res = await query(r.expr);
    t.equal(res.status, 'success', `rule ${r.name}: ${res.error ?? ''}`);
    if (!r.alert) t.ok(res.data.result.length > 0, `rule ${r.name} returns data`);
  }
  const groups = (await api('/api/v1/rules')).data.groups as { rules: { name: string; health: string; lastError?: string }[] }[];
  const loaded = groups.flatMap((g) => g.rules);
  t.equal(loaded.length, 17, 'Prometheus loaded every rule');
  await waitFor('every rule evaluated', async () => {
    const gs = (await api('/api/v1/rules')).data.groups as { rules: { health: string }[] }[];
    return gs.flatMap((g) => g.rules).every((x) => x.health === 'ok');
  }, 30_000);

  for (const p of dashboard.panels) {
    for (const target of p.targets) {
      const expr = target.expr.replaceAll('$__rate_interval', '1m').replaceAll('$mode', '.*');
      const res = await query(expr);
      t.equal(res.status, 'success', `${p.title}: ${expr} ${res.error ?? ''}`);
      t.ok(res.data.result.length > 0, `${p.title}: ${target.expr} returns data`);
    }
  }
  const p99 = await query('histogram_quantile(0.99, sum by (le) (tern_migration_downtime_seconds_bucket))');
  t.ok(Number(p99.data.result[0].value[1]) > 0, 'the downtime histogram holds the migration');
});
