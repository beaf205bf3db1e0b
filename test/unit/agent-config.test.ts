// Agent configuration: file plus environment overrides, and clear refusals.
import t from 'tap';
import { loadAgentConfig } from '@tern/agent';

t.test('agent config', async (t) => {
  const dir = t.testdir({
    'ok.json': JSON.stringify({ name: 'hostA', port: 7071, clusterToken: 'a-cluster-token-of-length' }),
    'bad.json': '{ not json',
    'short.json': JSON.stringify({ clusterToken: 'short' }),
    'port.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', port: 70000 }),
    'net.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', serviceAddresses: ['10.77.0.200/32', 'fd00::200'], addressDev: 'eth0', addressHook: '/usr/local/bin/move-vip' }),
    'badaddr.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', serviceAddresses: ['10.77.0.300/32'] }),
    'badhook.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', addressHook: 'relative/script' }),
    'nospawner.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', commandSpawner: false }),
    'badspawner.json': JSON.stringify({ clusterToken: 'a-cluster-token-of-length', commandSpawner: 'no' }),
  });
  t.same(loadAgentConfig(`${dir}/ok.json`, {}), { name: 'hostA', listen: '127.0.0.1', port: 7071, clusterToken: 'a-cluster-token-of-length', serviceAddresses: [] });
  t.same(
    loadAgentConfig(`${dir}/ok.json`, { TERN_AGENT_PORT: '9000', TERN_AGENT_LISTEN: '0.0.0.0', TERN_AGENT_NAME: 'hostB' }),
    { name: 'hostB', listen: '0.0.0.0', port: 9000, clusterToken: 'a-cluster-token-of-length', serviceAddresses: [] },
    'environment overrides the file',
  );
  t.match(loadAgentConfig(`${dir}/net.json`, {}), { serviceAddresses: ['10.77.0.200/32', 'fd00::200'], addressDev: 'eth0', addressHook: '/usr/local/bin/move-vip' }, 'address handoff settings');
  t.same(loadAgentConfig(`${dir}/net.json`, { TERN_SERVICE_ADDRESSES: '192.0.2.1/32, 192.0.2.2' }).serviceAddresses, ['192.0.2.1/32', '192.0.2.2'], 'TERN_SERVICE_ADDRESSES overrides');
  t.throws(() => loadAgentConfig(`${dir}/badaddr.json`, {}), /serviceAddresses: "10\.77\.0\.300\/32" is not an address/);
  t.throws(() => loadAgentConfig(`${dir}/badhook.json`, {}), /addressHook must be an absolute path/);
  t.throws(() => loadAgentConfig(`${dir}/ok.json`, { TERN_ADDRESS_DEV: 'not a device!' }), /addressDev must be a network device name/);
  t.equal(loadAgentConfig(`${dir}/ok.json`, {}).commandSpawner, undefined, 'command spawner: default (on) unless set');
  t.equal(loadAgentConfig(`${dir}/ok.json`, { TERN_AGENT_COMMAND_SPAWNER: '0' }).commandSpawner, false, 'TERN_AGENT_COMMAND_SPAWNER=0 turns it off');
  t.equal(loadAgentConfig(`${dir}/nospawner.json`, { TERN_AGENT_COMMAND_SPAWNER: '1' }).commandSpawner, true, 'TERN_AGENT_COMMAND_SPAWNER=1 overrides the file');
  t.equal(loadAgentConfig(`${dir}/nospawner.json`, {}).commandSpawner, false, 'commandSpawner: false in the file');
  t.throws(() => loadAgentConfig(`${dir}/ok.json`, { TERN_AGENT_COMMAND_SPAWNER: 'no' }), /TERN_AGENT_COMMAND_SPAWNER must be 0 or 1/);
  t.throws(() => loadAgentConfig(`${dir}/badspawner.json`, {}), /commandSpawner must be true or false/);
  t.throws(() => loadAgentConfig(`${dir}/bad.json`, {}), /cannot read agent config/);
  t.throws(() => loadAgentConfig(`${dir}/missing.json`, {}), /cannot read agent config/);
  t.throws(() => loadAgentConfig(`${dir}/short.json`, {}), /at least 16 characters/);
  t.throws(() => loadAgentConfig(undefined, {}), /clusterToken/);
  t.throws(() => loadAgentConfig(`${dir}/port.json`, {}), /not a TCP port/);
});
