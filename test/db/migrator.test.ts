import { sql } from 'kysely';
import { afterEach, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { migrateToLatest } from '../../src/db/migrator.js';
import { MigrationError } from '../../src/errors.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';

async function serverHasPgvector(database: Database): Promise<boolean> {
  const { rows } = await sql<{ n: number }>`
    select count(*)::int as n from pg_available_extensions where name = 'vector'`.execute(
    database.db,
  );
  return (rows[0]?.n ?? 0) > 0;
}

describe.each(backends())('migrations on %s', (backend) => {
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()?.();
  });
  async function fresh(): Promise<{ target: TestDatabase; database: Database }> {
    const target = await createTestDatabase(backend);
    const database = await openDatabase(target.url);
    cleanups.push(
      () => target.drop(),
      () => database.close(),
    );
    return { target, database };
  }

  it('creates every contract table and the second run applies nothing', async () => {
    const { database } = await fresh();
    const warnings: string[] = [];
    const first = await migrateToLatest(database, { warn: (m) => warnings.push(m) });
    expect(first.applied.length).toBeGreaterThan(0);

    const { rows } = await sql<{ table_name: string }>`
      select table_name from information_schema.tables where table_schema = current_schema()
      order by table_name`.execute(database.db);
    expect(rows.map((r) => r.table_name)).toEqual(
      expect.arrayContaining([
        'messages',
        'message_embeddings',
        'embedding_runs',
        'embedding_batches',
        'embedding_skips',
        'embedding_progress',
      ]),
    );

    const second = await migrateToLatest(database, { warn: (m) => warnings.push(m) });
    expect(second.applied).toEqual([]);
    // The fallback warning is said once, when the column is created, not on every start.
    expect(warnings.length).toBeLessThanOrEqual(1);
  });

  it('gives every run its billed spend beside the kept one, 0 unless written, in the progress view too', async () => {
    const { database } = await fresh();
    await migrateToLatest(database, { warn: () => {} });
    await sql`insert into embedding_runs (provider, model, host, pid) values ('p', 'm', 'h', 1)`.execute(
      database.db,
    );
    const { rows } = await sql<Record<string, unknown>>`
      select tokens, requests, tokens_billed, requests_billed from embedding_progress`.execute(
      database.db,
    );
    expect(rows).toEqual([{ tokens: '0', requests: 0, tokens_billed: '0', requests_billed: 0 }]);
  });

  it('lets an application insert a message with only an id and content', async () => {
    const { database } = await fresh();
    await migrateToLatest(database, { warn: () => {} });
    await sql`insert into messages (id, content) values (1, 'hello')`.execute(database.db);
    const row = await database.db.selectFrom('messages').selectAll().executeTakeFirstOrThrow();
    expect(row).toMatchObject({ id: '1', content: 'hello', role: null });
    expect(row.created_at).toBeInstanceOf(Date);
  });

  it('keeps a vector that fits a page in its row, uncompressed, and still stores one that does not', async () => {
    const { database } = await fresh();
    const { embeddingColumnType } = await migrateToLatest(database, { warn: () => {} });
    const writer = database.embeddingWriter(embeddingColumnType, 'bigint');
    const target = { provider: 'p', model: 'm', runId: '1' };
    const row = (messageId: string, dimensions: number) => ({
      messageId,
      vector: new Float32Array(dimensions).map((_, i) => Math.sin(i)),
      sha256Hex: 'ab'.repeat(32),
      inputTokens: 1,
      truncated: false,
    });
    await database.db
      .transaction()
      .execute((trx) => writer.upsert(trx, target, [row('1', 1536), row('2', 3072)]));
    const { rows } = await sql<{ toast: string }>`
      select reltoastrelid::regclass::text as toast from pg_class
      where oid = 'message_embeddings'::regclass`.execute(database.db);
    const { rows: outOfLine } = await sql<{ n: number }>`
      select count(distinct chunk_id)::int as n from ${sql.raw(rows[0]!.toast)}`.execute(
      database.db,
    );
    // 1,536 float32s (~6 KB) stay in the row; 3,072 (12 KB) cannot fit a page and go out of line.
    expect(outOfLine[0]!.n).toBe(1);
    const stored = await database.db
      .selectFrom('message_embeddings')
      .select(['message_id', 'dimensions'])
      .orderBy('message_id')
      .execute();
    expect(stored).toEqual([
      { message_id: '1', dimensions: 1536 },
      { message_id: '2', dimensions: 3072 },
    ]);
  });

  it('uses pgvector where the server has it and falls back to real[] with one warning where it does not', async () => {
    const { database } = await fresh();
    const hasVector = await serverHasPgvector(database);
    const warnings: string[] = [];
    const result = await migrateToLatest(database, { warn: (m) => warnings.push(m) });
    if (hasVector) {
      expect(result.embeddingColumnType).toBe('vector');
      expect(warnings).toEqual([]);
    } else {
      expect(result.embeddingColumnType).toBe('real[]');
      expect(warnings).toHaveLength(1);
      expect(warnings[0]).toMatch(/no pgvector.*real\[\].*pgvector\/pgvector/);
    }
    expect(await readEmbeddingColumnType(database.db)).toBe(result.embeddingColumnType);
  });

  it('applies once when two migrators start at the same moment', async () => {
    const { target, database: a } = await fresh();
    // Separate handles on a server (separate pools, so a real race); one shared
    // handle on PGlite, whose directory one process opens once.
    const b = backend === 'postgres' ? await openDatabase(target.url) : a;
    try {
      const results = await Promise.all([
        migrateToLatest(a, { warn: () => {} }),
        migrateToLatest(b, { warn: () => {} }),
      ]);
      const appliedTotal = results.flatMap((r) => r.applied);
      expect(new Set(appliedTotal).size).toBe(appliedTotal.length);
      expect(results.some((r) => r.applied.length === 0)).toBe(true);
      const { rows } = await sql<{ n: number }>`
        select count(*)::int as n from kysely_migration`.execute(a.db);
      expect(rows[0]?.n).toBe(appliedTotal.length);
    } finally {
      if (b !== a) await b.close();
    }
  });

  it('stores real[] when EMBEDDING_COLUMN_TYPE forces it, even where pgvector exists', async () => {
    const { database } = await fresh();
    const result = await migrateToLatest(database, { forcedColumnType: 'real[]', warn: () => {} });
    expect(result.embeddingColumnType).toBe('real[]');
  });

  it('refuses a forced vector type on a server without pgvector, saying how to get it', async (ctx) => {
    const { database } = await fresh();
    if (await serverHasPgvector(database)) {
      const result = await migrateToLatest(database, {
        forcedColumnType: 'halfvec',
        warn: () => {},
      });
      expect(result.embeddingColumnType).toBe('halfvec');
      ctx.skip('this server has pgvector, so a forced type succeeds (checked above)');
    }
    const attempt = migrateToLatest(database, { forcedColumnType: 'vector', warn: () => {} });
    await expect(attempt).rejects.toBeInstanceOf(MigrationError);
    await expect(attempt).rejects.toThrow(/EMBEDDING_COLUMN_TYPE=vector.*pgvector\/pgvector:pg17/);
    // Nothing half-made: the failed migration rolled back.
    const { rows } = await sql<{ n: number }>`
      select count(*)::int as n from information_schema.tables
      where table_name = 'message_embeddings'`.execute(database.db);
    expect(rows[0]?.n).toBe(0);
  });

  it('refuses a forced type that contradicts the column already created', async () => {
    const { database } = await fresh();
    await migrateToLatest(database, { forcedColumnType: 'real[]', warn: () => {} });
    await expect(
      migrateToLatest(database, { forcedColumnType: 'vector', warn: () => {} }),
    ).rejects.toThrow(
      /EMBEDDING_COLUMN_TYPE=vector but message_embeddings.embedding is already real\[\]/,
    );
  });
});
