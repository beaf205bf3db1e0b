// Detached watchdog of an owned lab: `node dist/watchdog.js <name> <ownerPid>`.
// Every 500 ms: exits if the state file is gone (normal destroy) or the lab changed owner (e.g. `lab up`
// finished and cleared it); tears the lab down and exits if the owner died (even by SIGKILL).
import { pidAlive, readState, teardownSync } from './core.js';

const [name, ownerArg] = process.argv.slice(2);
const ownerPid = Number(ownerArg);
if (!name || !Number.isInteger(ownerPid) || ownerPid <= 0) {
  process.stderr.write('usage: watchdog.js <lab> <ownerPid>\n');
  process.exit(2);
}
process.title = `tern-lab-watchdog ${name}`;
for (const s of ['SIGINT', 'SIGHUP', 'SIGPIPE'] as const) process.on(s, () => {});

function tick(): void {
  const st = readState(name!);
  if (!st || st.ownerPid !== ownerPid) process.exit(0);
  if (!pidAlive(ownerPid, st.ownerStart)) {
    teardownSync(name!);
    process.exit(0);
  }
}
tick();
setInterval(tick, 500);
