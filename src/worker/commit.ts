import type { Kysely } from 'kysely';
import type { EmbeddingWriter } from '../db/embedding-writer.js';
import type { DB } from '../db/schema.js';
import type { BatchRecord, EmbeddedRow } from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import { handledIds, type Settlement, settleBatch } from '../sql/settle.js';

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
    work: Settlement,
  ): Promise<Committed | undefined>;
}

/**
 * Commits in this process, writing vectors with `writer`. `overConnection`:
 * the statements travel over a connection (a Postgres server, or PGlite
 * served over its socket), whose answer can be lost after the commit landed
 * and, on a server, whose locks can be waited for; false in PGlite's own
 * thread, where neither can happen.
 */
export function localCommitter(
  writer: EmbeddingWriter,
  options: { overConnection: boolean },
): BatchCommitter {
  const { overConnection } = options;
  return {
    commit: (db, scope, batch, work) =>
      commitBatch({ db, scope, writer, overConnection }, batch, work),
  };
}

export interface CommitTarget {
  db: Kysely<DB>;
  scope: ClaimScope;
  writer: EmbeddingWriter;
  /** See localCommitter. */
  overConnection: boolean;
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
 * One statement per batch (settleBatch): the fence (the queue rows this run
 * still holds, unchanged since its claim), then only those rows' vectors
 * and skips, the rest given back, the batch's progress row and the run's
 * counts. On PGlite the settled rows' vectors are COPYed after it, in the
 * same transaction. A crash loses at most the batch in flight: its claims
 * are released when the run is found dead, and eligibility (no embedding of
 * the current content) is the resume point. Safe to redo after a lost
 * connection: a batch whose commit did land is found by its row.
 */
export async function commitBatch(
  to: CommitTarget,
  batch: BatchRecord | undefined,
  work: Settlement,
): Promise<Committed | undefined> {
  const { scope, writer } = to;
  // Over a connection the statement gives way to an application's locks
  // after 200 ms (see settleBatch), and finds a batch already recorded. In
  // PGlite's own thread no lock is ever waited for, and no answer lost.
  const options = {
    vectors: (rows: EmbeddedRow[]) => writer.inSettle(scope, rows),
    ...(to.overConnection ? { lockTimeout: '200ms' } : {}),
  };
  const after = writer.afterSettle;
  const result = after
    ? await to.db.transaction().execute(async (trx) => {
        const done = await settleBatch(trx, scope, batch, work, options);
        await after(
          trx,
          scope,
          work.embedded.filter((e) => done.ids.has(e.messageId)),
        );
        return done;
      })
    : await settleBatch(to.db, scope, batch, work, options);
  if (result.recorded) return undefined;
  const settled = result.ids;
  const embedded = work.embedded.filter((e) => settled.has(e.messageId));
  const skipped = work.skipped.filter((s) => settled.has(s.messageId));
  const skippedByReason = new Map<string, number>();
  for (const s of skipped) skippedByReason.set(s.reason, (skippedByReason.get(s.reason) ?? 0) + 1);
  return {
    embedded: embedded.length,
    skipped: skipped.length,
    truncated: embedded.filter((e) => e.truncated).length,
    tokens: embedded.reduce((sum, e) => sum + e.inputTokens, 0),
    skippedByReason,
    gone: work.gone.filter((id) => settled.has(id)).length,
    blank: work.blank.filter((id) => settled.has(id)).length,
    unchanged: work.unchanged.filter((id) => settled.has(id)).length,
    changed: handledIds(work).filter((id) => !settled.has(id)).length,
  };
}
