#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { ConfigError } from '../errors.js';
import { type Command, commandHelp, runCommand } from './command.js';
import { demo } from './demo.js';
import { embed } from './embed.js';
import { index } from './index.js';
import { runCli } from './main.js';
import { migrate } from './migrate.js';
import { prune } from './prune.js';
import { search } from './search.js';
import { seed } from './seed.js';
import { status } from './status.js';

/*
 * The `pgembed` command. Each subcommand's module holds its flags only and
 * imports its work when it runs, so `pgembed --help`, `pgembed status
 * --help` and a mistyped flag load neither kysely, pg, PGlite, the OpenAI
 * SDK nor the tokenizer (BENCHMARKS.md, "Start-up").
 */

const COMMANDS: Record<string, Command> = {
  embed,
  migrate,
  status,
  search,
  index,
  seed,
  demo,
  prune,
};

/** package.json's version: two levels up from src/cli/ (tsx), three from dist/src/cli/. */
function version(): string {
  for (const up of ['../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(up, import.meta.url), 'utf8'));
      if (pkg.name === 'pgembed') return pkg.version;
    } catch {
      // not this one
    }
  }
  return 'unknown';
}

/** Own keys only: `pgembed constructor` is an unknown command, not Object's. */
function commandNamed(name: string | undefined): Command | undefined {
  return name !== undefined && Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
}

function overview(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((name) => name.length));
  return [
    'usage: pgembed <command> [flags]',
    '',
    'commands:',
    ...Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`),
    '',
    '`pgembed <command> --help` shows its flags and environment variables; `pgembed --version`.',
  ].join('\n');
}

await runCli(async (argv) => {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h') {
    process.stdout.write(`${overview()}\n`);
    return 0;
  }
  if (name === '--version' || name === '-v') {
    process.stdout.write(`${version()}\n`);
    return 0;
  }
  if (name === 'help') {
    const command = commandNamed(rest[0]);
    process.stdout.write(`${command ? commandHelp(command) : overview()}\n`);
    return 0;
  }
  const command = commandNamed(name);
  if (!command) {
    throw new ConfigError(
      `unknown command '${name}': use one of ${Object.keys(COMMANDS).join(', ')} (pgembed --help)`,
    );
  }
  return runCommand(command, rest);
});
