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

/** Records why each skipped message was not embedded (partial mode). */
export async function insertSkips(
  trx: Transaction<DB>,
  target: { provider: string; model: string; runId: string },
  rows: SkippedRow[],
): Promise<void> {
  if (rows.length === 0) return;
  await trx
    .insertInto('embedding_skips')
    .values(
      rows.map((r) => ({
        run_id: target.runId,
        provider: target.provider,
        model: target.model,
        message_id: r.messageId,
        reason: r.reason,
        detail: r.detail,
        input_tokens: r.inputTokens,
        content_sha256: sql<Buffer>`decode(${r.sha256Hex}, 'hex')`,
      })),
    )
    .onConflict((oc) => oc.columns(['run_id', 'message_id']).doNothing())
    .execute();
}

/**
 * The start of a batch's commit on a server, as two conditions for the
 * fence's statement (settleClaims), so that it costs no round trip of its
 * own: a batch's transaction is mostly round trips.
 */
export interface CommitGuard {
  /** True, and from then on the transaction's lock_timeout is in force (see commit.ts). */
  lockTimeout: RawBuilder<unknown>;
  /**
   * Whether the batch's row exists already: a COMMIT whose answer was lost
   * with the connection did commit, and redoing the batch must write
   * nothing twice.
   */
  recorded: RawBuilder<unknown>;
}

export function commitGuard(batch: BatchRecord | undefined, lockTimeout: string): CommitGuard {
  return {
    lockTimeout: sql`(set_config('lock_timeout', ${lockTimeout}, true) is not null)`,
    recorded: batch
      ? sql`exists (select 1 from embedding_batches
                    where run_id = ${batch.runId} and batch_no = ${batch.batchNo})`
      : sql`false`,
  };
}

/**
 * The durable progress row of one committed batch, and the run's counts
 * advanced by it, in one statement of the batch's transaction, so they never
 * disagree. The run's row is updated last: concurrent batches of a run queue
 * on its lock until each commits.
 */
export async function recordBatch(
  trx: Transaction<DB>,
  batch: BatchRecord,
  counts: { embedded: number; skipped: number; truncated: number },
): Promise<void> {
  // The batch's lock_timeout (commitGuard) is for the queue rows an
  // application's capture triggers may hold; the run's row is this run's
  // alone, and its batches queue on it by design. Giving way there at 200 ms
  // made 64 batches in flight redo their commits (300 retries for 750
  // batches, a commit p99 of 11 s). So the wait is lifted first: the insert
  // reads from `waits`, and the update's lock needs the insert's row.
  await sql`
    with waits as (select set_config('lock_timeout', '0', true)),
    batch as (
      insert into embedding_batches (run_id, batch_no, first_message_id, last_message_id, size,
        embedded, skipped, tokens, attempts, latency_ms)
      select ${batch.runId}, ${batch.batchNo}, ${batch.firstMessageId}, ${batch.lastMessageId},
        ${batch.size}, ${counts.embedded}, ${counts.skipped}, ${batch.tokens}, ${batch.attempts},
        ${batch.latencyMs}
      from waits
      returning run_id)
    update embedding_runs r set
      embedded = r.embedded + ${counts.embedded}, skipped = r.skipped + ${counts.skipped},
      truncated = r.truncated + ${counts.truncated}, tokens = r.tokens + ${batch.tokens},
      requests = r.requests + ${batch.attempts}, retries = r.retries + ${batch.retries},
      batches = r.batches + 1, heartbeat_at = now()
    from batch where r.id = batch.run_id`.execute(trx);
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
  await copyBinary(
    `message_embeddings (${COPY_COLUMNS})`,
    encodeEmbeddingRows(target, rows, target.columnType),
  );
}
