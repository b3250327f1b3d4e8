import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { encodeStageRows } from '../../src/db/copy-binary.js';
import type { EmbeddingColumnType } from '../../src/db/embedding-column.js';
import { parseVector, vectorLiteral } from '../../src/db/vector.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';

// float32 values that are easy to get wrong: extremes, tiny normals, values
// with no short decimal form, and ordinary unit-vector components.
function trickyFloat32s(dimensions: number): Float32Array {
  const values = new Float32Array(dimensions);
  const fixed = [
    3.4028234663852886e38,
    -3.4028234663852886e38,
    1.1754943508222875e-38,
    0.1,
    -1 / 3,
  ];
  let seed = 42;
  for (let i = 0; i < dimensions; i++) {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    values[i] = fixed[i] ?? (seed / 2 ** 31) * 2 - 1;
  }
  return values;
}

describe.each(backends())('vectors on %s', (backend) => {
  let target: TestDatabase;
  let database: Database;
  let hasVector = false;

  beforeAll(async () => {
    target = await createTestDatabase(backend);
    database = await openDatabase(target.url);
    const { rows } = await sql<{ n: number }>`
      select count(*)::int as n from pg_available_extensions where name = 'vector'`.execute(
      database.db,
    );
    hasVector = (rows[0]?.n ?? 0) > 0;
    if (hasVector) await sql`create extension if not exists vector`.execute(database.db);
  });
  afterAll(async () => {
    await database?.close();
    await target?.drop();
  });

  const storageTypes: EmbeddingColumnType[] = ['vector', 'real[]'];
  it.for(storageTypes)('round-trips float32 values exactly through %s', async (type, ctx) => {
    if (type === 'vector' && !hasVector) ctx.skip('this server has no pgvector');
    const table = `rt_${type === 'vector' ? 'vector' : 'real'}`;
    await sql`create table ${sql.table(table)} (id int primary key, embedding ${sql.raw(type)})`.execute(
      database.db,
    );
    const original = trickyFloat32s(1536);
    await sql`insert into ${sql.table(table)} values (1, ${vectorLiteral(original, type)}::${sql.raw(type)})`.execute(
      database.db,
    );
    const { rows } = await sql<{ embedding: string | number[]; text: string }>`
      select embedding, embedding::text as text from ${sql.table(table)}`.execute(database.db);
    for (const read of [rows[0]!.embedding, rows[0]!.text]) {
      const back = parseVector(read).map(Math.fround);
      expect(back).toHaveLength(original.length);
      expect(back).toEqual(Array.from(original));
    }
  });

  it.for(['vector', 'real[]'] as const)(
    'round-trips float32 values exactly through binary COPY into %s',
    async (type, ctx) => {
      if (!database.copyFromBlob) ctx.skip('binary COPY from a blob is the PGlite path');
      if (type === 'vector' && !hasVector) ctx.skip('this server has no pgvector');
      const table = `copy_${type === 'vector' ? 'vector' : 'real'}`;
      await sql`create table ${sql.table(table)} (message_id bigint, embedding ${sql.raw(type)}, dimensions int,
        content_sha256 bytea, input_tokens int, truncated boolean)`.execute(database.db);
      const original = trickyFloat32s(1536);
      const data = encodeStageRows(
        [
          {
            messageId: '9007199254740993',
            vector: original,
            sha256Hex: 'ab'.repeat(32),
            inputTokens: 7,
            truncated: true,
          },
        ],
        type,
      );
      await database.copyFromBlob?.(`copy ${table} from '/dev/blob' with (format binary)`, data);
      const { rows } = await sql<{
        id: string;
        text: string;
        dimensions: number;
        sha: string;
        truncated: boolean;
      }>`
        select message_id::text as id, embedding::text as text, dimensions, encode(content_sha256, 'hex') as sha, truncated
        from ${sql.table(table)}`.execute(database.db);
      expect(rows[0]).toMatchObject({
        id: '9007199254740993',
        dimensions: 1536,
        sha: 'ab'.repeat(32),
        truncated: true,
      });
      expect(parseVector(rows[0]!.text).map(Math.fround)).toEqual(Array.from(original));
    },
  );
});
