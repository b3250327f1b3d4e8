import type { Kysely } from 'kysely';
import type { EmbedConfig } from '../config.js';
import type { EmbeddingColumnType } from '../db/embedding-column.js';
import { withDbRetry } from '../db/retry.js';
import type { DB } from '../db/schema.js';
import type { IdType } from '../db/source.js';
import { asError, InterruptedError, oneLine, PgembedError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EmbeddingProvider } from '../provider/client.js';
import { redactUrl } from '../redact.js';
import type { ProgressDisplay } from '../report/progress-bar.js';
import { countMessages } from '../sql/messages.js';
import { openSweep } from '../sql/ranges.js';
import {
  finishRun,
  insertRun,
  markAbandonedRuns,
  setRunSweep,
  skipsByReason,
  touchRun,
} from '../sql/runs.js';
import { runPipeline } from './pipeline.js';
import { formatSummary, type RunSummary, type RunTotals, writeManifest } from './summary.js';
import { highestId } from './watermark.js';

export interface RunDeps {
  db: Kysely<DB>;
  columnType: EmbeddingColumnType;
  /** The source's id type; default bigint. */
  idType?: IdType | undefined;
  /** The backend's binary COPY, when it has one (see Database.copyFromBlob). */
  copyFromBlob?: ((copySql: string, data: Uint8Array) => Promise<void>) | undefined;
  provider: EmbeddingProvider;
  config: EmbedConfig;
  logger: Logger;
  /** Where the human summary goes (stderr in the CLI). */
  report?: (text: string) => void;
  /** How often to log progress and beat the heart between batches. */
  progressIntervalMs?: number;
  /** A terminal progress bar; when given, it replaces the periodic progress log lines. */
  progressDisplay?: ProgressDisplay | undefined;
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

