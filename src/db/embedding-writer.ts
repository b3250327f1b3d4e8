import { type RawBuilder, sql, type Transaction } from 'kysely';
import {
  type CopyBinary,
  copyEmbeddings,
  type EmbeddedRow,
  upsertEmbeddings,
  upsertEmbeddingsViaCopy,
  type WriteTarget,
} from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import type { EmbeddingColumnType, IdType } from './names.js';
import type { DB } from './schema.js';
import { float4ArraySend, vectorLiteral, vectorSend } from './vector.js';

/**
 * How a batch's vectors reach the table: the one place that knows the
 * backends differ. Chosen once per run (Database.embeddingWriter), so the
 * worker only ever calls `upsert`.
 */
export interface EmbeddingWriter {
  /** How vectors travel, for the start log and the bench. */
  readonly method: 'binary COPY' | 'binary parameters' | 'text';
  upsert(trx: Transaction<DB>, target: WriteTarget, rows: EmbeddedRow[]): Promise<void>;
  /**
   * In a batch's commit statement (settleBatch): a CTE body that writes
   * those of `rows` whose ids the CTE `settled (id)` returns, or clears
   * their way; undefined when there is nothing to do there.
   */
  inSettle(scope: ClaimScope, rows: EmbeddedRow[]): RawBuilder<unknown> | undefined;
  /**
   * What follows that statement in its transaction, given the rows that
   * settled: the COPY. Undefined when the statement wrote them: then it is
   * the whole commit, with no transaction around it.
   */
  afterSettle?: (trx: Transaction<DB>, scope: ClaimScope, rows: EmbeddedRow[]) => Promise<void>;
}

/**
 * The upsert as a part of the commit statement: VALUES with every column
 * cast (in a SELECT nothing else types them), filtered by `settled`.
 */
function upsertInSettle(
  scope: ClaimScope,
  rows: EmbeddedRow[],
  embedding: (vector: Float32Array) => RawBuilder<unknown>,
): RawBuilder<unknown> | undefined {
  if (rows.length === 0) return undefined;
  const idType = sql.raw(scope.idType);
  const values = sql.join(
    rows.map(
      (r) =>
        sql`(${r.messageId}::${idType}, ${embedding(r.vector)}, ${r.vector.length}::int,
          ${Buffer.from(r.sha256Hex, 'hex')}::bytea, ${r.inputTokens}::int, ${r.truncated}::bool)`,
    ),
  );
  return sql`insert into message_embeddings as e (provider, model, message_id, embedding,
      dimensions, content_sha256, input_tokens, truncated, run_id)
    select ${scope.provider}, ${scope.model}, v.id, v.embedding, v.dimensions, v.sha, v.tokens,
      v.truncated, ${scope.runId}
    from (values ${values}) as v(id, embedding, dimensions, sha, tokens, truncated)
    where v.id in (select id from settled)
    on conflict (provider, model, message_id) do update set
      embedding = excluded.embedding, dimensions = excluded.dimensions,
      content_sha256 = excluded.content_sha256, input_tokens = excluded.input_tokens,
      truncated = excluded.truncated, run_id = excluded.run_id, embedded_at = now()
    returning 1`;
}

/**
 * A Postgres server: one multi-row upsert whose vectors are binary
 * parameters (node-postgres sends a Buffer in binary format; the cast types
 * the parameter, so the server runs vector_recv/array_recv on the float32
 * bits). No decimal text either way. halfvec has no binary form we write
 * (float16 rounding is the server's), so it goes as text.
 */
export function postgresEmbeddingWriter(columnType: EmbeddingColumnType): EmbeddingWriter {
  if (columnType === 'halfvec') return textEmbeddingWriter(columnType);
  const encode = columnType === 'vector' ? vectorSend : float4ArraySend;
  const type = sql.raw(columnType);
  const embedding = (vector: Float32Array) => sql`${encode(vector)}::${type}`;
  return {
    method: 'binary parameters',
    upsert: (trx, target, rows) => upsertEmbeddings(trx, target, rows, embedding),
    inSettle: (scope, rows) => upsertInSettle(scope, rows, embedding),
  };
}

/**
 * PGlite: the batch's rows deleted, then binary COPY. Its query
 * parameters travel as text, so COPY is its binary path: ~0.14 ms a row
 * against ~2 ms for decimal text (BENCHMARKS.md). The encoder writes bigint
 * ids and no halfvec, so the rest goes as text.
 */
export function pgliteEmbeddingWriter(
  copyBinary: CopyBinary,
  columnType: EmbeddingColumnType,
  idType: IdType,
): EmbeddingWriter {
  if (columnType === 'halfvec' || idType !== 'bigint') return textEmbeddingWriter(columnType);
  return {
    method: 'binary COPY',
    upsert: (trx, target, rows) =>
      upsertEmbeddingsViaCopy(trx, copyBinary, { ...target, columnType }, rows),
    // The old rows go in the statement, the settled rows are COPYed after it.
    inSettle: (scope, rows) =>
      rows.length === 0
        ? undefined
        : sql`delete from message_embeddings
            where provider = ${scope.provider} and model = ${scope.model}
              and message_id = any(${rows.map((r) => r.messageId)}::bigint[])
              and message_id in (select id from settled)
            returning 1`,
    afterSettle: (_trx, scope, rows) =>
      rows.length === 0
        ? Promise.resolve()
        : copyEmbeddings(copyBinary, { ...scope, columnType }, rows),
  };
}

function textEmbeddingWriter(columnType: EmbeddingColumnType): EmbeddingWriter {
  const type = sql.raw(columnType);
  const literal = (vector: Float32Array): RawBuilder<unknown> =>
    sql`${vectorLiteral(vector, columnType)}::${type}`;
  return {
    method: 'text',
    upsert: (trx, target, rows) => upsertEmbeddings(trx, target, rows, literal),
    inSettle: (scope, rows) => upsertInSettle(scope, rows, literal),
  };
}
