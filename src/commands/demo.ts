import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

// Its own embedded database, so the demo never writes into the DATABASE_URL
// you use for real work, and the local model, so it needs no key.
const DEMO_DATABASE_URL = 'pglite:./.data/demo';
// The local model embeds ~8 messages/s on 2 cores: 600 take about a minute.
// `pgembed embed` with the same DATABASE_URL continues with the rest.
export const DEMO_LIMIT = 600;

/** Runs `pgembed <command>` the way this process was started (compiled, or tsx in development). */
function step(title: string, command: string, args: string[]): number {
  process.stderr.write(`\n== ${title}\n`);
  const extension = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const pgembed = fileURLToPath(new URL(`../cli/pgembed${extension}`, import.meta.url));
  const result = spawnSync(process.execPath, [...process.execArgv, pgembed, command, ...args], {
    stdio: 'inherit',
    env: { ...process.env, DATABASE_URL: DEMO_DATABASE_URL, PGEMBED_PROVIDER: 'local' },
  });
  return result.status ?? 1;
}

/** `pgembed demo`: seed, embed `limit` offline, status and a search, in ./.data/demo. */
export function demo(limit: number): number {
  const steps: Array<[string, string, string[]]> = [
    [
      'seed the 6,046 SpamAssassin emails (Subject and body) into ./.data/demo',
      'seed',
      ['--corpus', 'spamassassin-text'],
    ],
    [
      `embed the first ${limit} offline with the bundled local model (inputs over its 2,048-token limit are truncated)`,
      'embed',
      ['--limit', String(limit), '--truncate', '--batch-size', '32'],
    ],
    ['status', 'status', []],
    [
      'search: "computer virus spreading by email"',
      'search',
      ['computer virus spreading by email', '-k', '5'],
    ],
  ];
  for (const [title, command, args] of steps) {
    const code = step(title, command, args);
    if (code !== 0) {
      process.stderr.write(`\npgembed demo: step "${command}" exited ${code}\n`);
      return code;
    }
  }
  process.stderr.write(
    `\nDone. Embed the rest: DATABASE_URL=${DEMO_DATABASE_URL} pgembed embed --provider local --truncate\n` +
      `Search: DATABASE_URL=${DEMO_DATABASE_URL} pgembed search "your words" -k 10 --provider local\n`,
  );
  return 0;
}