  /**
   * Safe to call more than once; the first signal wins. The progress bar is
   * taken down at once, before anything else is written (the caller's own
   * warning should come after this call): what the run writes while it winds
   * down, and the summary, then never land under or inside the bar.
   */
  stop(signal: NodeJS.Signals = 'SIGTERM'): void {
    if (this.#stopSignal) return;
    this.#stopSignal = signal;
    this.#stopDisplay();
    this.#abort.abort(new InterruptedError(signal));
  }

  #displayStopped = false;
  /** Takes the progress bar down; once, and never redrawn after. */
  #stopDisplay(): void {
    if (this.#displayStopped) return;
    this.#displayStopped = true;
    this.deps.progressDisplay?.stop();
  }

  async run(): Promise<RunOutcome> {
    const { db, config, logger } = this.deps;
    const target = {
      provider: config.provider,
      model: config.model,
      force: config.force,
      source: config.messageSource,
    };
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
    const dbRetry = <T>(what: string, fn: () => Promise<T>) =>
      withDbRetry(what, fn, { retryMs: config.dbRetryMs, log });
    const abandoned = await dbRetry('mark abandoned runs', () => markAbandonedRuns(db));
    if (abandoned > 0) log.warn({ runs: abandoned }, 'marked runs without a heartbeat abandoned');
    const sweep = await dbRetry('open a sweep', () =>
      openSweep(db, target, { rangeSize: config.rangeSize, runId }),
    );
    await dbRetry('record the sweep', () => setRunSweep(db, runId, sweep.id));
    log.info(
      {
        planned,
        blank: census.blank,
        up_to_date: census.upToDate,
        model: config.model,
        sweep_id: sweep.id,
        sweep_ranges: sweep.ranges,
        sweep: sweep.created ? 'planned' : 'joined',
      },
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
      tokensBilled: 0,
      requestsBilled: 0,
    };
    // Not shown at all if a stop came before it could start.
    const display = this.#displayStopped ? undefined : this.deps.progressDisplay;
    display?.start(planned);
    const progress = setInterval(
      () => {
        const done = totals.embedded + totals.skipped;
        const rate = done / ((Date.now() - startedAt) / 1000);
        if (display) {
          if (!this.#displayStopped) display.update(done, { ...totals, ratePerSecond: rate });
          return;
        }
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
      },
      display ? 250 : (this.deps.progressIntervalMs ?? 5000),
    );
    progress.unref();
    // The run's heartbeat, for the progress view and for takers to tell a
    // dead run; the pipeline renews its leases on the same beat, a third of
    // the lease, so two beats can fail in a blip before a range may be taken.
    const heartbeatMs = Math.min(this.deps.progressIntervalMs ?? 5000, config.leaseMs / 3);
    // It carries the spend billed so far, so a run that dies still shows it.
    const heartbeat = setInterval(() => {
      touchRun(db, runId, totals).catch((error: unknown) =>
        log.warn({ err: oneLine(error) }, 'heartbeat failed'),
      );
    }, heartbeatMs);
    heartbeat.unref();

    let error: PgembedError | Error | undefined;
    const cursors: Array<string | null> = [];
    try {
      let current = sweep;
      let limitLeft = config.limit;
      const batchNumbers = { last: 0 };
      // At most two passes: the sweep it joined, then one planned after it started.
      for (let passNo = 1; ; passNo++) {
        const pass = await runPipeline({
          deps: this.deps,
          runId,
          sweepId: current.id,
          target,
          totals,
          log,
          stopped: () => this.#stopSignal,
          abortSignal: this.#abort.signal,
          dbRetry,
          limit: limitLeft,
          batchNumbers,
          heartbeatMs,
        });
        cursors.push(pass.cursorId);
        if (pass.error) throw pass.error;
        // A --force sweep re-embeds everything anyway: a second pass would pay twice.
        if (this.#stopSignal || target.force || passNo === 2 || !current.progressedBeforeJoin) {
          break;
        }
        if (limitLeft !== undefined) limitLeft -= pass.taken;
        if (limitLeft !== undefined && limitLeft <= 0) break;
        // It joined a sweep others had already made progress in: messages
        // behind their cursors may have changed since. One more pass, over a
        // sweep planned now.
        const next = await dbRetry('open a sweep', () =>
          openSweep(db, target, { rangeSize: config.rangeSize, runId }),
        );
        if (next.id === current.id) break; // still open: other workers are finishing it
        await dbRetry('record the sweep', () => setRunSweep(db, runId, next.id));
        log.info(
          {
            sweep_id: next.id,
            sweep_ranges: next.ranges,
            sweep: next.created ? 'planned' : 'joined',
          },
          'the joined sweep had progress from before this run joined; one more pass over a new sweep',
        );
        current = next;
      }
    } catch (caught) {
      error = this.#stopSignal ? new InterruptedError(this.#stopSignal) : asError(caught);
    } finally {
      clearInterval(progress);
      clearInterval(heartbeat);
      // The bar's last frame, then down, before the summary or any error is
      // written. After a stop it is down already and draws nothing more.
      if (display && !this.#displayStopped) {
        display.update(totals.embedded + totals.skipped, {
          ...totals,
          ratePerSecond: (totals.embedded + totals.skipped) / ((Date.now() - startedAt) / 1000),
        });
      }
      this.#stopDisplay();
    }
    const cursorId = highestId(cursors);
    if (!error && this.#stopSignal) error = new InterruptedError(this.#stopSignal);

    const status = error
      ? error instanceof InterruptedError
        ? 'interrupted'
        : 'failed'
      : totals.skipped > 0
        ? 'partial'
        : 'succeeded';
    // With the database gone for good, the summary still goes out and the
    // exit code is still 1; the run row is marked abandoned by whoever takes over.
    const skippedIds = await dbRetry('read the skips', () => skipsByReason(db, runId)).catch(
      (caught: unknown) => {
        log.warn({ err: oneLine(caught) }, 'could not read the skips');
        return {} as Record<string, string[]>;
      },
    );
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
    await dbRetry('finish the run', () =>
      finishRun(db, runId, status, { ...summary }, summary.error, cursorId, totals),
    ).catch((caught: unknown) =>
      log.error({ err: oneLine(caught) }, 'could not record the end of the run'),
    );
    // Again at the end: a worker killed before it held any lease is found
    // here, not only by the next run to start.
    await markAbandonedRuns(db).catch(() => 0);
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
    lease_ms: config.leaseMs,
    range_size: config.rangeSize,
    base_url: config.openaiBaseUrl ? redactUrl(config.openaiBaseUrl) : null,
  };
}
