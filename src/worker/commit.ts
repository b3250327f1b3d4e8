import type { Kysely } from 'kysely';
import type { EmbeddingColumnType } from '../db/embedding-column.js';
import type { DB } from '../db/schema.js';
import {
  advanceRun,
  type BatchRecord,
  type EmbeddedRow,
  insertBatch,
  insertSkips,
  type SkippedRow,
  upsertEmbeddings,
  upsertEmbeddingsViaCopy,
} from '../sql/batches.js';

/**
 * One transaction per batch: its vectors, its skips, its progress row and the
 * run's cursor and counts. A crash loses at most the batch in flight and never
 * leaves half of one.
 */
export async function commitBatch(
  db: Kysely<DB>,
  columnType: EmbeddingColumnType,
  copyFromBlob: ((copySql: string, data: Uint8Array) => Promise<void>) | undefined,
  batch: BatchRecord,
  embedded: EmbeddedRow[],
  skipped: SkippedRow[],
): Promise<void> {
  const target = { provider: batch.provider, model: batch.model, runId: batch.runId, columnType };
  const counts = {
    embedded: embedded.length,
    skipped: skipped.length,
    truncated: embedded.filter((e) => e.truncated).length,
  };
  await db.transaction().execute(async (trx) => {
    // Binary COPY where the backend offers it (PGlite) and the type has a
    // binary form we write (halfvec does not); else one multi-row upsert.
    if (copyFromBlob && columnType !== 'halfvec') {
      await upsertEmbeddingsViaCopy(trx, copyFromBlob, { ...target, columnType }, embedded);
    } else {
      await upsertEmbeddings(trx, target, embedded);
    }
    await insertSkips(trx, target, skipped);
    await insertBatch(trx, batch, counts);
    await advanceRun(trx, batch, counts);
  });
}
