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
import { type ReconcileCounts, reconcile } from '../sql/reconcile.js';

export interface QueueReadiness {
  /** What the scan found, when the run made one. */
  scan: ReconcileCounts | undefined;
  /** Rows of the target no one holds, once ready. */
  pending: number;
}

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

/** The reconciliation scan, with its lines in the log. */
export async function scanSource(deps: ReadyDeps, why: string): Promise<ReconcileCounts> {
  const { db, config, scope, log, dbRetry, going } = deps;
  log.info({ why }, 'reconciling: scanning the source for missing, stale and deleted messages');
  const counts = await dbRetry('reconcile', () =>
    reconcile(db, scope, {
      force: config.force,
      retrySkipped: config.retrySkipped,
      onChunk: going,
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
 * Readies the target's queue for a run: the scan where one is due, deferred
 * rows made due at once for an explicit (one-shot) run, and, in strict mode
 * or with --retry-skipped, the messages earlier runs skipped queued again.
 */
export async function readyQueue(
  deps: ReadyDeps,
  scanWhy: string | undefined,
): Promise<QueueReadiness> {
  const { db, config, scope, log, dbRetry } = deps;
  const scan = scanWhy ? await scanSource(deps, scanWhy) : undefined;
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
  return { scan, pending };
}
