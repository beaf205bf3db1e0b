// Agent configuration: file plus environment overrides, and clear refusals.
import t from 'tap';
import { loadAgentConfig } from '@tern/agent';

t.test('agent config', async (t) => {
  const dir = t.testdir({
    'ok.json': JSON.stringify({ name: 'hostA', port: 7071, clusterToken: 'a-cluster-token-of-length' }),
    'bad.json': '{ not json',
    'short.json': JSON.stringify({ clusterToken: 'short' }),
    'port.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', port: 70000 }),
  });
  t.same(loadAgentConfig(`${dir}/ok.json`, {}), { name: 'hostA', listen: '127.0.0.1', port: 7071, clusterToken: 'a-cluster-token-of-length' });
  t.same(
    loadAgentConfig(`${dir}/ok.json`, { TERN_AGENT_PORT: '9000', TERN_AGENT_LISTEN: '0.0.0.0', TERN_AGENT_NAME: 'hostB' }),
    { name: 'hostB', listen: '0.0.0.0', port: 9000, clusterToken: 'a-cluster-token-of-length' },
    'environment overrides the file',
  );
  t.throws(() => loadAgentConfig(`${dir}/bad.json`, {}), /cannot read agent config/);
  t.throws(() => loadAgentConfig(`${dir}/missing.json`, {}), /cannot read agent config/);
  t.throws(() => loadAgentConfig(`${dir}/short.json`, {}), /at least 16 characters/);
  t.throws(() => loadAgentConfig(undefined, {}), /clusterToken/);
  t.throws(() => loadAgentConfig(`${dir}/port.json`, {}), /not a TCP port/);
});
