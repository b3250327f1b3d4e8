import type { Kysely } from 'kysely';
import pLimit, { type LimitFunction } from 'p-limit';
import type { EmbedConfig } from '../config.js';
import { redactUrl } from '../db/connect.js';
import type { EmbeddingColumnType } from '../db/embedding-column.js';
import type { DB } from '../db/schema.js';
import { InterruptedError, oneLine, PgembedError, StrictModeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EmbeddingProvider } from '../provider/client.js';
import type { EmbeddedRow, SkippedRow } from '../sql/batches.js';
import { countMessages, type EligibleMessage, fetchEligiblePage } from '../sql/messages.js';
import { finishRun, insertRun, skipsByReason, touchRun } from '../sql/runs.js';
import { AdaptiveConcurrency } from './adaptive-concurrency.js';
import {
  type BatchOutcome,
  type BatchSettings,
  cutAtFirstFailure,
  type Failure,
  type PreparedBatch,
  prepareBatch,
  sendBatch,
} from './batch.js';
import { commitBatch } from './commit.js';
import { createRateGate } from './rate-gate.js';
import { formatSummary, type RunSummary, type RunTotals, writeManifest } from './summary.js';
import { CommitWatermark } from './watermark.js';

export interface RunDeps {
  db: Kysely<DB>;
  columnType: EmbeddingColumnType;
  /** The backend's binary COPY, when it has one (see Database.copyFromBlob). */
  copyFromBlob?: ((copySql: string, data: Uint8Array) => Promise<void>) | undefined;
  provider: EmbeddingProvider;
  config: EmbedConfig;
  logger: Logger;
  /** Where the human summary goes (stderr in the CLI). */
  report?: (text: string) => void;
  /** How often to log progress and beat the heart between batches. */
  progressIntervalMs?: number;
}

export interface RunOutcome {
  summary: RunSummary;
  exitCode: number;
  /** Why the run failed or stopped; undefined when it finished. */
  error: PgembedError | Error | undefined;
}

const EXIT = { succeeded: 0, partial: 2, failed: 1 } as const;

/**
 * One invocation of the worker: pages through eligible messages with a keyset
 * cursor and commits each batch in its own transaction. `stop()` lets the
 * batch in flight commit (or roll back) and then ends the run as interrupted.
 */
export class EmbedRun {
  #stopSignal: NodeJS.Signals | undefined;
  readonly #abort = new AbortController();

  constructor(private readonly deps: RunDeps) {}

