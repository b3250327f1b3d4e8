import { rename, writeFile } from 'node:fs/promises';
import type { RunStatus } from '../db/schema.js';
import { redactValues } from '../redact.js';

export interface RunTotals {
  embedded: number;
  skipped: number;
  truncated: number;
  tokens: number;
  requests: number;
  retries: number;
  batches: number;
}

export interface RunSummary extends RunTotals {
  runId: string;
  status: Exclude<RunStatus, 'running'>;
  provider: string;
  model: string;
  planned: number;
  ineligible: { blank: number; upToDate: number };
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
    `  tokens ${n(summary.tokens)}, requests ${n(summary.requests)}, retries ${n(summary.retries)}, elapsed ${(summary.elapsedMs / 1000).toFixed(1)} s, ${summary.messagesPerSecond.toFixed(1)} messages/s, peak memory ${summary.peakRssMiB} MiB`,
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
