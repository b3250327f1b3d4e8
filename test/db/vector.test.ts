import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import type { EmbeddingColumnType } from '../../src/db/names.js';
import { float4ArraySend, parseVector, vectorLiteral, vectorSend } from '../../src/db/vector.js';
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

  // The worker's write path, as each backend chooses it: binary parameters on a
  // server, binary COPY on PGlite (text there for uuid ids). Written twice, so
  // the second write is the upsert that replaces a row.
  const writes = [
    ['vector', 'bigint'],
    ['real[]', 'bigint'],
    ['real[]', 'uuid'],
  ] as const;
  it.for(writes)(
    'writes float32 values bit-exactly into %s with %s ids through the embedding writer',
    async ([type, idType], ctx) => {
      if (type === 'vector' && !hasVector) ctx.skip('this server has no pgvector');
      const schema = `w_${type === 'vector' ? 'vector' : 'real'}_${idType}`;
      await sql`create schema ${sql.id(schema)}`.execute(database.db);
      await sql`create table ${sql.id(schema, 'message_embeddings')} (
          provider text, model text, message_id ${sql.raw(idType)}, embedding ${sql.raw(type)},
          dimensions int, content_sha256 bytea, input_tokens int, truncated boolean, run_id bigint,
          embedded_at timestamptz default now(), unique (provider, model, message_id))`.execute(
        database.db,
      );
      const writer = database.embeddingWriter(type, idType);
      expect(writer.method).toBe(
        backend !== 'pglite' ? 'binary parameters' : idType === 'bigint' ? 'binary COPY' : 'text',
      );
      const id = idType === 'bigint' ? '9007199254740993' : '0b5e3c1a-2f4d-4e6a-8b9c-0d1e2f3a4b5c';
      const original = trickyFloat32s(1536);
      const target = { provider: 'p', model: 'm', runId: '1' };
      for (const vector of [original.map((x) => -x), original]) {
        await database.db.transaction().execute(async (trx) => {
          await sql`set local search_path = ${sql.id(schema)}, public`.execute(trx);
          await writer.upsert(trx, target, [
            { messageId: id, vector, sha256Hex: 'ab'.repeat(32), inputTokens: 7, truncated: true },
          ]);
        });
      }
      const { rows } = await sql<{
        id: string;
        text: string;
        sent: Buffer;
        dimensions: number;
        sha: string;
        truncated: boolean;
      }>`
        select message_id::text as id, embedding::text as text, dimensions,
          ${type === 'vector' ? sql`vector_send(embedding)` : sql`array_send(embedding)`} as sent,
          encode(content_sha256, 'hex') as sha, truncated
        from ${sql.id(schema, 'message_embeddings')}`.execute(database.db);
      expect(rows).toHaveLength(1);
      expect(rows[0]).toMatchObject({
        id,
        dimensions: 1536,
        sha: 'ab'.repeat(32),
        truncated: true,
      });
      expect(parseVector(rows[0]!.text).map(Math.fround)).toEqual(Array.from(original));
      // The server's own binary form of what it stored is byte for byte ours.
      const ours = type === 'vector' ? vectorSend(original) : float4ArraySend(original);
      expect(Buffer.from(rows[0]!.sent).equals(ours)).toBe(true);
    },
  );
});
