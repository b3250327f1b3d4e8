import { type Kysely, sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { DEFAULT_SOURCE, type EmbeddingColumnType } from '../../src/db/names.js';
import type { DB } from '../../src/db/schema.js';
import { vectorLiteral } from '../../src/db/vector.js';
import { ConfigError } from '../../src/errors.js';
import { createSearchIndex, searchIndexName } from '../../src/sql/index.js';
import {
  dimensionsMismatch,
  embeddedDimensions,
  nearestMessages,
  orderCastFor,
  searchStatement,
} from '../../src/sql/search.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { seedMessages } from '../support/embed-run.js';
import { fakeEmbedding } from '../support/fake-openai.js';

const SMALL = { provider: 'openai', model: 'text-embedding-3-small' };
const LARGE = { provider: 'openai', model: 'text-embedding-3-large' };
const text = (id: number) => `note number ${id}`;

/** Embeddings as the worker stores them, without a run: the fake server's vector of each text. */
async function insertEmbeddings(
  db: Kysely<DB>,
  columnType: EmbeddingColumnType,
  target: { provider: string; model: string },
  ids: number[],
  dimensions: number,
): Promise<void> {
  await db
    .insertInto('message_embeddings')
    .values(
      ids.map((id) => ({
        ...target,
        message_id: String(id),
        embedding: sql<string>`${vectorLiteral(fakeEmbedding(text(id), dimensions), columnType)}::${sql.raw(columnType)}`,
        dimensions,
        content_sha256: Buffer.alloc(32),
        input_tokens: 3,
      })),
    )
    .execute();
}

async function plan(db: Kysely<DB>, statement: ReturnType<typeof searchStatement>) {
  const { rows } = await sql<{ 'QUERY PLAN': string }>`explain ${statement}`.execute(db);
  // The query vector, thousands of digits, shortened so a failure is readable.
  return rows.map((r) => r['QUERY PLAN'].replace(/'\[[^\]]*\]'/g, "'[…]'")).join('\n');
}

const range = (from: number, to: number) =>
  Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe('search and its HNSW index on PGlite with pgvector', () => {
  let database: Database;
  const db = () => database.db;
  const target = (t: { provider: string; model: string }) => ({
    ...t,
    columnType: 'vector' as const,
    source: DEFAULT_SOURCE,
  });

  beforeAll(async () => {
    database = await openMigrated('pglite:memory');
    expect(await readEmbeddingColumnType(db())).toBe('vector');
    await seedMessages(
      db(),
      range(1, 80).map((id) => text(id)),
    );
    // One model at two dimensions (a --dimensions 256 run under another
    // label would look the same), and a model too wide for vector HNSW.
    await insertEmbeddings(db(), 'vector', SMALL, range(1, 60), 1536);
    await insertEmbeddings(db(), 'vector', SMALL, range(61, 70), 256);
    await insertEmbeddings(db(), 'vector', LARGE, range(1, 10), 3072);
    // 80 messages and 140 embeddings: reading them all and sorting costs less
    // than any index, so the planner is told to avoid a sort where it can.
    // Only an index on the very expression search orders by returns rows in
    // that order, so the plan names the index exactly when search can use it;
    // without one it keeps its (disabled) sort. Left free, the planner chooses
    // the HNSW index by itself from about 1,000 rows of a model (checked by
    // hand), too slow to build here.
    await sql`set enable_sort = off`.execute(db());
  });
  afterAll(async () => {
    await database?.close();
  });

  it('orders by embedding::vector(N) under provider, model and dimensions, which npm run index indexes', async () => {
    const query = fakeEmbedding(text(7), 1536);
    const cast = await orderCastFor(db(), 'vector', 1536);
    expect(cast).toMatchObject({ type: 'vector', dimensions: 1536, indexable: true });
    const name = searchIndexName(SMALL.provider, SMALL.model, 1536);
    expect(await plan(db(), searchStatement(target(SMALL), cast, query, 5))).not.toContain(name);

    const index = await createSearchIndex(
      db(),
      'vector',
      { ...SMALL, dimensions: undefined },
      { concurrently: false },
    ).catch((error: Error) => error);
    // Two dimensions stored: the command must be told which.
    expect(index).toBeInstanceOf(ConfigError);
    expect((index as Error).message).toBe(
      'openai/text-embedding-3-small has embeddings at 1536 and 256 dimensions: pass --dimensions 1536 or --dimensions 256 to say which to index',
    );

    const created = await createSearchIndex(
      db(),
      'vector',
      { ...SMALL, dimensions: 1536 },
      { concurrently: false },
    );
    expect(created).toMatchObject({ name, dimensions: 1536, rows: 60, state: 'created' });
    const { rows } = await sql<{ def: string }>`
      select pg_get_indexdef(${name}::regclass) as def`.execute(db());
    expect(rows[0]?.def).toMatch(
      /USING hnsw \(\(\(embedding\)::vector\(1536\)\) vector_cosine_ops\) WHERE \(\(provider = 'openai'::text\) AND \(model = 'text-embedding-3-small'::text\) AND \(dimensions = 1536\)\)/,
    );

    const explained = await plan(db(), searchStatement(target(SMALL), cast, query, 5));
    expect(explained).toContain(`Index Scan using ${name} on message_embeddings e`);
    expect(explained).toMatch(/Order By: \(\(embedding\)::vector\(1536\) <=> /);

    const hits = await nearestMessages(db(), target(SMALL), query, 5);
    expect(hits).toHaveLength(5);
    expect(hits[0]).toMatchObject({ messageId: '7', content: text(7) });
    expect(hits[0]?.similarity).toBeCloseTo(1, 5);
  });

  it('returns k hits through the index when k is over HNSW’s default 40 candidates', async () => {
    await createSearchIndex(
      db(),
      'vector',
      { ...SMALL, dimensions: 1536 },
      { concurrently: false },
    );
    const hits = await nearestMessages(db(), target(SMALL), fakeEmbedding(text(9), 1536), 50);
    expect(hits).toHaveLength(50);
    expect(hits[0]?.messageId).toBe('9');
    expect(new Set(hits.map((h) => h.messageId)).size).toBe(50);
  });

  it('orders and indexes by halfvec(N) above 2,000 dimensions', async () => {
    const cast = await orderCastFor(db(), 'vector', 3072);
    expect(cast).toMatchObject({ type: 'halfvec', dimensions: 3072, indexable: true });
    const created = await createSearchIndex(
      db(),
      'vector',
      { ...LARGE, dimensions: undefined },
      { concurrently: false },
    );
    expect(created).toMatchObject({ dimensions: 3072, rows: 10, state: 'created' });
    const query = fakeEmbedding(text(3), 3072);
    const explained = await plan(db(), searchStatement(target(LARGE), cast, query, 3));
    expect(explained).toContain(`Index Scan using ${created.name} on message_embeddings e`);
    expect(explained).toMatch(/Order By: \(\(embedding\)::halfvec\(3072\) <=> /);
    const hits = await nearestMessages(db(), target(LARGE), query, 3);
    expect(hits[0]?.messageId).toBe('3');
    // Shown exactly, from the stored vector, not the halfvec the order used.
    expect(hits[0]?.similarity).toBeCloseTo(1, 6);
  });

  it('is idempotent: a second run finds the index; an invalid leftover is built again', async () => {
    const args = [db(), 'vector', { ...SMALL, dimensions: 256 }, { concurrently: false }] as const;
    const first = await createSearchIndex(...args);
    expect(first).toMatchObject({ dimensions: 256, rows: 10, state: 'created' });
    const again = await createSearchIndex(...args);
    expect(again).toMatchObject({ name: first.name, state: 'exists' });
    const count = async () =>
      (
        await sql<{ n: number }>`
          select count(*)::int as n from pg_indexes
          where tablename = 'message_embeddings' and indexname like 'pgembed_hnsw_%'`.execute(db())
      ).rows[0]?.n;
    expect(await count()).toBe(3);
    // What an interrupted `create index concurrently` leaves behind.
    await sql`update pg_index set indisvalid = false where indexrelid = ${first.name}::regclass`.execute(
      db(),
    );
    expect(await createSearchIndex(...args)).toMatchObject({
      name: first.name,
      state: 'rebuilt',
    });
    const valid = await sql<{ valid: boolean }>`
      select indisvalid as valid from pg_index where indexrelid = ${first.name}::regclass`.execute(
      db(),
    );
    expect(valid.rows[0]?.valid).toBe(true);
    expect(await count()).toBe(3);
  });

  it('names the stored dimension when asked for one the model does not have', async () => {
    const stored = await embeddedDimensions(db(), SMALL);
    expect(stored).toEqual([
      { dimensions: 1536, count: 60 },
      { dimensions: 256, count: 10 },
    ]);
    expect(dimensionsMismatch(SMALL, 512, stored)).toBe(
      'no embeddings of openai/text-embedding-3-small at 512 dimensions; it has 1536 and 256: pass --dimensions 1536 or --dimensions 256',
    );
    const large = await embeddedDimensions(db(), LARGE);
    expect(dimensionsMismatch(LARGE, 256, large)).toBe(
      'no embeddings of openai/text-embedding-3-large at 256 dimensions; it has 3072: pass --dimensions 3072',
    );
    await expect(
      createSearchIndex(db(), 'vector', { ...LARGE, dimensions: 256 }, { concurrently: false }),
    ).rejects.toThrow(
      'no embeddings of openai/text-embedding-3-large at 256 dimensions; it has 3072: pass --dimensions 3072',
    );
  });

  it('gives deterministic index names of at most 63 bytes', () => {
    const name = searchIndexName('openai', 'text-embedding-3-small', 1536);
    expect(name).toBe(searchIndexName('openai', 'text-embedding-3-small', 1536));
    expect(name).toMatch(/^pgembed_hnsw_openai_text_embedding_3_small_1536_[0-9a-f]{8}$/);
    expect(name).not.toBe(searchIndexName('openai', 'text_embedding_3_small', 1536));
    expect(name).not.toBe(searchIndexName('openai', 'text-embedding-3-small', 256));
    expect(searchIndexName('p'.repeat(80), 'm'.repeat(80), 3072).length).toBeLessThanOrEqual(63);
  });
});

describe.each(backends())('search over real[] on %s', (backend) => {
  let test: TestDatabase;
  let database: Database;
  const db = () => database.db;
  const target = { ...SMALL, columnType: 'real[]' as const, source: DEFAULT_SOURCE };

  beforeAll(async () => {
    test = await createTestDatabase(backend);
    database = await openDatabase(test.url);
    // What a server without pgvector gets (the CI server is one); forced, so
    // a server with pgvector tests the same thing.
    await migrateToLatest(database, { forcedColumnType: 'real[]', warn: () => {} });
    expect(await readEmbeddingColumnType(db())).toBe('real[]');
    await seedMessages(
      db(),
      range(1, 30).map((id) => text(id)),
    );
    await insertEmbeddings(db(), 'real[]', SMALL, range(1, 20), 1536);
    await insertEmbeddings(db(), 'real[]', SMALL, range(21, 30), 256);
  });
  afterAll(async () => {
    await database?.close();
    await test?.drop();
  });

  it('finds the nearest messages exactly, among the rows of the query’s dimension', async () => {
    const hits = await nearestMessages(db(), target, fakeEmbedding(text(12), 1536), 4);
    expect(hits).toHaveLength(4);
    expect(hits[0]).toMatchObject({ messageId: '12', content: text(12) });
    expect(hits[0]?.similarity).toBeCloseTo(1, 5);
    expect(hits.every((h) => Number(h.messageId) <= 20)).toBe(true);
    const short = await nearestMessages(db(), target, fakeEmbedding(text(25), 256), 3);
    expect(short.map((h) => h.messageId)[0]).toBe('25');
    expect(short.every((h) => Number(h.messageId) > 20)).toBe(true);
  });

  it('refuses to index real[] in one line', async () => {
    const attempt = createSearchIndex(
      db(),
      'real[]',
      { ...SMALL, dimensions: undefined },
      { concurrently: backend === 'postgres' },
    );
    await expect(attempt).rejects.toThrow(ConfigError);
    await expect(attempt).rejects.toThrow(
      /^message_embeddings\.embedding is real\[\] \(this server has no pgvector\), which HNSW cannot index: search still works/,
    );
  });
});