  /** Safe to call more than once; the first signal wins. */
  stop(signal: NodeJS.Signals = 'SIGTERM'): void {
    if (this.#stopSignal) return;
    this.#stopSignal = signal;
    this.#abort.abort(new InterruptedError(signal));
  }

  async run(): Promise<RunOutcome> {
    const { db, config, logger } = this.deps;
    const target = { provider: config.provider, model: config.model, force: config.force };
    const census = await countMessages(db, target);
    const planned = Math.min(census.eligible, config.limit ?? Number.POSITIVE_INFINITY);
    const runId = await insertRun(db, {
      provider: config.provider,
      model: config.model,
      options: runOptions(config),
      planned,
      blank: census.blank,
    });
    const log = logger.child({ run_id: runId });
    log.info(
      { planned, blank: census.blank, up_to_date: census.upToDate, model: config.model },
      'run started',
    );

    const startedAt = Date.now();
    const totals: RunTotals = {
      embedded: 0,
      skipped: 0,
      truncated: 0,
      tokens: 0,
      requests: 0,
      retries: 0,
      batches: 0,
    };
    const progress = setInterval(() => {
      const done = totals.embedded + totals.skipped;
      const rate = done / ((Date.now() - startedAt) / 1000);
      log.info(
        {
          ...totals,
          planned,
          percent: planned ? +((100 * done) / planned).toFixed(1) : 100,
          rate: +rate.toFixed(1),
          eta_s: rate ? Math.round((planned - done) / rate) : null,
        },
        'progress',
      );
      touchRun(db, runId).catch((error) => log.warn({ err: error }, 'heartbeat failed'));
    }, this.deps.progressIntervalMs ?? 5000);
    progress.unref();

    let error: PgembedError | Error | undefined;
    const watermark = new CommitWatermark();
    try {
      await this.#loop(runId, target, totals, log, watermark);
    } catch (caught) {
      error = this.#stopSignal ? new InterruptedError(this.#stopSignal) : asError(caught);
    } finally {
      clearInterval(progress);
    }
    if (!error && this.#stopSignal) error = new InterruptedError(this.#stopSignal);

    const status = error
      ? error instanceof InterruptedError
        ? 'interrupted'
        : 'failed'
      : totals.skipped > 0
        ? 'partial'
        : 'succeeded';
    const skippedIds = await skipsByReason(db, runId);
    const elapsedMs = Date.now() - startedAt;
    const summary: RunSummary = {
      runId,
      status,
      provider: config.provider,
      model: config.model,
      planned,
      ...totals,
      ineligible: { blank: census.blank, upToDate: census.upToDate },
      skippedByReason: Object.fromEntries(
        Object.entries(skippedIds).map(([reason, ids]) => [reason, ids.length]),
      ),
      elapsedMs,
      messagesPerSecond: (totals.embedded + totals.skipped) / Math.max(elapsedMs / 1000, 0.001),
      // maxRSS is in KiB.
      peakRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
      error: error ? oneLine(error) : null,
    };
    // Concurrent commits each wrote the cursor they could see; settle it now.
    await finishRun(db, runId, status, { ...summary }, summary.error, watermark.cursor);
    if (config.manifest) await writeManifest(config.manifest, summary, skippedIds);
    this.deps.report?.(formatSummary(summary, skippedIds));
    log.info(
      { status, ...totals, elapsed_ms: elapsedMs, peak_rss_mib: summary.peakRssMiB },
      'run finished',
    );

    const exitCode =
      error instanceof PgembedError
        ? error.exitCode
        : error
          ? 1
          : EXIT[status as keyof typeof EXIT];
    return { summary, exitCode, error };
  }

  async #loop(
    runId: string,
    target: { provider: string; model: string; force: boolean },
    totals: RunTotals,
    log: Logger,
    watermark: CommitWatermark,
  ): Promise<void> {
    const { db, config } = this.deps;
    const limit = pLimit(config.concurrency);
    const adaptive = new AdaptiveConcurrency(limit, config.concurrency, log);
    const gate = createRateGate(config);
    const inFlight = new Set<Promise<void>>();
    // The failure that ends the run: the one in the earliest batch wins.
    let failure: { seq: number; error: Error } | undefined;
    const fail = (seq: number, error: unknown) => {
      if (!failure || seq < failure.seq) failure = { seq, error: asError(error) };
    };
    const settings: BatchSettings = {
      provider: this.deps.provider,
      maxInputTokens: config.effectiveMaxInputTokens,
      truncate: config.truncate,
      maxRequestInputs: config.maxRequestInputs,
      maxRequestTokens: config.maxRequestTokens,
      beforeAttempt: (tokens) => gate.acquire(tokens),
      onSent: () => adaptive.onSuccess(),
      retry: {
        maxRetries: config.maxRetries,
        maxRetryWaitMs: config.maxRetryWaitMs,
        signal: this.#abort.signal,
        onRetry: ({ error, attempt, delayMs }) => {
          if (error.status === 429) adaptive.onRateLimited();
          log.warn({ attempt, delay_ms: delayMs, err: error.message }, 'retrying request');
        },
      },
    };

    let readCursor: string | null = null;
    let taken = 0;
    let seq = 0;
    let lastPage = false;
    while (!this.#stopSignal && !failure && !lastPage) {
      if (config.limit !== undefined && taken >= config.limit) break;
      // Backpressure: one batch read and tokenized ahead of the free send slots,
      // so reading, tokenizing, sending and committing overlap, while memory
      // holds at most `concurrency` + 1 batches however large the table is.
      while (inFlight.size > adaptive.current) await Promise.race(inFlight);
      if (this.#stopSignal || failure) break;
      const pageSize = Math.min(
        config.batchSize,
        (config.limit ?? Number.POSITIVE_INFINITY) - taken,
      );
      const page = await fetchEligiblePage(db, target, readCursor, pageSize);
      if (page.length === 0) break;
      taken += page.length;
      readCursor = (page[page.length - 1] as EligibleMessage).id;

      let prepared = prepareBatch(page, settings);
      if (!config.allowPartial && prepared.failed.length > 0) {
        // Strict mode knows the run ends here: send nothing after the culprit.
        prepared = cutAtFirstFailure(prepared);
        lastPage = true;
      }
      const batchSeq = ++seq;
      watermark.register(batchSeq, readCursor);
      const task: Promise<void> = this.#processBatch(
        runId,
        batchSeq,
        prepared,
        settings,
        limit,
        watermark,
        totals,
        log,
        () => failure,
        fail,
      )
        .catch((error: unknown) => fail(batchSeq, error))
        .finally(() => inFlight.delete(task));
      inFlight.add(task);
    }
    await Promise.all(inFlight);
    if (failure) throw failure.error;
  }

  /**
   * Sends one batch when a send slot is free, then commits what it got in its
   * own transaction, outside the slot, so the next request need not wait for
   * this commit.
   */
  async #processBatch(
    runId: string,
    seq: number,
    prepared: PreparedBatch,
    settings: BatchSettings,
    sendSlots: LimitFunction,
    watermark: CommitWatermark,
    totals: RunTotals,
    log: Logger,
    currentFailure: () => { seq: number; error: Error } | undefined,
    recordFailure: (seq: number, error: unknown) => void,
  ): Promise<void> {
    const { db, config, columnType } = this.deps;
    const blog = log.child({ batch: seq });
    let latencyMs = 0;
    const outcome = await sendSlots(async () => {
      // Read ahead but not yet sent: after a stop or a failure, it never is.
      if (this.#stopSignal || currentFailure()) return undefined;
      const startedAt = Date.now();
      try {
        const sent = await sendBatch(prepared, settings);
        latencyMs = Date.now() - startedAt;
        return sent;
      } catch (error) {
        // Recorded before the slot is freed: p-limit starts the next queued
        // batch at once, and it must see this failure and not send.
        recordFailure(seq, error);
        throw error;
      }
    });
    if (!outcome) return;
    const page = prepared.messages;

    // Strict mode: keep what precedes the first failure, then stop, so the
    // committed set is the eligible prefix before that message.
    const firstFailure = config.allowPartial ? undefined : outcome.failed[0];
    const earlier = currentFailure();
    if (earlier && earlier.seq < seq && earlier.error instanceof StrictModeError) {
      blog.debug('discarded: a strict-mode failure precedes this batch');
      return;
    }
    const kept = firstFailure
      ? outcome.embedded.filter((e) => e.position < firstFailure.position)
      : outcome.embedded;
    const skipped = firstFailure ? [] : outcome.failed;

    if (kept.length > 0 || skipped.length > 0) {
      const lastHandled = firstFailure ? page[firstFailure.position - 1] : page[page.length - 1];
      const batch = {
        runId,
        provider: config.provider,
        model: config.model,
        batchNo: seq,
        firstMessageId: page[0]?.id as string,
        lastMessageId: lastHandled?.id as string,
        size: kept.length + skipped.length,
        tokens: kept.reduce((sum, e) => sum + e.tokens, 0),
        attempts: outcome.attempts,
        requests: outcome.attempts,
        retries: outcome.attempts - outcome.sends,
        latencyMs,
        cursorId: firstFailure
          ? watermark.cursorWith(seq, lastHandled?.id ?? null)
          : watermark.cursorWith(seq),
      };
      await commitBatch(
        db,
        columnType,
        this.deps.copyFromBlob,
        batch,
        kept.map(toRow),
        skipped.map(toSkip),
      );
      totals.batches += 1;
      totals.embedded += kept.length;
      totals.skipped += skipped.length;
      totals.truncated += kept.filter((e) => e.truncated).length;
      totals.tokens += batch.tokens;
      totals.requests += batch.requests;
      totals.retries += batch.retries;
      blog.debug(
        {
          first_id: batch.firstMessageId,
          last_id: batch.lastMessageId,
          embedded: kept.length,
          skipped: skipped.length,
          attempts: outcome.attempts,
          latency_ms: latencyMs,
        },
        'batch committed',
      );
    }
    watermark.commit(
      seq,
      firstFailure ? (kept.length ? kept[kept.length - 1]?.message.id : null) : undefined,
    );
    for (const failure of skipped) {
      blog.warn({ message_id: failure.message.id, reason: failure.reason }, failure.detail);
    }
    if (firstFailure) throw strictError(firstFailure);
  }
}

function strictError(failure: Failure): StrictModeError {
  const how =
    failure.reason === 'context_length'
      ? `rerun with --allow-partial to skip it (recorded in embedding_skips), or --truncate to embed its first ${failure.limitTokens ?? 'N'} tokens`
      : 'rerun with --allow-partial to skip it (recorded in embedding_skips)';
  return new StrictModeError(
    `message ${failure.message.id} cannot be embedded (${failure.reason}): ${failure.detail}; ${how}`,
  );
}

function toRow(e: BatchOutcome['embedded'][number]): EmbeddedRow {
  return {
    messageId: e.message.id,
    vector: e.vector,
    sha256Hex: e.message.sha256Hex,
    inputTokens: e.tokens,
    truncated: e.truncated,
  };
}

function toSkip(f: Failure): SkippedRow {
  return { messageId: f.message.id, reason: f.reason, detail: f.detail, inputTokens: f.tokens };
}

function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}

/** What the run was asked to do, for the run row; no secrets. */
function runOptions(config: EmbedConfig): Record<string, unknown> {
  return {
    limit: config.limit ?? null,
    batch_size: config.batchSize,
    allow_partial: config.allowPartial,
    dimensions: config.dimensions ?? null,
    force: config.force,
    max_retries: config.maxRetries,
    timeout_ms: config.timeoutMs,
    max_input_tokens: config.effectiveMaxInputTokens ?? null,
    truncate: config.truncate,
    base_url: config.openaiBaseUrl ? redactUrl(config.openaiBaseUrl) : null,
  };
}
