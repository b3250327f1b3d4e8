import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { SETTINGS } from '../../src/config.js';
import { openDatabase } from '../../src/db/connect.js';
import { isLog, repoRoot, runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';

const LONG = 'lorem ipsum dolor sit amet '.repeat(1200); // ~6,000 tokens, over the 2,048 limit

describe('embedding with the bundled local model', () => {
  let scratch: string;
  let url: string;
  beforeAll(async () => {
    scratch = mkdtempSync(join(tmpdir(), 'pgembed-local-'));
    url = `pglite:${join(scratch, 'db')}`;
    const jsonl = join(scratch, 'messages.jsonl');
    const lines = Array.from({ length: 12 }, (_, i) =>
      JSON.stringify({ id: i + 1, content: i === 7 ? LONG : `note ${i + 1} about the garden` }),
    );
    writeFileSync(jsonl, `${lines.join('\n')}\n`);
    const seeded = await runCli('seed', ['--jsonl', jsonl], { DATABASE_URL: url });
    expect(seeded.code, seeded.stderr).toBe(0);
  }, 60_000);
  afterAll(() => rmSync(scratch, { recursive: true, force: true }));

  it('is used when no OpenAI key or URL is set, says so first, and applies its input limit strictly', async () => {
    const result = await runCli('embed', ['--batch-size', '4'], {
      DATABASE_URL: url,
      LOG_LEVEL: 'info',
    });
    const first = JSON.parse(result.stdout.split('\n')[0] ?? '{}') as { msg?: string };
    expect(first.msg).toMatch(
      /^neither OPENAI_API_KEY nor OPENAI_BASE_URL is set: embedding offline/,
    );
    expect(result.code).toBe(1);
    expect(stderrLines(result).at(-1)).toMatch(
      /^pgembed: message 8 cannot be embedded \(context_length\): \d+ tokens, over the 2048-token limit/,
    );
  }, 60_000);

  it('skips the over-long input in partial mode and stores 512-dimension vectors labelled local', async () => {
    const result = await runCli('embed', ['--allow-partial', '--batch-size', '4'], {
      DATABASE_URL: url,
    });
    expect(result.code, result.stderr).toBe(2);
    const database = await openDatabase(url);
    try {
      const rows = await sql<{ provider: string; model: string; dimensions: number; n: number }>`
        select provider, model, dimensions, count(*)::int as n from message_embeddings
        group by 1, 2, 3`.execute(database.db);
      expect(rows.rows).toEqual([
        { provider: 'local', model: 'universal-sentence-encoder-lite', dimensions: 512, n: 11 },
      ]);
      const skips = await database.db
        .selectFrom('embedding_skips')
        .select(['message_id', 'reason'])
        .execute();
      expect(skips).toEqual([{ message_id: '8', reason: 'context_length' }]);
    } finally {
      await database.close();
    }
  }, 60_000);
});

/**
 * `npm run embed` the way a terminal runs it: npm, its `sh -c` and the
 * `pgembed` binary (node, through its `#!/usr/bin/env node` line) share a
 * process group of their own, and Ctrl-C is a SIGINT to every process of the
 * group at once. With the model working for most of a run, pgembed must still
 * hear the signal, let the batches in flight commit and record the run before
 * it exits, while npm and its shell die of the signal.
 */
describe.each(backends())(
  'Ctrl-C through `npm run embed` with the local model on %s',
  (backend) => {
    const MESSAGES = 80;
    let database: TestDatabase;
    let group: ChildProcess | undefined;
    beforeAll(async () => {
      database = await createTestDatabase(backend);
      const db = await openMigrated(database.url);
      try {
        await sql`insert into messages (id, content)
        select g, 'note ' || g || ' about the garden, the weather and the long evenings'
        from generate_series(1, ${MESSAGES}) g`.execute(db.db);
      } finally {
        await db.close();
      }
    }, 120_000);
    afterEach(() => {
      // A failed test may leave some of the group running (ESRCH when none is).
      if (group?.pid) {
        try {
          process.kill(-group.pid, 'SIGKILL');
        } catch {}
      }
      group = undefined;
    });
    afterAll(async () => {
      await database?.drop();
    });

    it("stops cleanly: the batches in flight commit, the run is marked interrupted, the summary is printed, and npm dies of the signal (the shell's 130)", async () => {
      // As in test/support/cli.ts: every setting blank unless set here, so a
      // developer's .env cannot change what the run does.
      const env: Record<string, string> = {
        PATH: process.env.PATH ?? '/usr/bin:/bin',
        HOME: process.env.HOME ?? '/tmp',
        ...Object.fromEntries(Object.values(SETTINGS).map((s) => [s.env, ''])),
        DATABASE_URL: database.url,
        LOG_LEVEL: 'debug',
        npm_config_update_notifier: 'false',
      };
      const child = spawn(
        'npm',
        ['run', 'embed', '--', '--provider', 'local', '--batch-size', '4', '--concurrency', '2'],
        { cwd: repoRoot, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      group = child;
      let stdout = '';
      let stderr = '';
      let partial = '';
      let committed = 0;
      let committedAtSignal: number | undefined;
      child.stderr?.setEncoding('utf8');
      child.stderr?.on('data', (chunk: string) => {
        stderr += chunk;
      });
      child.stdout?.setEncoding('utf8');
      child.stdout?.on('data', (chunk: string) => {
        stdout += chunk;
        const lines = (partial + chunk).split('\n');
        partial = lines.pop() ?? '';
        for (const line of lines) {
          if (!isLog(line, 'batch committed')) continue;
          committed++;
          if (committedAtSignal === undefined && child.pid) {
            // The terminal's Ctrl-C: one SIGINT to the whole process group.
            committedAtSignal = committed;
            process.kill(-child.pid, 'SIGINT');
          }
        }
      });
      // 'close': every process of the group holding the pipes has exited.
      const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>(
        (resolve, reject) => {
          child.on('error', reject);
          child.on('close', (c, s) => resolve([c, s]));
        },
      );
      const output = `stdout:\n${stdout}\nstderr:\n${stderr}`;
      expect(committedAtSignal, output).toBeDefined();

      // npm and its sh die of the SIGINT once pgembed has exited (a shell
      // reports 128 + 2 = 130) and print nothing of their own.
      expect({ code, signal }, output).toEqual({ code: null, signal: 'SIGINT' });
      const runId = /^pgembed run (\d+) interrupted:/m.exec(stderr)?.[1];
      expect(runId, output).toBeDefined();
      expect(stderr).not.toMatch(/second SIGINT/);
      expect(stderr).not.toMatch(/^\s+at /m);
      expect(stderr).not.toMatch(/npm (error|ERR!)|ELIFECYCLE/);

      const db = await openDatabase(database.url);
      try {
        const run = await db.db
          .selectFrom('embedding_runs')
          .select(['status', 'embedded', 'batches', 'error'])
          .where('id', '=', runId as string)
          .executeTakeFirstOrThrow();
        expect(run).toMatchObject({ status: 'interrupted', error: 'interrupted by SIGINT' });
        const batches = await db.db
          .selectFrom('embedding_batches')
          .select(['size', 'embedded'])
          .where('run_id', '=', runId as string)
          .execute();
        const { rows } = await sql<{ n: number }>`
        select count(*)::int as n from message_embeddings`.execute(db.db);
        const stored = rows[0]?.n ?? 0;
        // Every batch that was embedded is committed, whole, and logged: the
        // one the model was working on when the signal came included.
        expect(batches).toHaveLength(Number(run.batches));
        expect(committed).toBe(batches.length);
        expect(committed, output).toBeGreaterThan(committedAtSignal as number);
        for (const batch of batches) expect(batch).toMatchObject({ size: 4, embedded: 4 });
        expect(stored).toBe(4 * batches.length);
        expect(Number(run.embedded)).toBe(stored);
        // It stopped: it did not run on to the end.
        expect(stored).toBeLessThan(MESSAGES);
      } finally {
        await db.close();
      }
    }, 180_000);
  },
);
