import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { runCli } from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';
import { sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';
import { insertEmbeddings } from '../support/queue-fixture.js';

describe.each(backends())('status and search on %s', (backend) => {
  let database: TestDatabase;
  let fake: FakeOpenAI;
  const contents = sampleTexts(30);
  contents[4] = '   ';
  contents[6] = 'the seventh note, about gardening';
  const env = () => ({ DATABASE_URL: database.url, OPENAI_BASE_URL: fake.url });

  beforeAll(async () => {
    database = await createTestDatabase(backend);
    fake = await startFakeOpenAI();
    const migrated = await runCli('migrate', [], { DATABASE_URL: database.url });
    expect(migrated.code, migrated.stderr).toBe(0);
    const db = await openDatabase(database.url);
    try {
      await seedMessages(db.db, contents);
    } finally {
      await db.close();
    }
    const embedded = await runCli('embed', ['--limit', '20', '--max-tokens', '1000000'], env());
    expect(embedded.code, embedded.stderr).toBe(0);
    // One embedded message is edited afterwards: its embedding is stale.
    const edit = await openDatabase(database.url);
    try {
      await sql`update messages set content = 'an edited note' where id = 2`.execute(edit.db);
      // An embedding of a message that is gone, as a source without triggers
      // (a view, --no-triggers) leaves one until a --reconcile scan.
      await insertEmbeddings(
        edit.db,
        await readEmbeddingColumnType(edit.db),
        { provider: 'openai', model: 'text-embedding-3-small' },
        [999],
      );
    } finally {
      await edit.close();
    }
  }, 120_000);
  afterAll(async () => {
    await fake?.close();
    await database?.drop();
  });

  it('reports coverage per model with stale and missing counts, and the runs latest first', async () => {
    const result = await runCli('status', ['--json'], { DATABASE_URL: database.url });
    expect(result.code, result.stderr).toBe(0);
    const report = JSON.parse(result.stdout) as {
      coverage: Array<Record<string, unknown>>;
      runs: Array<Record<string, unknown>>;
      queue: Array<Record<string, unknown>>;
      budgets: Array<Record<string, unknown>>;
    };
    // 29 non-blank messages; 20 embedded, one of them since edited; one orphan.
    expect(report.coverage).toEqual([
      {
        provider: 'openai',
        model: 'text-embedding-3-small',
        eligible: 29,
        upToDate: 19,
        stale: 1,
        missing: 9,
        orphans: 1,
      },
    ]);
    expect(report.budgets).toEqual([
      {
        provider: 'openai',
        model: 'text-embedding-3-small',
        runId: report.runs[0]?.runId,
        perDay: false,
        budgetTokens: 1_000_000,
        spentTokens: expect.any(Number),
      },
    ]);
    expect(report.budgets[0]?.spentTokens).toBeGreaterThan(0);
    expect(report.runs).toHaveLength(1);
    expect(report.runs[0]).toMatchObject({ status: 'succeeded', embedded: 20, skipped: 0 });
    // The --limit left 9 messages in the queue, and the edit queued one more.
    expect(report.queue).toEqual([
      {
        provider: 'openai',
        model: 'text-embedding-3-small',
        pending: 10,
        claimed: 0,
        backingOff: 0,
        lagSeconds: expect.any(Number),
        lastError: null,
        backfilled: true,
      },
    ]);

    const text = await runCli('status', [], { DATABASE_URL: database.url });
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain(
      'openai/text-embedding-3-small: 19 / 29 (65.5%), stale 1, missing 9, orphans 1 (of deleted messages; a --reconcile run removes them)\n',
    );
    expect(text.stdout).toMatch(
      /spend budget \(the latest run of each model that set one\):\n {2}openai\/text-embedding-3-small: \d+ of 1,000,000 tokens billed by run \d+, [\d,]+ left\n/,
    );
    expect(text.stdout).toMatch(/run \d+ succeeded +openai\/text-embedding-3-small: embedded 20/);
    expect(text.stdout).toMatch(
      /openai\/text-embedding-3-small: 10 pending \(0 claimed\), lag \d+ (s|min)\n/,
    );
  }, 60_000);

  it('finds a message by its own text first, with the same provider the embeddings came from', async () => {
    const result = await runCli('search', [contents[6] as string, '-k', '3', '--json'], env());
    expect(result.code, result.stderr).toBe(0);
    const { hits } = JSON.parse(result.stdout) as {
      hits: Array<{ messageId: string; similarity: number }>;
    };
    expect(hits).toHaveLength(3);
    expect(hits[0]?.messageId).toBe('7');
    expect(hits[0]?.similarity).toBeCloseTo(1, 5);
    expect(hits[1]?.similarity).toBeLessThan(0.99);

    const text = await runCli('search', [contents[6] as string, '-k', '2'], env());
    expect(text.stdout.split('\n')[1]).toBe(
      '  1. 1.000  message 7  the seventh note, about gardening',
    );
  }, 60_000);

  it('says what to do when the model has no embeddings or the query is missing', async () => {
    const none = await runCli('search', ['hello', '--model', 'text-embedding-3-large'], env());
    expect(none.code).toBe(1);
    expect(none.stderr.trim()).toMatch(
      /^pgembed: no embeddings for openai\/text-embedding-3-large yet: run `pgembed embed`/,
    );
    const empty = await runCli('search', [], env());
    expect(empty.code).toBe(1);
    expect(empty.stderr.trim()).toMatch(/^pgembed: give the text to search for/);
  }, 60_000);
});
