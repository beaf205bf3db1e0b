// `migrate` as users run it: in a pseudo-terminal (progress bar drawn, then the report), with --json
// (parsed), plain lines when piped, the records commands, `image show`, and the exit codes — against
// scripted agents over loopback (an embedded coordinator) and a coordinator over HTTP.
import t from 'tap';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Packr } from 'msgpackr';
import { cliMain } from '../e2e/helpers.js';
import { coordinatorOn, fakeAgent, tempDir, token, type FakeAgentScript } from './helpers.js';

interface Run {
  code: number | null;
  out: string;
  err: string;
}

function run(argv: string[], env: NodeJS.ProcessEnv = {}, opts: { pty?: boolean; cwd?: string } = {}): Promise<Run> {
  // script(1) gives the CLI a pseudo-terminal; -e returns the CLI's exit code.
  const quoted = [process.execPath, cliMain, ...argv].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const [cmd, args] = opts.pty ? ['script', ['-qefc', quoted, '/dev/null']] : [process.execPath, [cliMain, ...argv]];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args as string[], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], cwd: opts.cwd ?? process.cwd() });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, out, err }));
  });
}

async function setup(t: Parameters<Parameters<typeof t.test>[1]>[0], src: FakeAgentScript = {}, dst: FakeAgentScript = {}) {
  const dir = tempDir(t);
  const a = await fakeAgent(t, 'hostA', src);
  const b = await fakeAgent(t, 'hostB', dst);
  const config = join(dir, 'tern.json');
  writeFileSync(config, JSON.stringify({ hosts: { hostA: a.host.url, hostB: b.host.url }, clusterToken: token, database: join(dir, 'embedded.db') }));
  return { dir, a, b, env: { TERN_CONFIG: config } };
}

t.test('in a pseudo-terminal: the progress bar is drawn through every phase, then the report', async (t) => {
  const { env } = await setup(t, { delay: { source: 300 } }, { delay: { restore: 300 } });
  const r = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42'], env, { pty: true });
  t.equal(r.code, 0, r.out + r.err);
  t.match(r.out, /\r\x1b\[2K/, 'the line is redrawn in place');
  for (const phase of ['checking', 'precopy', 'switchover', 'restoring', 'postcopy']) t.match(r.out, new RegExp(`${phase} +▕[█░]+▏ round \\d+`), `bar in ${phase}`);
  t.match(r.out, /done +▕█{24}▏/, 'the bar finishes full');
  t.match(r.out, /ETA/);
  t.match(r.out, /dirty/);
  t.match(r.out, /migrated pid 42 from hostA to hostB \(hybrid\) — done/, 'hybrid is the default');
  t.match(r.out, /downtime +\d+(\.\d+)? ms/);
  t.match(r.out, /total time/);
  t.match(r.out, /bytes moved +[\d.]+ [KM]iB \(1000 data, 0 zero pages\)/);
  t.match(r.out, /rounds +1/);
  t.match(r.out, /post-copy +300 pages pulled from hostA: 40 on fault \(p50 0\.08 ms, p99 0\.90 ms\), 260 in the background, all home 42\.0 ms after the resume/);
});

t.test('--mode cold: no rounds, the memory moves inside the downtime', async (t) => {
  const { env } = await setup(t);
  const r = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42', '--mode', 'cold'], env);
  t.equal(r.code, 0, r.out + r.err);
  t.match(r.out, /migrated pid 42 from hostA to hostB \(cold\) — done/);
  t.match(r.out, /bytes moved +40\.0 KiB \(10 data, 2 zero pages\)/);
  t.match(r.out, /rounds +0/);
  t.notMatch(r.out, /post-copy +\d+ pages/);
});

t.test('--json prints one parsable document; piped output is plain lines', async (t) => {
  const { env } = await setup(t);
  const json = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42', '--json'], env);
  t.equal(json.code, 0, json.err);
  const doc = JSON.parse(json.out);
  t.equal(doc.migration.state, 'done');
  t.same(doc.events.filter((e: { type: string }) => e.type === 'phase').map((e: { state: string }) => e.state), ['checking', 'precopy', 'switchover', 'restoring', 'postcopy']);
  const plain = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '43'], env);
  t.equal(plain.code, 0);
  t.notMatch(plain.out, /\x1b/, 'no escape sequences when not on a terminal');
  t.match(plain.out, /^ +\d+\.\d{3}s switchover +freezing pid 43/m);

  const list = await run(['list'], env);
  t.equal(list.code, 0);
  t.match(list.out, /^ID +STATE +PID/m);
  t.match(list.out, new RegExp(`${doc.migration.id} +done +42`));
  const listJson = JSON.parse((await run(['list', '--json'], env)).out);
  t.equal(listJson.length, 2);
  const status = await run(['status', doc.migration.id, '--events'], env);
  t.equal(status.code, 0);
  t.match(status.out, new RegExp(`migration ${doc.migration.id}: done \\(past the commit point\\)`));
  t.match(status.out, /events:\n.*checking/);
  t.equal(JSON.parse((await run(['status', doc.migration.id, '--json'], env)).out).id, doc.migration.id);
  const late = await run(['abort', doc.migration.id], env);
  t.equal(late.code, 1, 'abort of a finished migration: too late');
  t.match(late.err, /already done/);
  const unknown = await run(['status', 'mnope'], env);
  t.equal(unknown.code, 2);
  t.match(unknown.err, /no migration mnope/);
});

