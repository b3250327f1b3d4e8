import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { type RunningCli, startCli } from '../support/cli.js';
import { createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

// 6,000 tokens a minute (100 a second) for the server and for each worker.
// A worker alone may send a 10 s burst (990 tokens); the server holds 15 s
// (1,500). Three workers pacing on their own send 2,970 at once and are
// answered 429; sharing one budget they never reach the server's limit,
// whatever the timing: their bucket is smaller and refills slower than its.
const TPM = 6000;

describe.skipIf(!inject('postgresServerUrl'))(
  'rate limits shared by a fleet (Postgres server)',
  () => {
    let fake: FakeOpenAI;
    let target: TestDatabase;
    beforeAll(async () => {
      fake = await startFakeOpenAI({ maxTpm: TPM, maxTpmBurst: 1500 });
      target = await createTestDatabase('postgres');
    });
    afterAll(async () => {
      await fake?.close();
      await target?.drop();
    });

    it('keeps three workers with the same key within one --max-tpm together: no 429', async () => {
      const database = await openMigrated(target.url);
      // ~1,700 tokens: past the fleet's burst, so the pacing is what holds.
      await seedMessages(database.db, sampleTexts(200));
      await database.close();
      const worker = (): RunningCli =>
        startCli(
          'embed',
          ['--no-migrate', '--batch-size', '8', '--concurrency', '2', '--max-tpm', String(TPM)],
          {
            DATABASE_URL: target.url,
            OPENAI_BASE_URL: fake.url,
            OPENAI_API_KEY: 'sk-shared-fleet-key',
            LOG_LEVEL: 'warn',
          },
          { timeoutMs: 120_000 },
        );
      const results = await Promise.all([worker(), worker(), worker()].map((w) => w.result));
      for (const result of results) expect(result.code, result.stderr).toBe(0);
      expect(fake.stats.inputsEmbedded).toBe(200);
      expect(fake.stats.rateLimited).toBe(0);
      // The key is shared through the database as a fingerprint, never itself.
      const check = await openMigrated(target.url);
      try {
        const runs = await check.db.selectFrom('embedding_runs').select('options').execute();
        expect(runs).toHaveLength(3);
        expect(JSON.stringify(runs)).not.toContain('sk-shared-fleet-key');
        const { rows } = await sql<{ key: string }>`
          select key from embedding_rate_limits`.execute(check.db);
        expect(rows).toEqual([
          { key: expect.stringMatching(/^openai\/text-embedding-3-small\/[0-9a-f]{16}$/) },
        ]);
      } finally {
        await check.close();
      }
    }, 120_000);
  },
);
