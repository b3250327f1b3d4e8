import type { Kysely } from 'kysely';
import type { EmbeddingWriter } from '../db/embedding-writer.js';
import type { DB } from '../db/schema.js';
import {
  type BatchRecord,
  commitGuard,
  type EmbeddedRow,
  insertSkips,
  recordBatch,
  type SkippedRow,
} from '../sql/batches.js';
import { type ClaimScope, deleteEmbeddingsOf, releaseClaims, settleClaims } from '../sql/queue.js';

/**
 * How a run commits its batches, chosen once per backend
 * (Database.batchCommitter): commitBatch in this process on a Postgres
 * server; on PGlite, in the engine's own thread, so the transaction holds
 * the one session for the engine's time alone, not for a round trip
 * through this thread's event loop per statement.
 */
export interface BatchCommitter {
  /** `db` is the run's handle; PGlite's thread commits through its own. */
  commit(
    db: Kysely<DB>,
    scope: ClaimScope,
    batch: BatchRecord | undefined,
    work: BatchWork,
  ): Promise<Committed | undefined>;
}

/** Commits in this process, writing vectors with `writer`. */
export function localCommitter(writer: EmbeddingWriter): BatchCommitter {
  return { commit: (db, scope, batch, work) => commitBatch({ db, scope, writer }, batch, work) };
}

export interface CommitTarget {
  db: Kysely<DB>;
  scope: ClaimScope;
  writer: EmbeddingWriter;
}

/** What one batch hands to its commit. */
export interface BatchWork {
  /** Each claimed message's queue row version, as read (ClaimedMessage.version). */
  versions: Record<string, string>;
  embedded: EmbeddedRow[];
  skipped: SkippedRow[];
  /** Claimed, found gone: their embeddings (every model's) are orphans. */
  gone: string[];
  /** Claimed, found blank: never embedded; the target's old embedding goes. */
  blank: string[];
  /** Claimed, found with an embedding of their current content: nothing to do. */
  unchanged: string[];
  /** Claimed and failed for now (retries exhausted): back in the queue after a backoff. */
  deferred: string[];
  /** Why they were deferred, for `embedding_queue.last_error`. */
  deferredError?: string;
  /** Claimed and not handled (a stop, a strict-mode cut): back in the queue at once. */
  released: string[];
}

export interface Committed {
  embedded: number;
  skipped: number;
  /** `skipped`, by reason. */
  skippedByReason: Map<string, number>;
  truncated: number;
  tokens: number;
  /** Gone, blank and unchanged messages settled without a request. */
  gone: number;
  blank: number;
  unchanged: number;
  /** Handled from content that changed before the commit: left to be embedded again. */
  changed: number;
}

/**
 * One transaction per batch: the fence (settleClaims: the queue rows this
 * run still holds, unchanged since its claim), then only those
 * rows' vectors and skips, the rest given back, the batch's progress row and
 * the run's counts. A crash loses at most the batch in flight: its claims
 * are released when the run is found dead, and eligibility (no embedding of
 * the current content) is the resume point. Safe to redo after a lost
 * connection: a batch whose COMMIT did land is found by its row.
 */
export async function commitBatch(
  to: CommitTarget,
  batch: BatchRecord | undefined,
  work: BatchWork,
): Promise<Committed | undefined> {
  const { scope } = to;
  return to.db.transaction().execute(async (trx) => {
    // What was handled, by whatever means; the rest goes back unsettled.
    const handledIds = [
      ...work.embedded.map((e) => e.messageId),
      ...work.skipped.map((s) => s.messageId),
      ...work.gone,
      ...work.blank,
      ...work.unchanged,
    ];
    // The capture triggers lock queue rows inside the application's own
    // transactions, in their order; this commit locks them in id order. A
    // deadlock between the two would pick a victim after deadlock_timeout
    // (1 s), perhaps the application. Giving way first keeps it ours: the
    // whole batch is redone (withDbRetry), and the application never fails.
    // So on a server the fence starts the commit (commitGuard): a 200 ms
    // lock_timeout, and nothing settled when a lost COMMIT had landed. With
    // one session no lock is ever waited for, and no answer lost.
    const settled = scope.oneSession
      ? await settleClaims(trx, scope, handledIds, work.versions)
      : await settleClaims(trx, scope, handledIds, work.versions, commitGuard(batch, '200ms'));
    if (!settled) return undefined;
    const embedded = work.embedded.filter((e) => settled.has(e.messageId));
    const skipped = work.skipped.filter((s) => settled.has(s.messageId));
    const gone = work.gone.filter((id) => settled.has(id));
    const blank = work.blank.filter((id) => settled.has(id));
    const target = { provider: scope.provider, model: scope.model, runId: scope.runId };
    await to.writer.upsert(trx, target, embedded);
    await insertSkips(trx, target, skipped);
    await deleteEmbeddingsOf(trx, scope, gone);
    await deleteEmbeddingsOf(trx, scope, blank, 'target');
    // What was handled from a message that changed since, and what was not
    // handled at all, goes back to the queue.
    const changed = handledIds.filter((id) => !settled.has(id));
    await releaseClaims(trx, scope, [...changed, ...work.released]);
    await releaseClaims(trx, scope, work.deferred, {
      error: work.deferredError ?? 'retries exhausted',
    });
    const counts = {
      embedded: embedded.length,
      skipped: skipped.length,
      truncated: embedded.filter((e) => e.truncated).length,
      tokens: embedded.reduce((sum, e) => sum + e.inputTokens, 0),
    };
    if (batch && counts.embedded + counts.skipped > 0) {
      const record = { ...batch, size: counts.embedded + counts.skipped, tokens: counts.tokens };
      await recordBatch(trx, record, counts);
    }
    const skippedByReason = new Map<string, number>();
    for (const s of skipped)
      skippedByReason.set(s.reason, (skippedByReason.get(s.reason) ?? 0) + 1);
    return {
      ...counts,
      skippedByReason,
      gone: gone.length,
      blank: blank.length,
      unchanged: work.unchanged.filter((id) => settled.has(id)).length,
      changed: changed.length,
    };
  });
}
