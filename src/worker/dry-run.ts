import { type Kysely, sql } from 'kysely';
import type { EmbedConfig } from '../config.js';
import type { DB } from '../db/schema.js';
import { knownModel } from '../provider/models.js';
import { countMessages, fetchEligiblePage } from '../sql/messages.js';
import { type PreparedBatch, prepareBatch, requestParts } from './batch.js';

export interface DryRunReport {
  provider: string;
  model: string;
  eligible: number;
  blank: number;
  upToDate: number;
  /** Exact tokens that would be sent (truncated inputs count their kept part, re-counted as the run does). */
  tokens: number;
  requests: number;
  maxInputTokens: number | null;
  overLimit: { count: number; firstIds: string[] };
  truncated: number;
  usdPerMillionTokens: number | null;
  estimatedCostUsd: number | null;
}

// Rows per read; tokens are counted as rows arrive, so memory stays flat.
const PAGE_ROWS = 500;
const FIRST_IDS = 10;

/**
 * What a run with this config would do, without doing it: no row written,
 * no API call. Works before migrations (then every non-blank message counts
 * as eligible) and without an API key.
 */
export async function dryRun(db: Kysely<DB>, config: EmbedConfig): Promise<DryRunReport> {
  const migrated = await hasEmbeddingsTable(db);
  const target = {
    provider: config.provider,
    model: config.model,
    force: config.force || !migrated,
    source: config.messageSource,
  };
  const census = await countMessages(db, target, { migrated });
  const limit = config.effectiveMaxInputTokens;
  const report: DryRunReport = {
    provider: config.provider,
    model: config.model,
    eligible: 0,
    blank: census.blank,
    upToDate: census.upToDate,
    tokens: 0,
    requests: 0,
    maxInputTokens: limit ?? null,
    overLimit: { count: 0, firstIds: [] },
    truncated: 0,
    usdPerMillionTokens: null,
    estimatedCostUsd: null,
  };
  // Pages hold whole batches, so batches fall where a run's claims would;
  // each is prepared and split into requests by the worker's own code.
  const pageRows = config.batchSize * Math.max(1, Math.floor(PAGE_ROWS / config.batchSize));
  // Exact: a dry run counts every input, as a run with --max-tpm does.
  const settings = { maxInputTokens: limit, truncate: config.truncate, countAll: true };
  let cursor: string | null = null;
  while (config.limit === undefined || report.eligible < config.limit) {
    const size = Math.min(pageRows, (config.limit ?? Number.POSITIVE_INFINITY) - report.eligible);
    const page = await fetchEligiblePage(db, target, { after: cursor, upTo: null }, size);
    if (page.length === 0) break;
    cursor = page[page.length - 1]?.id ?? cursor;
    report.eligible += page.length;
    // Counted on the counting thread, a page's batches asked all at once.
    const batches: Array<Promise<PreparedBatch>> = [];
    for (let i = 0; i < page.length; i += config.batchSize) {
      batches.push(prepareBatch(page.slice(i, i + config.batchSize), settings));
    }
    for (const prepared of await Promise.all(batches)) {
      for (const failed of prepared.failed) {
        report.overLimit.count++;
        if (report.overLimit.firstIds.length < FIRST_IDS) {
          report.overLimit.firstIds.push(failed.message.id);
        }
      }
      for (const input of prepared.toSend) {
        report.tokens += input.tokens ?? 0;
        if (input.truncated) report.truncated++;
      }
      report.requests += (await requestParts(prepared.toSend, config)).length;
    }
  }

  const price = config.pricePerMillionTokens ?? knownModel(config.model)?.usdPerMillionTokens;
  if (price !== undefined) {
    report.usdPerMillionTokens = price;
    report.estimatedCostUsd = (report.tokens / 1_000_000) * price;
  }
  return report;
}

async function hasEmbeddingsTable(db: Kysely<DB>): Promise<boolean> {
  const { rows } = await sql<{ exists: boolean }>`
    select to_regclass('message_embeddings') is not null as exists`.execute(db);
  return rows[0]?.exists === true;
}

export function formatDryRun(report: DryRunReport): string {
  const n = (x: number) => x.toLocaleString('en-US');
  const cost =
    report.estimatedCostUsd === null
      ? 'cost unknown for this model (set --price-per-m-tokens)'
      : `estimated cost $${report.estimatedCostUsd.toFixed(4)} at $${report.usdPerMillionTokens}/M tokens`;
  const lines = [
    `pgembed dry run: ${report.provider}/${report.model} (nothing written, no API call)`,
    `  eligible ${n(report.eligible)}, ineligible ${n(report.blank)} blank + ${n(report.upToDate)} already up to date`,
    `  tokens ${n(report.tokens)} in ${n(report.requests)} requests; ${cost}`,
  ];
  if (report.overLimit.count > 0) {
    lines.push(
      `  over the ${report.maxInputTokens}-token limit: ${n(report.overLimit.count)} (ids ${report.overLimit.firstIds.join(', ')}${report.overLimit.count > report.overLimit.firstIds.length ? ', …' : ''}); a strict run stops at the first, --allow-partial skips them, --truncate embeds their first tokens`,
    );
  }
  if (report.truncated > 0) lines.push(`  truncated to the limit: ${n(report.truncated)}`);
  return lines.join('\n');
}
