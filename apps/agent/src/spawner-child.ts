/**
 * The command spawner's process (see spawner.ts for why it exists): forked by the agent at its
 * start, it runs the commands the agent sends over the IPC channel and answers with their outcome.
 * It writes nothing to stdout; its complaints go to stderr, which is the agent's (its log). It
 * exits as soon as the channel closes: the agent exited or died, and it must not outlive it.
 */
import { execCommand, isId, validateRequest, type SpawnReply, type SpawnRequest } from './spawner.js';

const say = (m: string) => process.stderr.write(`tern-agent command spawner (pid ${process.pid}): ${m}\n`);

if (!process.send) {
  say('must be started by the agent (with an IPC channel)');
  process.exit(2);
}

// Ctrl-C in the agent's terminal reaches the whole process group: the agent decides when it stops
// (and may still run commands while it closes); this process goes with its channel.
process.on('SIGINT', () => {});
process.on('disconnect', () => process.exit(0));

const reply = (r: SpawnReply) => {
  try {
    process.send!(r, (err: Error | null) => {
      if (err) process.exit(0); // the channel is gone: so is the agent
    });
  } catch {
    process.exit(0);
  }
};

const run = (req: SpawnRequest) => {
  // validateRequest copied only the options that are set: the rest is execCommand's RunOptions.
  const { id, file, args, ...opts } = req;
  execCommand(file, args, opts, (err, stdout, stderr) => {
    if (!err) return reply({ id, code: 0, signal: null, stdout, stderr });
    const e = err as NodeJS.ErrnoException & { killed?: boolean; signal?: string | null; code?: number | string | null; spawnargs?: unknown };
    const code = typeof e.code === 'number' || typeof e.code === 'string' ? e.code : null;
    reply({
      id,
      code,
      signal: typeof e.signal === 'string' ? e.signal : null,
      stdout,
      stderr,
      error: {
        message: String(e.message),
        name: String(e.name),
        ...(typeof e.killed === 'boolean' && { killed: e.killed }),
        ...(typeof e.errno === 'number' && { errno: e.errno }),
        ...(typeof e.syscall === 'string' && { syscall: e.syscall }),
        ...(typeof e.path === 'string' && { path: e.path }),
        ...(Array.isArray(e.spawnargs) && { spawnargs: e.spawnargs.map(String) }),
      },
    });
  });
};

process.on('message', (m: unknown) => {
  const req = validateRequest(m);
  if (typeof req === 'string') {
    const id = typeof m === 'object' && m !== null ? (m as { id?: unknown }).id : undefined;
    say(`refused a malformed request: ${req}`);
    if (isId(id)) {
      reply({ id, code: 'EINVAL', signal: null, stdout: '', stderr: '', error: { message: `malformed request to the command spawner: ${req}` } });
    }
    return;
  }
  try {
    run(req);
  } catch (err) {
    reply({ id: req.id, code: 'EINVAL', signal: null, stdout: '', stderr: '', error: { message: String((err as Error).message) } });
  }
});

process.send({ ready: true, pid: process.pid });
