import type { Kysely } from 'kysely';
import type { EmbedConfig } from '../config.js';
import type { DB } from '../db/schema.js';
import { firstDuplicateId } from '../db/source.js';
import type { Logger } from '../log.js';
import type { CaptureMode } from '../sql/capture.js';
import {
  analyzeQueueIfStale,
  type ClaimScope,
  clearBackoff,
  enqueueSkipped,
  pendingCount,
} from '../sql/queue.js';
import { ChunkSizer, type ClaimSink, type ReconcileCounts, reconcile } from '../sql/reconcile.js';
import { BackgroundScan } from './background-scan.js';
import { ScanHandoff } from './scan-handoff.js';

interface ReadyDeps {
  db: Kysely<DB>;
  config: EmbedConfig;
  scope: ClaimScope;
  log: Logger;
  dbRetry: <T>(what: string, fn: () => Promise<T>) => Promise<T>;
  /** False once the run is stopping: a scan ends at its next chunk. */
  going: () => boolean;
}

/**
 * Why the run must scan the source before it trusts the queue, if it must:
 * the triggers cannot vouch for what happened before the target existed, on
 * a source without them, or where the user asks.
 */
export function scanReason(
  config: EmbedConfig,
  target: { backfilledAt: Date | null },
  capture: CaptureMode,
): string | undefined {
  if (!target.backfilledAt) return 'first run for this model';
  if (capture === 'reconcile') return 'the source has no triggers';
  if (config.reconcile) return '--reconcile';
  if (config.force) return '--force';
  if (config.retrySkipped) return '--retry-skipped';
  return undefined;
}

/**
 * The reconciliation scan, with its lines in the log. `onChunk` hears of
 * each chunk committed, with the totals so far.
 */
export async function scanSource(
  deps: ReadyDeps,
  why: string,
  onChunk?: (counts: ReconcileCounts) => Promise<void>,
  claims?: ClaimSink,
): Promise<ReconcileCounts> {
  const { db, config, scope, log, dbRetry, going } = deps;
  log.info({ why }, 'reconciling: scanning the source for missing, stale and deleted messages');
  const counts = await dbRetry('reconcile', () =>
    reconcile(db, scope, {
      force: config.force,
      retrySkipped: config.retrySkipped,
      ...(claims ? { claims } : {}),
      onChunk: async (sofar) => {
        await onChunk?.(sofar);
        return going();
      },
    }),
  ).catch(async (caught: unknown) => {
    // 21000: one chunk queued an id twice, so the source (a view) returns
    // it twice. Say which, rather than Postgres's words.
    if ((caught as { code?: string }).code !== '21000') throw caught;
    throw (await firstDuplicateId(db, config.messageSource, null)) ?? caught;
  });
  log.info({ ...counts }, 'reconciled');
  return counts;
}

/**
 * Starts the scan beside the pipeline (BackgroundScan): the run claims what
 * its chunks have queued while it queues the rest. A one-shot run on one
 * session (PGlite; see ClaimSink) takes what they find as they find it
 * (ScanHandoff), holding at most two rounds of its send slots
 * (2 × `--concurrency` × `--batch-size`, 64 to 5,000 messages), about as
 * many as its batches in flight: a second process starting beside it finds
 * the rest unclaimed, and the scan reads the source at the pace of the
 * sends. A watcher's scan only queues, so that live changes, claimed oldest
 * first, never wait behind a whole backfill. `pendingBefore`: the rows the
 * queue held before it. After each chunk the queue is analyzed if its
 * statistics have fallen far behind (a first scan of a million messages
 * passes 10,000, 20,000, 40,000 … rows queued: about 7 ANALYZEs), since the
 * claims that run meanwhile are planned on them; `onChunk` hears of each
 * chunk, with the scan's totals so far.
 */
export function scanBeside(
  deps: ReadyDeps,
  why: string,
  pendingBefore: number,
  onChunk: (counts: ReconcileCounts) => Promise<void>,
): BackgroundScan<ReconcileCounts> {
  const { db, config, scope, log, dbRetry } = deps;
  const handoff =
    config.watch || !scope.oneSession
      ? undefined
      : new ScanHandoff(
          Math.min(ChunkSizer.MAX, Math.max(64, 2 * config.concurrency * config.batchSize)),
        );
  return new BackgroundScan(
    (chunkDone) =>
      scanSource(
        deps,
        why,
        async (counts) => {
          // What the run took as the scan found it is settled since, or
          // soon will be. Counted as queued, ANALYZE ran at every chunk
          // once a first run had passed 10,000 messages.
          const queued = pendingBefore + counts.enqueued - (handoff?.claimed ?? 0);
          if (await dbRetry('analyze the queue', () => analyzeQueueIfStale(db, queued))) {
            log.info({ queued }, 'analyzed the queue: its statistics were behind what it holds');
          }
          // The reader first, the plan's record after: on PGlite the run's
          // first pages waited 12 ms for it behind the engine's first
          // statements (BENCHMARKS.md, "twelfth pass").
          chunkDone();
          await onChunk(counts);
          await handoff?.roomAgain();
        },
        handoff,
      ),
    handoff,
  );
}

/**
 * Readies the target's queue for a run, before any scan: deferred rows made
 * due at once for an explicit (one-shot) run, and, in strict mode or with
 * --retry-skipped, the messages earlier runs skipped queued again. Then the
 * rows no one holds are counted, and the queue analyzed if its statistics
 * are far behind them. Resolves with that count.
 */
export async function readyQueue(deps: ReadyDeps): Promise<number> {
  const { db, config, scope, log, dbRetry } = deps;
  if (!config.watch) {
    await dbRetry('ready deferred messages', () => clearBackoff(db, scope.targetId));
  }
  if (config.retrySkipped || !config.allowPartial) {
    // Strict mode stops on a message it cannot embed, even one an earlier
    // --allow-partial run skipped: complete, or it says which is not.
    const retried = await dbRetry('queue the skipped', () => enqueueSkipped(db, scope));
    if (retried > 0) log.info({ messages: retried }, 'trying again messages skipped before');
  }
  const pending = await dbRetry('count the queue', () => pendingCount(db, scope.targetId));
  if (await dbRetry('analyze the queue', () => analyzeQueueIfStale(db, pending))) {
    log.info({ pending }, 'analyzed the queue: its statistics were behind what it holds');
  }
  return pending;
}
