import type { Kysely } from 'kysely';
import type { EmbeddingColumnType } from '../db/embedding-column.js';
import type { DB } from '../db/schema.js';
import type { IdType } from '../db/source.js';
import { LeaseLostError } from '../errors.js';
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
import { advanceRange, type RangeKey } from '../sql/ranges.js';

export interface CommitTarget {
  db: Kysely<DB>;
  columnType: EmbeddingColumnType;
  copyFromBlob: ((copySql: string, data: Uint8Array) => Promise<void>) | undefined;
  range: RangeKey;
  leaseMs: number;
  /** The binary COPY stage writes int8 ids; uuid ids take the multi-row upsert. */
  idType: IdType;
}

/**
 * One transaction per batch: its progress row, its range's cursor and lease,
 * its vectors, its skips and the run's counts. A crash loses at most the
 * batch in flight and never leaves half of one. Safe to redo after a lost
 * connection: a batch whose COMMIT did land is found by its row and skipped.
 * Throws LeaseLostError (and writes nothing) when the range is no longer ours.
 */
export async function commitBatch(
  to: CommitTarget,
  batch: BatchRecord,
  embedded: EmbeddedRow[],
  skipped: SkippedRow[],
): Promise<void> {
  const { columnType, copyFromBlob } = to;
  const target = { provider: batch.provider, model: batch.model, runId: batch.runId, columnType };
  const counts = {
    embedded: embedded.length,
    skipped: skipped.length,
    truncated: embedded.filter((e) => e.truncated).length,
  };
  await to.db.transaction().execute(async (trx) => {
    if (!(await insertBatch(trx, batch, counts))) return;
    const held = await advanceRange(trx, to.range, {
      cursorId: batch.cursorId,
      embedded: counts.embedded,
      skipped: counts.skipped,
      leaseMs: to.leaseMs,
    });
    if (!held) {
      throw new LeaseLostError(
        `lease on range ${to.range.rangeNo} of sweep ${to.range.sweepId} lapsed and was taken over; batch ${batch.batchNo} rolled back`,
      );
    }
    // Binary COPY where the backend offers it (PGlite) and the types have a
    // binary form we write (not halfvec, not uuid ids); else one multi-row upsert.
    if (copyFromBlob && columnType !== 'halfvec' && to.idType === 'bigint') {
      await upsertEmbeddingsViaCopy(trx, copyFromBlob, { ...target, columnType }, embedded);
    } else {
      await upsertEmbeddings(trx, target, embedded);
    }
    await insertSkips(trx, target, skipped);
    await advanceRun(trx, batch, counts);
  });
}
