// Coordinator and CLI configuration: file plus environment, hosts as a map or a list, clear refusals.
import t from 'tap';
import { loadCoordinatorConfig, parseHosts, DEFAULT_DATABASE } from '@tern/coordinator';

t.test('coordinator config', async (t) => {
  const tok = 'a-cluster-token-of-length';
  const dir = t.testdir({
    'ok.json': JSON.stringify({ port: 7081, clusterToken: tok, hosts: { hostA: 'http://10.0.0.11:7070' } }),
    'list.json': JSON.stringify({ clusterToken: tok, hosts: [{ name: 'hostB', url: 'https://b.example:7070' }], database: '/tmp/x.db', apiToken: 'an-api-token-of-length' }),
    'bad.json': '{',
    'badhost.json': JSON.stringify({ clusterToken: tok, hosts: { 'host A': 'http://x' } }),
    'badurl.json': JSON.stringify({ clusterToken: tok, hosts: { hostA: 'ftp://x' } }),
    'port.json': JSON.stringify({ clusterToken: tok, port: 70000 }),
  });
  t.same(loadCoordinatorConfig(`${dir}/ok.json`, {}), {
    listen: '127.0.0.1',
    port: 7081,
    clusterToken: tok,
    apiToken: tok,
    database: DEFAULT_DATABASE,
    hosts: [{ name: 'hostA', url: 'http://10.0.0.11:7070' }],
  });
  const env = { TERN_COORDINATOR_PORT: '9000', TERN_COORDINATOR_LISTEN: '0.0.0.0', TERN_COORDINATOR_DB: '/tmp/y.db', TERN_API_TOKEN: 'env-api-token-of-length' };
  t.match(loadCoordinatorConfig(`${dir}/list.json`, env), { listen: '0.0.0.0', port: 9000, database: '/tmp/y.db', apiToken: 'env-api-token-of-length', hosts: [{ name: 'hostB' }] });
  t.equal(loadCoordinatorConfig(undefined, { TERN_CLUSTER_TOKEN: tok }).hosts.length, 0, 'environment only, no hosts yet (PUT /hosts)');
  t.throws(() => loadCoordinatorConfig(`${dir}/bad.json`, {}), /cannot read coordinator config/);
  t.throws(() => loadCoordinatorConfig(undefined, {}), /clusterToken/);
  t.throws(() => loadCoordinatorConfig(undefined, { TERN_CLUSTER_TOKEN: tok, TERN_API_TOKEN: 'short' }), /apiToken/);
  t.throws(() => loadCoordinatorConfig(`${dir}/badhost.json`, {}), /host name "host A"/);
  t.throws(() => loadCoordinatorConfig(`${dir}/badurl.json`, {}), /needs an http\(s\) URL/);
  t.throws(() => loadCoordinatorConfig(`${dir}/port.json`, {}), /not a TCP port/);
  t.throws(() => parseHosts(42, 'x'), /host name/);
  t.same(parseHosts(null, 'x'), []);
});
