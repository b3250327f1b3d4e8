import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { tokenCount } from '../../src/provider/cl100k.js';
import { runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, openMigrated } from '../support/db.js';
import { sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

// One backend: the Postgres server where there is one (the budget reads the
// same run rows on both).
const backend = backends().at(-1) ?? 'pglite';
const MODEL = 'text-embedding-3-small';

describe(`the spend budget, through the CLI (${backend})`, () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
  });
  const env = (url: string) => ({
    DATABASE_URL: url,
    OPENAI_BASE_URL: fake.url,
    OPENAI_API_KEY: 'sk-test',
    LOG_LEVEL: 'warn',
  });

  it('stops taking batches at --max-tokens, says so in one line and exits 3', async () => {
    const target = await createTestDatabase(backend);
    try {
      const texts = sampleTexts(64);
      const seeded = await openMigrated(target.url);
      await seedMessages(seeded.db, texts);
      await seeded.close();
      fake.reset();
      // About three batches of 8 worth of tokens.
      const budget = texts.slice(0, 24).reduce((sum, t) => sum + tokenCount(t), 0);
      const result = await runCli(
        'embed',
        ['--batch-size', '8', '--concurrency', '1', '--max-tokens', String(budget)],
        env(target.url),
      );
      expect(result.code, result.stderr).toBe(3);
      const budgetLines = stderrLines(result).filter((l) => l.startsWith('pgembed: '));
      expect(budgetLines).toEqual([
        expect.stringMatching(
          new RegExp(
            `^pgembed: spend budget reached: \\d+ tokens billed by this run, of ${budget} \\(--max-tokens ${budget}\\); nothing more is sent`,
          ),
        ),
      ]);
      const database = await openDatabase(target.url);
      try {
        const { rows } = await sql<{ status: string; embedded: number; billed: number }>`
          select status, embedded, tokens_billed::int as billed from embedding_runs`.execute(
          database.db,
        );
        expect(rows).toHaveLength(1);
        const run = rows[0]!;
        expect(run.status).toBe('interrupted');
        // What was billed reached the budget, and passed it by at most the
        // batches already sent (one in flight, one read ahead: 16 inputs).
        expect(run.billed).toBeGreaterThanOrEqual(budget);
        const mostPerInput = Math.max(...texts.map(tokenCount));
        expect(run.billed).toBeLessThanOrEqual(budget + 16 * mostPerInput);
        expect(run.billed).toBe(fake.stats.tokensEmbedded);
        expect(run.embedded).toBeLessThan(64);
        // The rest stays pending for a later run.
        const { rows: queue } = await sql<{ n: number }>`
          select count(*)::int as n from embedding_queue where claimed_by is null`.execute(
          database.db,
        );
        expect(queue[0]?.n).toBe(64 - run.embedded);
      } finally {
        await database.close();
      }
    } finally {
      await target.drop();
    }
  }, 120_000);

  it('in watch mode counts every run of the model today, and sends nothing past the day’s budget', async () => {
    const target = await createTestDatabase(backend);
    try {
      const seeded = await openMigrated(target.url);
      await seedMessages(seeded.db, sampleTexts(16));
      // Another worker's run, today, has billed 5,000 tokens already.
      await sql`insert into embedding_runs (provider, model, host, pid, status, tokens_billed)
                values ('openai', ${MODEL}, 'elsewhere', 1, 'succeeded', 5000)`.execute(seeded.db);
      await seeded.close();
      fake.reset();
      const result = await runCli(
        'embed',
        ['--watch', '--max-cost-usd', '0.0001'],
        env(target.url),
      );
      // $0.0001 at $0.02 a million: 5,000 tokens, all spent today.
      expect(result.code, result.stderr).toBe(3);
      expect(result.stderr).toContain(
        'spend budget reached: 5000 tokens billed today (UTC), every run of this model counted, of 5000 (--max-cost-usd 0.0001)',
      );
      expect(fake.stats.requests).toBe(0);
    } finally {
      await target.drop();
    }
  }, 120_000);
});
