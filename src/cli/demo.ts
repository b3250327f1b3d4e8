import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { resolveSettings } from '../config.js';
import { helpText, parseFlags } from './args.js';
import { runCli } from './main.js';

// Its own embedded database, so the demo never writes into the DATABASE_URL
// you use for real work, and the local model, so it needs no key.
const DEMO_DATABASE_URL = 'pglite:./.data/demo';
// The local model embeds ~8 messages/s on 2 cores: 600 take about a minute.
// `npm run embed` with the same DATABASE_URL continues with the rest.
const DEMO_LIMIT = 600;
const SETTINGS = ['limit'] as const;

/** Runs a sibling CLI (`seed`, `embed`, …) the way this one was started (tsx or compiled). */
function step(title: string, script: string, args: string[]): number {
  process.stderr.write(`\n== ${title}\n`);
  const extension = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const path = fileURLToPath(new URL(`./${script}${extension}`, import.meta.url));
  const result = spawnSync(process.execPath, [...process.execArgv, path, ...args], {
    stdio: 'inherit',
    env: { ...process.env, DATABASE_URL: DEMO_DATABASE_URL, PGEMBED_PROVIDER: 'local' },
  });
  return result.status ?? 1;
}

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS);
  if (args.help) {
    process.stdout.write(`${helpText('npm run demo [-- --limit N]', SETTINGS)}\n`);
    return 0;
  }
  const limit = String(resolveSettings(SETTINGS, args.flags, process.env).limit ?? DEMO_LIMIT);
  const steps: Array<[string, string, string[]]> = [
    [
      'seed the 6,046 SpamAssassin emails (Subject and body) into ./.data/demo',
      'seed',
      ['--corpus', 'spamassassin-text'],
    ],
    [
      `embed the first ${limit} offline with the bundled local model (inputs over its 2,048-token limit are truncated)`,
      'embed',
      ['--limit', limit, '--truncate', '--batch-size', '32'],
    ],
    ['status', 'status', []],
    [
      'search: "computer virus spreading by email"',
      'search',
      ['computer virus spreading by email', '-k', '5'],
    ],
  ];
  for (const [title, script, args] of steps) {
    const code = step(title, script, args);
    if (code !== 0) {
      process.stderr.write(`\npgembed demo: step "${script}" exited ${code}\n`);
      return code;
    }
  }
  process.stderr.write(
    `\nDone. Embed the rest: DATABASE_URL=${DEMO_DATABASE_URL} npm run embed -- --provider local --truncate\n` +
      `Search: DATABASE_URL=${DEMO_DATABASE_URL} npm run search -- "your words" -k 10 --provider local\n`,
  );
  return 0;
});
