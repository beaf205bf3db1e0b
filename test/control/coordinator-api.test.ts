// Every route of the coordinator's API through inject(): token, schema errors naming the field,
// unknown ids, the second migration of a pid (409), hosts, OpenAPI, metrics.
import t from 'tap';
import { join } from 'node:path';
import { auth, coordinatorOn, fakeAgent, tempDir, waitFor } from './helpers.js';

t.test('coordinator API', async (t) => {
  const a = await fakeAgent(t, 'hostA', { delay: { source: 400 } });
  const b = await fakeAgent(t, 'hostB');
  const { app, coordinator } = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host]);
  await app.ready();
  const inject = (method: 'GET' | 'POST' | 'PUT', url: string, payload?: object, headers: Record<string, string> = auth) =>
    app.inject({ method, url, headers, ...(payload && { payload }) });

  await t.test('token on everything but /healthz and /openapi.json', async (t) => {
    t.equal((await app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200);
    t.equal((await app.inject({ method: 'GET', url: '/openapi.json' })).statusCode, 200);
    for (const [method, url, payload] of [
      ['GET', '/hosts'],
      ['PUT', '/hosts/hostC', { url: 'http://127.0.0.1:1' }],
      ['GET', '/migrations'],
      ['POST', '/migrations', { from: 'hostA', to: 'hostB', pid: 5 }],
      ['GET', '/migrations/m1'],
      ['POST', '/migrations/m1/abort'],
      ['GET', '/migrations/m1/events'],
      ['GET', '/events'],
      ['GET', '/metrics'],
    ] as const) {
      const none = await inject(method, url, payload, {});
      t.equal(none.statusCode, 401, `${method} ${url} without a token`);
      t.match(none.json().message, /missing Authorization/);
      const wrong = await inject(method, url, payload, { authorization: 'Bearer wrong-token-wrong-token' });
      t.equal(wrong.statusCode, 401, `${method} ${url} with a wrong token`);
    }
  });

  await t.test('schema errors name the field', async (t) => {
    for (const [payload, field] of [
      [{ from: 'hostA', to: 'hostB' }, /pid/],
      [{ from: 'hostA', to: 'hostB', pid: 'x' }, /pid/],
      [{ from: 'hostA', to: 'hostB', pid: 5, mode: 'teleport' }, /mode/],
      [{ from: 'hostA', to: 'hostB', pid: 5, maxDowntimeMs: -1 }, /maxDowntimeMs/],
      [{ from: 'hostA', to: 'hostB', pid: 5, bandwidth: 0 }, /bandwidth/],
      [{ from: 'host A', to: 'hostB', pid: 5 }, /from/],
      [{ from: 'hostA', to: 'hostB', pid: 5, extra: 1 }, /additional/],
    ] as const) {
      const r = await inject('POST', '/migrations', payload);
      t.equal(r.statusCode, 400, JSON.stringify(payload));
      t.match(r.json().message, field, r.json().message);
    }
    const badHost = await inject('PUT', '/hosts/hostC', { url: 'ftp://x' });
    t.equal(badHost.statusCode, 400);
    t.match(badHost.json().message, /url/);
    t.equal((await inject('GET', '/migrations?limit=abc')).statusCode, 400);
    t.equal((await inject('GET', '/migrations?state=sleeping')).statusCode, 400);
  });

  await t.test('refusals: unknown or equal hosts', async (t) => {
    t.match((await inject('POST', '/migrations', { from: 'hostA', to: 'hostZ', pid: 5 })).json(), { error: 'unknown-host', message: /hostZ/ });
    t.equal((await inject('POST', '/migrations', { from: 'hostA', to: 'hostA', pid: 5 })).statusCode, 400);
  });

  await t.test('unknown ids answer 404', async (t) => {
    for (const [method, url] of [
      ['GET', '/migrations/mnope'],
      ['POST', '/migrations/mnope/abort'],
      ['GET', '/migrations/mnope/events'],
    ] as const) {
      const r = await inject(method, url);
      t.equal(r.statusCode, 404, `${method} ${url}`);
      t.equal(r.json().error, 'not-found');
    }
  });

  await t.test('hosts: list, register, move', async (t) => {
    t.same((await inject('GET', '/hosts')).json().hosts.map((h: { name: string }) => h.name), ['hostA', 'hostB']);
    const created = await inject('PUT', '/hosts/hostC', { url: 'http://127.0.0.1:1' });
    t.equal(created.statusCode, 201);
    const moved = await inject('PUT', '/hosts/hostC', { url: 'http://127.0.0.1:2' });
    t.equal(moved.statusCode, 200);
    t.same(moved.json(), { name: 'hostC', url: 'http://127.0.0.1:2' });
  });

  await t.test('one migration per pid at a time: the second gets 409', async (t) => {
    const first = await inject('POST', '/migrations', { from: 'hostA', to: 'hostB', pid: 777, mode: 'cold' });
    t.equal(first.statusCode, 201);
    t.match(first.json(), { state: 'checking', pid: 777, mode: 'cold', committed: false });
    const second = await inject('POST', '/migrations', { from: 'hostA', to: 'hostB', pid: 777, mode: 'cold' });
    t.equal(second.statusCode, 409);
    t.match(second.json().message, new RegExp(first.json().id));
    const reverse = await inject('POST', '/migrations', { from: 'hostB', to: 'hostC', pid: 777 });
    t.equal(reverse.statusCode, 409, 'nor to move the pid its destination is about to take');
    const other = await inject('POST', '/migrations', { from: 'hostA', to: 'hostB', pid: 778, mode: 'cold' });
    t.equal(other.statusCode, 201, 'another pid is fine');
    await coordinator.idle();
    t.equal((await inject('GET', `/migrations/${first.json().id}`)).json().state, 'done');
    const again = await inject('POST', '/migrations', { from: 'hostA', to: 'hostB', pid: 777, mode: 'cold' });
    t.equal(again.statusCode, 201, 'after the first finished, the pid can move again');
    await coordinator.idle();
    const list = await inject('GET', '/migrations?limit=2');
    t.equal(list.json().migrations.length, 2);
    t.equal(list.json().migrations[0].id, again.json().id, 'newest first');
    t.equal((await inject('GET', '/migrations?state=done')).json().migrations.length, 3);
    const events = await inject('GET', `/migrations/${first.json().id}/events`);
    t.same(
      events.json().filter((e: { type: string }) => e.type === 'phase').map((e: { state: string }) => e.state),
      ['checking', 'precopy', 'switchover', 'restoring', 'postcopy'],
    );
    const finished = await inject('POST', `/migrations/${first.json().id}/abort`);
    t.equal(finished.statusCode, 409, 'a finished migration cannot be aborted');
    t.equal(finished.json().error, 'finished');
  });

  await t.test('OpenAPI document covers the routes', async (t) => {
    const doc = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    t.equal(doc.openapi, '3.0.3');
    for (const p of ['/migrations', '/migrations/{id}', '/migrations/{id}/abort', '/migrations/{id}/events', '/hosts', '/hosts/{name}', '/events']) {
      t.ok(doc.paths[p], p);
    }
    t.ok(doc.paths['/migrations'].post.requestBody.content['application/json'].schema.properties.pid, 'request schema included');
    t.same(doc.components.securitySchemes.bearer, { type: 'http', scheme: 'bearer' });
  });

  await t.test('metrics', async (t) => {
    const text = (await inject('GET', '/metrics')).body;
    t.match(text, /tern_migrations_total\{mode="cold",result="done"\} 3/);
    t.match(text, /tern_migration_downtime_seconds_count\{mode="cold"\} 3/);
    t.match(text, /tern_migration_transferred_bytes_sum\{mode="cold"\} 123000/);
    t.match(text, /tern_migrations_in_progress 0/);
    await waitFor('all settled', () => coordinator.list().every((r) => ['done', 'failed', 'aborted'].includes(r.state)));
  });
});
