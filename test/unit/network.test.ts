// The agent's network helpers that need no namespace: address parsing and spelling, the nft
// scripts of the source lock and the destination's restore guard, and ss(8) parsing.
import t from 'tap';
import { canonicalAddress, lockScript, parseServiceAddress, parseSsQuiet, restoreGuardScript } from '@tern/agent';

t.test('service addresses', async (t) => {
  t.same(parseServiceAddress('10.77.0.200'), { address: '10.77.0.200', prefix: 32 });
  t.same(parseServiceAddress(' FD00::200/64 '), { address: 'fd00::200', prefix: 64 });
  for (const bad of ['10.77.0.300', '10.77.0.1/33', 'fd00::1/129', 'host.example', '', '1.2.3.4/']) {
    t.throws(() => parseServiceAddress(bad), /is not an address/, JSON.stringify(bad));
  }
  t.equal(canonicalAddress('fd00::200'), 'fd00:0:0:0:0:0:0:200');
  t.equal(canonicalAddress('FD00:0000::0200'), 'fd00:0:0:0:0:0:0:200', 'one spelling whatever the input');
  t.equal(canonicalAddress('::'), '0:0:0:0:0:0:0:0');
  t.equal(canonicalAddress('10.0.0.1'), '10.0.0.1');
});

t.test('lock and guard scripts', async (t) => {
  const script = lockScript('m1', [
    { v6: false, localAddress: '10.77.0.200', localPort: 6379, remoteAddress: '10.77.0.100', remotePort: 40000 },
    // a dual-stack socket talking to a v4 client: on the wire it is IPv4
    { v6: true, localAddress: '10.77.0.200', localPort: 6379, remoteAddress: '10.77.0.100', remotePort: 40001 },
    { v6: true, localAddress: 'fd00:0:0:0:0:0:0:200', localPort: 80, remoteAddress: 'fd00:0:0:0:0:0:0:100', remotePort: 5000 },
  ], 4242);
  t.match(script, /table inet tern-m1 \{\n  comment "tern agent pid 4242"/);
  t.match(script, /ip saddr 10\.77\.0\.100 ip daddr 10\.77\.0\.200 tcp sport 40001 tcp dport 6379 drop/);
  t.match(script, /ip6 saddr fd00:0:0:0:0:0:0:100 ip6 daddr fd00:0:0:0:0:0:0:200 tcp sport 5000 tcp dport 80 drop/);
  t.equal(script.match(/ drop/g)?.length, 6, 'each connection dropped both ways');
  const guard = restoreGuardScript('m1', ['10.77.0.200/32', 'fd00::200/128'], 4242);
  t.match(guard, /table inet tern-m1-dst/);
  t.match(guard, /ip saddr 10\.77\.0\.200 tcp flags & rst == rst drop/);
  t.match(guard, /ip6 saddr fd00::200 tcp flags & rst == rst drop/);
});

t.test('ss -tinHe parsing', async (t) => {
  const text = [
    '0      0      10.77.0.200:6379 10.77.0.100:40000 ino:630977 sk:1059 cgroup:/ <->',
    '\t ts sack cubic wscale:7,7 rto:204 rtt:0.019/0.009 lastsnd:312 lastrcv:41 lastack:2',
    '0      0      10.77.0.200:6379 10.77.0.100:40002 ino:630978 sk:105a cgroup:/ <->',
    '\t ts sack cubic wscale:7,7 rto:204 lastsnd:12 lastack:1',
  ].join('\n');
  const q = parseSsQuiet(text);
  t.equal(q.get('630977'), 41, 'ms since the last data from the peer');
  t.equal(q.get('630978'), Infinity, 'no data ever received: never resumed');
});
