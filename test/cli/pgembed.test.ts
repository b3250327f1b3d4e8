import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  builtBinary,
  type CliCommand,
  type CliResult,
  repoRoot,
  startNode,
  stderrLines,
} from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';

const COMMANDS: CliCommand[] = [
  'embed',
  'migrate',
  'status',
  'search',
  'index',
  'seed',
  'demo',
  'prune',
];

/** What a command may load only when it uses it (src/cli/pgembed.ts). */
const DRIVERS_AND_SDKS = [
  'kysely',
  'pg',
  'pino',
  'openai',
  'p-retry',
  '@electric-sql/pglite',
  '@electric-sql/pglite-pgvector',
  '@electric-sql/pglite-socket',
];
const USED_ONLY_BY_SOME_RUNS = [
  'gpt-tokenizer', // an input longer in bytes than the token limit
  'prom-client', // --metrics-port
  'cli-progress', // a terminal
  '@energetic-ai/core', // the local model, on its first input
  '@energetic-ai/embeddings',
];

const moduleTrace = fileURLToPath(new URL('../support/module-trace.mjs', import.meta.url));
const scratch = mkdtempSync(join(tmpdir(), 'pgembed-bin-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));
let traces = 0;

/** Runs the built `pgembed` and names every package it loaded (test/support/module-trace.mjs). */
async function traced(
  args: string[],
  env: Record<string, string> = {},
): Promise<CliResult & { packages: Set<string> }> {
  const traceFile = join(scratch, `trace-${traces++}`);
  const result = await startNode(
    `pgembed ${args.join(' ')}`,
    ['--import', moduleTrace, builtBinary, ...args],
    { ...env, PGEMBED_TRACE_MODULES: traceFile },
    { cwd: scratch },
  ).result;
  const packages = new Set(
    readFileSync(traceFile, 'utf8')
      .split('\n')
      .filter((line) => line.includes('/node_modules/'))
      .map((line) => {
        const parts = (line.split('/node_modules/').at(-1) ?? '').split('/');
        return (parts[0]?.startsWith('@') ? parts.slice(0, 2) : parts.slice(0, 1)).join('/');
      }),
  );
  return { ...result, packages };
}

function loadedOf(packages: Set<string>, names: string[]): string[] {
  return names.filter((name) => packages.has(name));
}

describe('the pgembed binary', () => {
  it('lists its commands when run bare, and with --help', async () => {
    // `help constructor`: an own command name only, never one of Object's.
    for (const args of [[], ['--help'], ['help'], ['help', 'constructor']]) {
      const result = await traced(args);
      expect(result.code, result.stderr).toBe(0);
      expect(result.stdout).toMatch(/^usage: pgembed <command> \[flags\]\n/);
      for (const command of COMMANDS) {
        expect(result.stdout).toMatch(new RegExp(`^ {2}${command} +\\S`, 'm'));
      }
    }
  });

  it("prints package.json's version", async () => {
    const { version } = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8'));
    const result = await traced(['--version']);
    expect(result.code).toBe(0);
    expect(result.stdout).toBe(`${version}\n`);
  });

  it.each(COMMANDS)(
    '%s --help: its usage and settings, without loading a driver, SDK or engine',
    async (command) => {
      for (const args of [
        [command, '--help'],
        ['help', command],
      ]) {
        const result = await traced(args);
        expect(result.code, result.stderr).toBe(0);
        expect(result.stdout).toMatch(new RegExp(`^usage: pgembed ${command}\\b`));
        expect(result.stdout).toContain('--help');
        expect(loadedOf(result.packages, [...DRIVERS_AND_SDKS, ...USED_ONLY_BY_SOME_RUNS])).toEqual(
          [],
        );
      }
    },
  );

  it('refuses an unknown command or flag in one line, exit 1, before loading anything heavy', async () => {
    const unknown = await traced(['stauts']);
    expect(unknown.code).toBe(1);
    expect(stderrLines(unknown)).toEqual([
      "pgembed: unknown command 'stauts': use one of embed, migrate, status, search, index, seed, demo, prune (pgembed --help)",
    ]);
    const badFlag = await traced(['status', '--frob']);
    expect(badFlag.code).toBe(1);
    expect(stderrLines(badFlag)).toEqual(['pgembed: unknown flag --frob (see --help)']);
    for (const result of [unknown, badFlag]) {
      expect(loadedOf(result.packages, [...DRIVERS_AND_SDKS, ...USED_ONLY_BY_SOME_RUNS])).toEqual(
        [],
      );
    }
  });

  it('is what `npm ci` links as node_modules/.bin/pgembed, and runs as a file', () => {
    const linked = join(repoRoot, 'node_modules', '.bin', 'pgembed');
    expect(realpathSync(linked)).toBe(realpathSync(builtBinary));
    // Through its `#!/usr/bin/env node` line, as a shell runs it.
    const { version } = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8'));
    expect(execFileSync(linked, ['--version'], { encoding: 'utf8' })).toBe(`${version}\n`);
  });
});

describe.each(backends())('what a command loads on %s', (backend) => {
  let database: TestDatabase;
  beforeAll(async () => {
    database = await createTestDatabase(backend);
  }, 120_000);
  afterAll(async () => {
    await database?.drop();
  });

  it('embed with nothing to do, on the local model: no model, tokenizer, metrics or bar', async () => {
    // No key and no URL: the bundled local model, which is loaded on the first input only.
    const result = await traced(['embed'], { DATABASE_URL: database.url });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/run \d+ succeeded: local\/universal-sentence-encoder-lite/);
    expect(loadedOf(result.packages, USED_ONLY_BY_SOME_RUNS)).toEqual([]);
    const pglite = result.packages.has('@electric-sql/pglite');
    expect(pglite, 'PGlite is loaded where DATABASE_URL names it, only').toBe(backend === 'pglite');
  });

  it('status: the driver, and no SDK, tokenizer or model', async () => {
    const result = await traced(['status'], { DATABASE_URL: database.url });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toContain('nothing embedded yet');
    expect(
      loadedOf(result.packages, ['openai', 'p-retry', 'pino', ...USED_ONLY_BY_SOME_RUNS]),
    ).toEqual([]);
    expect(result.packages.has('@electric-sql/pglite')).toBe(backend === 'pglite');
    expect(result.packages.has(backend === 'pglite' ? '@electric-sql/pglite' : 'pg')).toBe(true);
    // A short command does not serve its PGlite directory: no socket server.
    expect(result.packages.has('@electric-sql/pglite-socket')).toBe(false);
  });
});