t.test('exit codes of migrations that do not happen', async (t) => {
  const refused = await setup(t, { movable: false });
  const r1 = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42'], refused.env);
  t.equal(r1.code, 1, 'not movable → 1');
  t.match(r1.out, /✗ fd 3 \[io-uring\]/);
  t.match(r1.out, /pid 42 runs on hostA, as before/);

  const unbuilt = await setup(t, {}, { fail: { prepare: { status: 501, error: 'unavailable', message: 'cold migration engine is not built in this version' } } });
  const r2 = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42'], unbuilt.env);
  t.equal(r2.code, 3, 'engine not built → 3');
  t.match(r2.out, /not built in this version/);

  const nopid = await setup(t, { fail: { check: { status: 422, error: 'validate', message: 'no process with pid 42' } } });
  t.equal((await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42'], nopid.env)).code, 2, 'no such pid → 2');

  const usage: [string[], RegExp][] = [
    [['--from', 'hostA', '--to', 'hostB', '--pid', '42', '--mode', 'warp'], /--mode warp is not one of/],
    [['--from', 'hostA', '--to', 'hostB'], /--pid N are required/],
    [['--from', 'hostA', '--to', 'hostB', '--pid', 'x'], /not a process id/],
    [['--from', 'hostA', '--to', 'hostB', '--pid', '4', '--bandwidth=-3'], /^migrate: --bandwidth -3 is not a positive number/],
    [['--from', 'hostA', '--to', 'hostB', '--pid', '4', '--give-up-after', '0.01'], /--give-up-after 0.01 must be between 0.1 and 86400 seconds/],
    [['--from', 'hostA', '--to', 'hostZ', '--pid', '42'], /unknown host hostZ/],
    [['--from', 'hostA', '--to', 'hostB', '--pid', '42', '--bogus'], /Unknown option '--bogus'/],
    [['status'], /give one migration id/],
  ];
  for (const [argv, message] of usage) {
    const r = await run(argv, refused.env);
    t.equal(r.code, 2, argv.join(' '));
    t.match(r.err, message);
  }
  const noConfig = await run(['--from', 'hostA', '--to', 'hostB', '--pid', '42'], { TERN_CONFIG: '' }, { cwd: tempDir(t) });
  t.equal(noConfig.code, 2);
  t.match(noConfig.err, /no coordinator and no agents|lab/);
});

t.test('through a coordinator over HTTP (--coordinator URL)', async (t) => {
  const a = await fakeAgent(t, 'hostA');
  const b = await fakeAgent(t, 'hostB');
  const c = coordinatorOn(t, join(tempDir(t), 'c.db'), [a.host, b.host], { listen: true });
  const url = await c.listening;
  const r = await run(['--coordinator', url, '--token', token, '--from', 'hostA', '--to', 'hostB', '--pid', '42', '--json']);
  t.equal(r.code, 0, r.err);
  const doc = JSON.parse(r.out);
  t.equal(doc.migration.state, 'done');
  t.same(doc.events.map((e: { seq: number }) => e.seq), doc.events.map((_: unknown, i: number) => i + 1), 'every event, from the WebSocket');
  const status = await run(['status', doc.migration.id, '--coordinator', url, '--json'], { TERN_API_TOKEN: token });
  t.equal(JSON.parse(status.out).state, 'done');
  const bad = await run(['list', '--coordinator', url, '--token', 'wrong-token-wrong-token']);
  t.equal(bad.code, 2);
  t.match(bad.err, /wrong cluster token/);
  const down = await run(['list', '--coordinator', 'http://127.0.0.1:1', '--token', token]);
  t.equal(down.code, 3, 'coordinator unreachable → 3');
});

t.test('Ctrl-C during a migration aborts it: exit 4, the process stays on the source', async (t) => {
  const { env, a, b } = await setup(t, { delay: { source: 1500 } });
  const child = spawn(process.execPath, [cliMain, '--from', 'hostA', '--to', 'hostB', '--pid', '42'], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  let interrupted = false;
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    if (!interrupted && /switchover +freezing/.test(out)) {
      interrupted = true; // once: a second Ctrl-C means "stop waiting"
      child.kill('SIGINT');
    }
  });
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const code = await new Promise<number | null>((r) => child.on('close', r));
  t.equal(code, 4, out + err);
  t.match(err, /aborting m[0-9a-f]{12}/);
  t.match(out, /: aborted during switchover/);
  t.match(out, /pid 42 runs on hostA, as before/);
  t.ok(b.steps().includes('abort') && a.steps().includes('abort'), 'both agents told');
  t.notOk(b.steps().includes('restore'));
});

t.test('migrate image show prints a msgpack image readably, or as JSON', async (t) => {
  const dir = tempDir(t);
  const file = join(dir, 'img.msgpack');
  const image = {
    version: 1,
    tasks: [
      {
        pid: 4242,
        comm: 'redis-server',
        threads: [{ tid: 4242, regs: { rip: 0x7f12_3456_789an, rsp: 0x7ffd_0000_1000n }, sigmask: [1, 2] }],
        mm: { startBrk: 0x5555_5555_0000n, auxv: [[33, 0x7fff_f7fc_1000n]] },
        xstate: Buffer.from('0123456789abcdefXYZ'),
      },
    ],
  };
  writeFileSync(file, new Packr({ useRecords: false }).pack(image));
  const r = await run(['image', 'show', file]);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /image .*img\.msgpack \(\d+ B, msgpack\)/);
  t.match(r.out, /^ {2}version: 1$/m);
  t.match(r.out, /^ {2}tasks: \(1\)\n {4}\[0\]:\n {6}pid: 4242/m);
  t.match(r.out, /rip: 0x7f123456789a/);
  t.match(r.out, /sigmask: \[1, 2\]/);
  t.match(r.out, /xstate: <19 bytes: 30 31 32/);
  const j = await run(['image', 'show', file, '--json']);
  const parsed = JSON.parse(j.out);
  t.equal(parsed.tasks[0].threads[0].regs.rip, 0x7f123456789a, 'u64 that fit a double stay numbers in JSON');
  t.equal(parsed.tasks[0].xstate.bytes, 19);
  writeFileSync(join(dir, 'junk'), Buffer.from([0x92, 0x01])); // an array of 2 with 1 element
  writeFileSync(join(dir, 'text'), 'hello');
  const junk = await run(['image', 'show', join(dir, 'junk')]);
  t.equal(junk.code, 2);
  t.match(junk.err, /not a msgpack image/);
  const text = await run(['image', 'show', join(dir, 'text')]);
  t.equal(text.code, 2);
  t.match(text.err, /not a msgpack image/);
  t.equal((await run(['image', 'show', join(dir, 'missing')])).code, 2);
  t.equal((await run(['image', 'list'])).code, 2);
});

t.test('--help documents the exit codes', async (t) => {
  const r = await run(['--help']);
  t.equal(r.code, 0);
  for (const code of ['0  ok', '1  check: not movable', '2  bad input', '3  Tern itself failed', '4  migrate: aborted']) t.match(r.out, code);
});
