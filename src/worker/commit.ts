import type { Kysely } from 'kysely';
import type { EmbeddingWriter } from '../db/embedding-writer.js';
import type { DB } from '../db/schema.js';
import type { BatchRecord, EmbeddedRow } from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import {
  handledIds,
  type Settled,
  type Settlement,
  type SettleOptions,
  settleBatch,
} from '../sql/settle.js';

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
  if (to.writer.afterSettle) return (await commitTogether(to, [{ batch, work }]))[0];
  return committedOf(work, await settleBatch(to.db, to.scope, batch, work, settleOptions(to)));
}

/**
 * Batches of one run committed in one transaction: each batch's statement,
 * then one COPY of every vector they settled. For a writer whose vectors
 * follow the statement (PGlite's COPY): there a batch's transaction spent
 * ~0.7 ms on its begin and commit and ~0.7 ms on its COPY's own start,
 * whatever its size, while commits waited for the one session behind each
 * other (BENCHMARKS.md, "tenth pass"). All or none: the caller commits
 * each alone after a failure, so a batch never fails for another's sake.
 */
export async function commitTogether(
  to: CommitTarget,
  batches: ReadonlyArray<{ batch: BatchRecord | undefined; work: Settlement }>,
): Promise<Array<Committed | undefined>> {
  const after = to.writer.afterSettle;
  if (!after) throw new Error('commitTogether needs a writer whose vectors follow the statement');
  const { scope } = to;
  const options = settleOptions(to);
  const results = await to.db.transaction().execute(async (trx) => {
    const done: Settled[] = [];
    for (const { batch, work } of batches)
      done.push(await settleBatch(trx, scope, batch, work, options));
    await after(
      trx,
      scope,
      batches.flatMap(({ work }, i) => settledVectors(work, done[i] as Settled)),
    );
    return done;
  });
  return results.map((result, i) => committedOf((batches[i] as { work: Settlement }).work, result));
}

function settleOptions(to: CommitTarget): SettleOptions {
  // Over a connection the statement gives way to an application's locks
  // after 200 ms (see settleBatch), and finds a batch already recorded. In
  // PGlite's own thread no lock is ever waited for, and no answer lost.
  return {
    vectors: (rows: EmbeddedRow[]) => to.writer.inSettle(to.scope, rows),
    ...(to.overConnection ? { lockTimeout: '200ms' } : {}),
  };
}

/** The vectors of the messages the statement settled: the only ones written. */
function settledVectors(work: Settlement, done: Settled): EmbeddedRow[] {
  return work.embedded.filter((e) => done.ids.has(e.messageId));
}

/** What a batch's statement did, counted; undefined when it was recorded before. */
function committedOf(work: Settlement, result: Settled): Committed | undefined {
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
