import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildEmbedConfig } from '../../src/config.js';
import { openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { dryRun } from '../../src/worker/dry-run.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { makeRun, sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

const TOO_LONG = 'lorem ipsum dolor sit amet '.repeat(1800);

describe.each(backends())('the dry run on %s', (backend) => {
  let target: TestDatabase;
  let fake: FakeOpenAI;
  beforeAll(async () => {
    target = await createTestDatabase(backend);
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
    await target?.drop();
  });

  it('predicts the requests, tokens and skips of the run that follows, and writes nothing itself', async () => {
    const database = await openMigrated(target.url);
    try {
      const contents = sampleTexts(30);
      contents[6] = TOO_LONG;
      contents[21] = TOO_LONG;
      contents[9] = '   ';
      await seedMessages(database.db, contents);
      const columnType = await readEmbeddingColumnType(database.db);
      const ctx = {
        db: database.db,
        columnType,
        committer: database.batchCommitter(columnType),
        baseUrl: fake.url,
      };
      // Part of it is already embedded, so the dry run must leave those out too.
      await makeRun(ctx, { limit: '5' }).run.run();
      fake.reset();

      // Batches of 4 in id order, as the run claims them from the queue.
      const flags = {
        'batch-size': '4',
        'allow-partial': true,
        'max-request-inputs': '3',
      };
      const config = buildEmbedConfig(flags, { OPENAI_BASE_URL: fake.url });
      const runsBefore = await database.db.selectFrom('embedding_runs').selectAll().execute();
      const report = await dryRun(database.db, config);
      expect(fake.stats.requests).toBe(0);
      expect(await database.db.selectFrom('embedding_runs').selectAll().execute()).toEqual(
        runsBefore,
      );
      expect(report).toMatchObject({
        eligible: 24,
        blank: 1,
        upToDate: 5,
        overLimit: { count: 2, firstIds: ['7', '22'] },
      });
      expect(report.estimatedCostUsd).toBeCloseTo((report.tokens / 1e6) * 0.02, 10);

      const outcome = await makeRun(ctx, flags).run.run();
      expect(outcome.summary.requests).toBe(report.requests);
      expect(outcome.summary.tokens).toBe(report.tokens);
      expect(outcome.summary.skipped).toBe(report.overLimit.count);
      expect(fake.stats.requests).toBe(report.requests);
    } finally {
      await database.close();
    }
  });

  it("works on an application's messages table before pgembed has migrated anything", async () => {
    const fresh = await createTestDatabase(backend);
    const database = await openDatabase(fresh.url);
    try {
      await sql`create table messages (id bigint primary key, content text not null)`.execute(
        database.db,
      );
      await sql`insert into messages values (1, 'hello'), (2, 'world'), (3, '')`.execute(
        database.db,
      );
      const config = buildEmbedConfig({ 'dry-run': true, 'price-per-m-tokens': '1.5' }, {});
      const report = await dryRun(database.db, config);
      expect(report).toMatchObject({ eligible: 2, blank: 1, upToDate: 0, tokens: 2, requests: 1 });
      expect(report.estimatedCostUsd).toBeCloseTo(3e-6, 12);
      const { rows } = await sql<{ n: number }>`
        select count(*)::int as n from information_schema.tables where table_name = 'embedding_runs'`.execute(
        database.db,
      );
      expect(rows[0]?.n).toBe(0);
    } finally {
      await database.close();
      await fresh.drop();
    }
  });
});
