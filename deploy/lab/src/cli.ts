// Backend of deploy/lab/lab (the bash entry point handles `exec` itself via the `argv` command).
import { Lab, destroyLab, listLabs, reapStale } from './index.js';

const USAGE = `usage: lab up [NAME] [--hosts N] [--agents]   create a lab (persists until 'lab down'); prints its LabInfo JSON;
                                      --agents: a Tern agent in every host (for migrate --lab NAME)
       lab exec NAME HOST|client -- CMD...  run CMD inside a host of the lab
       lab ls [--reap] [--json]            list labs (--reap: first remove labs whose owner died)
       lab down NAME                       destroy a lab`;

function die(msg: string, code = 2): never {
  process.stderr.write(`lab: ${msg}\n`);
  process.exit(code);
}

async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'up': {
      let name: string | undefined;
      let hosts: number | undefined;
      let agents = false;
      for (let i = 0; i < rest.length; i++) {
        const a = rest[i]!;
        if (a === '--hosts') hosts = Number(rest[++i]);
        else if (a.startsWith('--hosts=')) hosts = Number(a.slice(8));
        else if (a === '--agents') agents = true;
        else if (a.startsWith('-')) die(`unknown option ${a}\n${USAGE}`);
        else if (name === undefined) name = a;
        else die(`unexpected argument ${a}\n${USAGE}`);
      }
      const lab = await Lab.create({ ...(name !== undefined && { name }), ...(hosts !== undefined && { hosts }), owned: false });
      if (agents) {
        try {
          await lab.startAgents();
        } catch (e) {
          await lab.destroy();
          throw e;
        }
      }
      process.stdout.write(JSON.stringify(lab.info, null, 2) + '\n');
      return;
    }
    case 'down': {
      if (rest.length !== 1) die(USAGE);
      await destroyLab(rest[0]!);
      return;
    }
    case 'ls': {
      const json = rest.includes('--json');
      if (rest.includes('--reap')) {
        for (const n of await reapStale()) process.stderr.write(`lab: reaped ${n}\n`);
      }
      const labs = await listLabs();
      if (json) {
        process.stdout.write(JSON.stringify(labs, null, 2) + '\n');
        return;
      }
      for (const l of labs) {
        process.stdout.write(
          `${l.name.padEnd(13)} hosts=${l.hosts.map((h) => `${h.name}:${h.address}`).join(',')} service=${l.serviceAddress}@${l.serviceHost} owner=${l.ownerPid ?? '-'} created=${l.createdAt}\n`,
        );
      }
      return;
    }
    case 'argv': {
      // internal: prints the command prefix for `lab exec`, one argument per line
      const [name, host, cwd] = rest;
      if (!name || !host) die(USAGE);
      const lab = await Lab.attach(name);
      process.stdout.write(lab.nsenterArgs(host, cwd ?? process.cwd()).join('\n') + '\n');
      return;
    }
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE + '\n');
      return;
    default:
      die(`unknown command ${cmd}\n${USAGE}`);
  }
}

main(process.argv.slice(2)).catch((e: unknown) => die(e instanceof Error ? e.message : String(e), 1));
