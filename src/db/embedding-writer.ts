import { type RawBuilder, sql, type Transaction } from 'kysely';
import {
  type CopyBinary,
  type EmbeddedRow,
  upsertEmbeddings,
  upsertEmbeddingsViaCopy,
  type WriteTarget,
} from '../sql/batches.js';
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
  return {
    method: 'binary parameters',
    upsert: (trx, target, rows) =>
      upsertEmbeddings(trx, target, rows, (vector) => sql`${encode(vector)}::${type}`),
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
  };
}

function textEmbeddingWriter(columnType: EmbeddingColumnType): EmbeddingWriter {
  const type = sql.raw(columnType);
  const literal = (vector: Float32Array): RawBuilder<unknown> =>
    sql`${vectorLiteral(vector, columnType)}::${type}`;
  return {
    method: 'text',
    upsert: (trx, target, rows) => upsertEmbeddings(trx, target, rows, literal),
  };
}
