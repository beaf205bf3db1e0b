// The msgpack envelope codec: round trips, and every malformed input refused with a reason.
import t from 'tap';
import { Packr } from 'msgpackr';
import { decode, encode, PROTOCOL_VERSION, ProtocolError } from '@tern/protocol';

const raw = new Packr({ useRecords: false });

t.test('round trip', async (t) => {
  const bytes = encode('progress', { phase: 'precopy', round: 3, bytes: 2 ** 40 });
  const env = decode(bytes, ['progress']);
  t.equal(env.v, PROTOCOL_VERSION);
  t.equal(env.type, 'progress');
  t.same(env.body, { phase: 'precopy', round: 3, bytes: 2 ** 40 });
});

t.test('refusals', async (t) => {
  const refuse = (bytes: Uint8Array, re: RegExp, what: string) =>
    t.throws(() => decode(bytes, ['progress']), { name: 'ProtocolError', message: re }, what);
  refuse(Buffer.from([0x82, 0xa5, 0x61]), /malformed frame/, 'a truncated frame');
  refuse(raw.pack([1, 2, 3]), /not a map/, 'an array');
  refuse(raw.pack(null), /not a map/, 'nil');
  refuse(raw.pack({ v: 99, type: 'progress', body: {} }), /version 99 is not supported/, 'another version');
  refuse(raw.pack({ v: PROTOCOL_VERSION, type: 'shutdown', body: {} }), /unexpected message type "shutdown"/, 'a type not accepted');
  refuse(raw.pack({ v: PROTOCOL_VERSION, body: {} }), /unexpected message type/, 'no type');
  refuse(raw.pack({ v: PROTOCOL_VERSION, type: 'progress', body: 'x' }), /body is not a map/, 'a string body');
  refuse(raw.pack({ v: PROTOCOL_VERSION, type: 'progress', body: [1] }), /body is not a map/, 'an array body');
  t.ok(new ProtocolError('x') instanceof Error);
});
