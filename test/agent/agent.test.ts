// The agent's control API through fastify's inject(): authentication, schema validation, and a real
// check of a process this test started.
import t from 'tap';
import { spawn } from 'node:child_process';
import { buildAgentApp } from '@tern/agent';

const token = 'test-cluster-token-0123456789';
const auth = { authorization: `Bearer ${token}` };

t.test('agent control API', async (t) => {
  const { app } = buildAgentApp({ name: 'hostT', listen: '127.0.0.1', port: 0, clusterToken: token });
  t.teardown(() => app.close());

  const health = await app.inject({ method: 'GET', url: '/healthz' });
  t.equal(health.statusCode, 200, '/healthz needs no token');
  t.same(health.json(), { ok: true, name: 'hostT' });

  const missing = await app.inject({ method: 'GET', url: '/v1/kernel' });
  t.equal(missing.statusCode, 401, 'no token → 401');
  t.match(missing.json().message, /missing Authorization/);

  const wrong = await app.inject({ method: 'GET', url: '/v1/kernel', headers: { authorization: 'Bearer nope' } });
  t.equal(wrong.statusCode, 401, 'wrong token → 401');
  t.match(wrong.json().message, /wrong cluster token/);

  const malformed = await app.inject({ method: 'GET', url: '/v1/kernel', headers: { authorization: 'Basic abc' } });
  t.equal(malformed.statusCode, 401, 'not a bearer header → 401');

  const kernel = await app.inject({ method: 'GET', url: '/v1/kernel', headers: auth });
  t.equal(kernel.statusCode, 200);
  t.type(kernel.json().kernelRelease, 'string');

  const badPid = await app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid: 'abc' } });
  t.equal(badPid.statusCode, 400, 'schema error → 400');
  t.match(badPid.json().message, /pid/, 'the message names the field');

  const extra = await app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid: 5, x: 1 } });
  t.equal(extra.statusCode, 400, 'unknown fields are refused');

  const gone = await app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid: 4000000 } });
  t.equal(gone.statusCode, 422, 'no such process → 422 with the engine reason');
  t.match(gone.json().message, /4000000/);

  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  const check = await app.inject({ method: 'POST', url: '/v1/check', headers: auth, payload: { pid: child.pid } });
  t.equal(check.statusCode, 200);
  const body = check.json();
  t.equal(body.report.movable, true, 'sleep is movable');
  t.equal(body.inventory.pid, child.pid);

  const metrics = await app.inject({ method: 'GET', url: '/metrics', headers: auth });
  t.equal(metrics.statusCode, 200);
  t.match(metrics.body, /tern_agent_engine_operations_total\{operation="check",outcome="movable"\} 1/);
});
