import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import { COPY_COLUMNS, encodeEmbeddingRows } from '../db/copy-binary.js';
import type { DB } from '../db/schema.js';

export interface EmbeddedRow {
  messageId: string;
  vector: Float32Array;
  sha256Hex: string;
  inputTokens: number;
  truncated: boolean;
}

export interface SkippedRow {
  messageId: string;
  /** The content skipped: it is not tried again until it changes (or --retry-skipped). */
  sha256Hex: string;
  reason: string;
  detail: string;
  inputTokens: number | null;
}

export interface BatchRecord {
  runId: string;
  provider: string;
  model: string;
  batchNo: number;
  firstMessageId: string;
  lastMessageId: string;
  size: number;
  tokens: number;
  /** HTTP requests made for the batch, retries included. */
  attempts: number;
  retries: number;
  latencyMs: number;
}

export interface WriteTarget {
  provider: string;
  model: string;
  runId: string;
}

/**
 * Upserts a batch's vectors in one statement. On (provider, model,
 * message_id), so a rerun or an edited message replaces its row, never adds
 * one. `embedding` gives each vector's SQL (a binary parameter or a literal;
 * src/db/embedding-writer.ts chooses, once per backend).
 */
export async function upsertEmbeddings(
  trx: Kysely<DB> | Transaction<DB>,
  target: WriteTarget,
  rows: EmbeddedRow[],
  embedding: (vector: Float32Array) => RawBuilder<unknown>,
): Promise<void> {
  if (rows.length === 0) return;
  await trx
    .insertInto('message_embeddings')
    .values(
      rows.map((r) => ({
        provider: target.provider,
        model: target.model,
        message_id: r.messageId,
        embedding: embedding(r.vector) as RawBuilder<string>,
        dimensions: r.vector.length,
        content_sha256: Buffer.from(r.sha256Hex, 'hex'),
        input_tokens: r.inputTokens,
        truncated: r.truncated,
        run_id: target.runId,
      })),
    )
    .onConflict((oc) =>
      oc.columns(['provider', 'model', 'message_id']).doUpdateSet((eb) => ({
        embedding: eb.ref('excluded.embedding'),
        dimensions: eb.ref('excluded.dimensions'),
        content_sha256: eb.ref('excluded.content_sha256'),
        input_tokens: eb.ref('excluded.input_tokens'),
        truncated: eb.ref('excluded.truncated'),
        run_id: eb.ref('excluded.run_id'),
        embedded_at: sql`now()`,
      })),
    )
    .execute();
}

/** `COPY <into> FROM <data> WITH (FORMAT binary)`, in the caller's transaction (PGliteEngine.copyFrom). */
export type CopyBinary = (into: string, data: Uint8Array) => Promise<void>;

/**
 * The bulk path, for PGlite: the batch's rows of this model deleted, then
 * COPYed in, binary, in the caller's transaction: an upsert in two
 * statements. It was a COPY into a session-local stage table and an
 * INSERT … SELECT … ON CONFLICT from it; the stage table cost its create
 * (if not exists) and, at every commit, its truncation in the file system,
 * and the upsert a plan: 2.0 ms a batch of 8 emails at 16 in flight, against
 * 1.2 ms so, and `commit` 814 ms of the run against 110 ms (BENCHMARKS.md,
 * "The hot path, third pass"). A batch never holds a message
 * twice (claims are unique; a view that repeats an id is refused).
 */
export async function upsertEmbeddingsViaCopy(
  trx: Transaction<DB>,
  copyBinary: CopyBinary,
  target: WriteTarget & { columnType: 'vector' | 'real[]' },
  rows: EmbeddedRow[],
): Promise<void> {
  if (rows.length === 0) return;
  await sql`delete from message_embeddings
    where provider = ${target.provider} and model = ${target.model}
      and message_id = any(${rows.map((r) => r.messageId)}::bigint[])`.execute(trx);
  await copyEmbeddings(copyBinary, target, rows);
}

/** `rows` COPYed into message_embeddings, binary, in the caller's transaction. */
export function copyEmbeddings(
  copyBinary: CopyBinary,
  target: WriteTarget & { columnType: 'vector' | 'real[]' },
  rows: EmbeddedRow[],
): Promise<void> {
  return copyBinary(
    `message_embeddings (${COPY_COLUMNS})`,
    encodeEmbeddingRows(target, rows, target.columnType),
  );
}
