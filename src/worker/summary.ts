import { rename, writeFile } from 'node:fs/promises';
import type { RunStatus } from '../db/schema.js';
import { redactValues } from '../redact.js';

/**
 * What a run did and spent. `tokens` and `requests` are what was KEPT: the
 * batches this run committed (our cl100k count of the inputs embedded, the
 * same as their `embedding_batches.tokens`; the HTTP requests made for them,
 * retried and refused attempts included, as `embedding_batches.attempts`).
 * `tokensBilled` and `requestsBilled` are what was BILLED: every request the
 * provider answered, kept or not (a strict-mode stop, a lost lease, a stop
 * signal or a failed commit can throw an answer away), counted the moment
 * the answer arrives.
 */
export interface RunTotals {
  embedded: number;
  skipped: number;
  truncated: number;
  /** Tokens of the inputs whose embeddings were committed (our pre-count). */
  tokens: number;
  /** HTTP requests made for the committed batches, retries included. */
  requests: number;
  retries: number;
  batches: number;
  /**
   * Tokens of every answered request: the provider's `usage.prompt_tokens`
   * where it reports it, else our pre-count of what was sent.
   */
  tokensBilled: number;
  /** Requests the provider answered (HTTP 200), kept or not. */
  requestsBilled: number;
  /** Given back to the queue after their retries ran out, to be tried later. */
  deferred: number;
  /** Claimed, and found with an embedding of their current content already. */
  unchanged: number;
  /** Claimed, and found blank (a stale embedding of theirs removed). */
  blank: number;
  /** Claimed, and found deleted (their embeddings removed). */
  gone: number;
}

export interface RunSummary extends RunTotals {
  runId: string;
  status: Exclude<RunStatus, 'running'>;
  provider: string;
  model: string;
  planned: number;
  ineligible: { blank: number; upToDate: number };
  /**
   * Messages earlier runs skipped, unchanged since and still not embedded:
   * left alone (--retry-skipped tries them), but they make the run partial.
   */
  skippedEarlier: number;
  /** What the reconciliation scan did, when the run made one. */
  reconciled: { scanned: number; enqueued: number; orphansDeleted: number } | null;
  skippedByReason: Record<string, number>;
  elapsedMs: number;
  messagesPerSecond: number;
  /** Peak resident memory of this process so far, in MiB. */
  peakRssMiB: number;
  error: string | null;
}

const FIRST_IDS_SHOWN = 10;

/** The human summary for stderr. Skips are never silent: counts, first ids, and the query for all. */
export function formatSummary(summary: RunSummary, skippedIds: Record<string, string[]>): string {
  const n = (x: number) => x.toLocaleString('en-US');
  const lines = [
    `pgembed run ${summary.runId} ${summary.status}: ${summary.provider}/${summary.model}`,
    `  embedded ${n(summary.embedded)}${summary.truncated ? ` (${n(summary.truncated)} truncated)` : ''}, skipped ${n(summary.skipped)}, ineligible ${n(summary.ineligible.blank)} blank + ${n(summary.ineligible.upToDate)} already up to date`,
    ...(summary.skippedEarlier > 0
      ? [
          `  still skipped from earlier runs: ${n(summary.skippedEarlier)}, their text unchanged (--retry-skipped tries them again)`,
        ]
      : []),
    ...(summary.deferred > 0
      ? [
          `  deferred ${n(summary.deferred)}: retries exhausted; left in the queue for a later run (select * from embedding_queue where last_error is not null)`,
        ]
      : []),
    ...(summary.reconciled
      ? [
          `  reconciled: scanned ${n(summary.reconciled.scanned)} messages, queued ${n(summary.reconciled.enqueued)}, removed ${n(summary.reconciled.orphansDeleted)} embeddings of deleted messages`,
        ]
      : []),
    `  kept: tokens ${n(summary.tokens)}, requests ${n(summary.requests)} (retries ${n(summary.retries)}) in ${n(summary.batches)} committed batches`,
    `  billed: tokens ${n(summary.tokensBilled)} in ${n(summary.requestsBilled)} answered requests, kept or not`,
    `  elapsed ${(summary.elapsedMs / 1000).toFixed(1)} s, ${summary.messagesPerSecond.toFixed(1)} messages/s, peak memory ${summary.peakRssMiB} MiB`,
  ];
  for (const [reason, ids] of Object.entries(skippedIds)) {
    const more = ids.length > FIRST_IDS_SHOWN ? `, … (${ids.length - FIRST_IDS_SHOWN} more)` : '';
    lines.push(
      `  skipped ${reason}: ${n(ids.length)} (ids ${ids.slice(0, FIRST_IDS_SHOWN).join(', ')}${more})`,
    );
  }
  if (summary.skipped > 0) {
    lines.push(
      `  all skips: psql "$DATABASE_URL" -c "select message_id, reason, detail from embedding_skips where run_id = ${summary.runId} order by message_id"`,
    );
  }
  return lines.join('\n');
}

/** Writes the manifest atomically: a reader sees the old file or the whole new one. */
export async function writeManifest(
  file: string,
  summary: RunSummary,
  skippedIds: Record<string, string[]>,
): Promise<void> {
  const temp = `${file}.${process.pid}.tmp`;
  // The error may quote a URL or a secret: redacted like everything stored.
  const manifest = redactValues({ ...summary, skippedIds });
  await writeFile(temp, `${JSON.stringify(manifest, null, 2)}\n`);
  await rename(temp, file);
}
