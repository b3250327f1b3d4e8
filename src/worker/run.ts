import type { Kysely } from 'kysely';
import type { EmbedConfig } from '../config.js';
import type { Database } from '../db/connect.js';
import type { IdType } from '../db/names.js';
import { withDbRetry } from '../db/retry.js';
import type { DB } from '../db/schema.js';
import { asError, BudgetReachedError, InterruptedError, oneLine, PgembedError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EmbeddingProvider } from '../provider/client.js';
import { redactUrl } from '../redact.js';
import type { ProgressDisplay } from '../report/progress-bar.js';
import { captureMode } from '../sql/capture.js';
import {
  analyzeQueueIfStale,
  type ClaimScope,
  countOutstandingSkips,
  ensureTarget,
  pendingCount,
  queueRowsLive,
  queueState,
  releaseDeadClaims,
  releaseRunClaims,
} from '../sql/queue.js';
import type { ReconcileCounts } from '../sql/reconcile.js';
import {
  finishRun,
  insertRun,
  markAbandonedRuns,
  reviveRun,
  setPlanned,
  skipsByReason,
  touchRun,
} from '../sql/runs.js';
import type { BackgroundScan } from './background-scan.js';
import type { BatchCommitter } from './commit.js';
import { LatencyHistogram } from './latency.js';
import { type RunObserver, unobserved } from './observer.js';
import { runPipeline } from './pipeline.js';
import { readyQueue, scanBeside, scanReason, scanSource } from './ready-queue.js';
import { formatSummary, type RunSummary, type RunTotals, writeManifest } from './summary.js';
import { sleep, Waker } from './waker.js';

export interface RunDeps {
  db: Kysely<DB>;
  /** How batches commit (Database.batchCommitter). */
  committer: BatchCommitter;
  /** The source's id type; default bigint. */
  idType?: IdType | undefined;
  /** The database is one session (Database.oneSession; see ClaimScope); default false. */
  oneSession?: boolean | undefined;
  provider: EmbeddingProvider;
  config: EmbedConfig;
  logger: Logger;
  /** Where the human summary goes (stderr in the CLI). */
  report?: (text: string) => void;
  /** How often to log progress and beat the heart between batches. */
  progressIntervalMs?: number;
  /** A terminal progress bar; when given, it replaces the periodic progress log lines. */
  progressDisplay?: ProgressDisplay | undefined;
  /** --watch: how the run hears of changes (Database.watchChanges); without it, it polls. */
  watchChanges?: Database['watchChanges'];
  /**
   * Who the provider limits this worker as (provider, model, key
   * fingerprint: src/provider/fingerprint.ts): its --max-rpm/--max-tpm are
   * then shared through the database with every worker of the same key.
   * Without it, the limits hold per process.
   */
  rateLimitKey?: string | undefined;
  /** Told of commits, answers and retries as they happen (the metrics); default nobody. */
  observer?: RunObserver | undefined;
}

export interface RunOutcome {
  summary: RunSummary;
  exitCode: number;
  /** Why the run failed or stopped; undefined when it finished. */
  error: PgembedError | Error | undefined;
}

const EXIT = { succeeded: 0, partial: 2, failed: 1 } as const;

/**
 * One invocation of the worker: readies the target's queue (a reconciliation
 * scan where the triggers cannot answer), then claims, embeds and commits
 * batches until the queue is done, or, with --watch, until stopped. `stop()`
 * lets the batches in flight commit (or roll back) and ends the run as
 * interrupted; what the run still holds goes back to the queue.
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
    const startedAt = Date.now();
    const watch = config.watch;
    const bootLog = logger.child({ provider: config.provider, model: config.model });
    const bootRetry = <T>(what: string, fn: () => Promise<T>) =>
      withDbRetry(what, fn, { retryMs: config.dbRetryMs, log: bootLog });
    const capture = (await captureMode(db)) ?? 'reconcile';
    const target = await bootRetry('register the target', () =>
      ensureTarget(
        db,
        config.provider,
        config.model,
        capture === 'triggers' ? config.messageSource : undefined,
      ),
    );
    // Runs that stopped beating are dead: their claims go back to the queue.
    const abandoned = await bootRetry('mark abandoned runs', () => markAbandonedRuns(db));
    if (abandoned > 0) {
      bootLog.warn({ runs: abandoned }, 'marked runs without a heartbeat abandoned');
    }
    await bootRetry('release dead claims', () => releaseDeadClaims(db));
    const runId = await insertRun(db, {
      provider: config.provider,
      model: config.model,
      options: runOptions(config),
      planned: 0,
      blank: 0,
      watch,
    });
    const log = logger.child({ run_id: runId });
    const dbRetry = <T>(what: string, fn: () => Promise<T>) =>
      withDbRetry(what, fn, { retryMs: config.dbRetryMs, log });
    const scope: ClaimScope = {
      targetId: target.id,
      runId,
      provider: config.provider,
      model: config.model,
      source: config.messageSource,
      idType: this.deps.idType ?? 'bigint',
      oneSession: this.deps.oneSession ?? false,
    };

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
      deferred: 0,
      unchanged: 0,
      blank: 0,
      gone: 0,
    };
    const commitLatency = new LatencyHistogram();
    let planned = 0;
    let reconciled: RunSummary['reconciled'] = null;
    const census = { blank: 0, upToDate: 0 };
    // The run's heartbeat, for the progress view and for others to tell a
    // dead run (--lease-ms without one) and take its claims: a third of the
    // lease, so two beats can fail in a blip. It carries the spend billed so far.
    const heartbeatMs = Math.min(this.deps.progressIntervalMs ?? 5000, config.leaseMs / 3);
    let analyzedAtRows = 0;
    const heartbeat = setInterval(() => {
      const beat = async () => {
        await touchRun(db, runId, { ...totals, ...(watch ? { planned } : {}) });
        // An application's bulk load through the triggers leaves the queue's
        // statistics far behind, and every commit statement planned on them
        // ANDed two indexes over the whole queue: 35 ms against ~3 at 500,000
        // rows (PostgreSQL 15; BENCHMARKS.md, "eighth pass"). Autovacuum may
        // be late or off (PGlite has none): analyzed here once they are.
        // Not again until the queue has doubled since: where the role may
        // not ANALYZE (PostgreSQL warns, and the statistics stay), each beat
        // would otherwise sample 30,000 rows again.
        const live = await queueRowsLive(db);
        if (live >= 2 * analyzedAtRows && (await analyzeQueueIfStale(db, live))) {
          analyzedAtRows = live;
          log.info(
            { queued: live },
            'analyzed the queue: its statistics were behind what it holds',
          );
        }
        if (await reviveRun(db, runId)) {
          log.warn(
            'this run stalled past --lease-ms and was marked abandoned; its claims went to others; running again',
          );
        }
        // A watcher also finds dead peers, whose claims would otherwise wait.
        if (watch && (await markAbandonedRuns(db)) > 0) await releaseDeadClaims(db);
      };
      beat().catch((error: unknown) => log.warn({ err: oneLine(error) }, 'heartbeat failed'));
    }, heartbeatMs);
    heartbeat.unref();

    let error: PgembedError | Error | undefined;
    let display: ProgressDisplay | undefined;
    let progress: NodeJS.Timeout | undefined;
    let stopListening: (() => Promise<void>) | undefined;
    // What a one-shot run means to send: rows no one holds, up to --limit.
    // While a scan runs beside it, what the scan has queued so far is added
    // (rows it queued again are counted twice until it ends); once it ends,
    // what the run has claimed to send and what no one holds, an estimate
    // while claims go on, made exact as the run ends.
    const plan = (queued: number) =>
      watch ? 0 : Math.min(queued, config.limit ?? Number.POSITIVE_INFINITY);
    let claimedToSend = 0;
    let scanning: string | undefined;
    let scanEnded: Promise<void> | undefined;
    let scan: BackgroundScan<ReconcileCounts> | undefined;
    try {
      const ready = { db, config, scope, log, dbRetry, going: () => !this.#stopSignal };
      const noteScan = (scan: ReconcileCounts) => {
        census.blank = scan.blank;
        census.upToDate = scan.upToDate;
        reconciled = {
          scanned: scan.scanned,
          enqueued: scan.enqueued,
          orphansDeleted: scan.orphansDeleted,
        };
      };
      const scanWhy = scanReason(config, target, capture);
      // --force marks each row the scan passes (force = true): a claim ahead
      // of the scan could read a queued row before its mark and settle it as
      // unchanged. So a forced scan runs before the first claim; any other
      // runs beside the claims (below).
      if (scanWhy && config.force) noteScan(await scanSource(ready, scanWhy));
      scanning = scanWhy && !config.force ? scanWhy : undefined;
      const pending = await readyQueue(ready);
      planned = plan(pending);
      await dbRetry('record the plan', () => setPlanned(db, runId, planned, census.blank));
      log.info(
        {
          planned,
          pending,
          capture,
          watch,
          ...(reconciled ? { reconciled } : {}),
          ...(scanning ? { scanning } : {}),
          model: config.model,
        },
        'run started',
      );

      // Not shown at all if a stop came before it could start; nor in watch mode.
      display = this.#displayStopped || watch ? undefined : this.deps.progressDisplay;
      display?.start(planned);
      progress = setInterval(
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
              ...(watch
                ? {}
                : {
                    percent: planned ? +((100 * done) / planned).toFixed(1) : 100,
                    eta_s: rate ? Math.round((planned - done) / rate) : null,
                  }),
              rate: +rate.toFixed(1),
            },
            'progress',
          );
        },
        display ? 250 : (this.deps.progressIntervalMs ?? 5000),
      );
      progress.unref();

      // Watch mode: wake on a change, or poll; a source without triggers is
      // scanned again every --reconcile-interval-ms.
      const waker = new Waker();
      let lastScanAt = Date.now();
      if (watch && this.deps.watchChanges) {
        stopListening = await this.deps.watchChanges(() => waker.notify());
      }
      const idle = watch
        ? async (waitMs: number) => {
            if (capture === 'reconcile' && Date.now() - lastScanAt >= config.reconcileIntervalMs) {
              lastScanAt = Date.now();
              await scanSource(ready, 'the source has no triggers');
              return;
            }
            await waker.wait(waitMs, this.#abort.signal);
          }
        : undefined;
      // The bar's total follows the plan; never drawn again once stopped (see stop()).
      const showPlan = () => {
        if (display && !this.#displayStopped) display.setTotal(planned);
      };
      // The scan beside the run: the run claims what its chunks have queued
      // while it queues the rest. Once it ends, the plan is what this run
      // has claimed to send plus what no one holds.
      scan = scanning
        ? scanBeside(ready, scanning, pending, async (sofar) => {
            if (watch) return;
            planned = plan(pending + sofar.enqueued);
            showPlan();
            await dbRetry('record the plan', () => setPlanned(db, runId, planned, sofar.blank));
          })
        : undefined;
      scanEnded = scan?.finished.then(async (counts) => {
        if (!counts) return;
        noteScan(counts);
        if (watch) return;
        try {
          const left = await dbRetry('count the queue', () => pendingCount(db, scope.targetId));
          // What the scan claimed for the run and has not handed over yet is
          // in neither figure.
          planned = plan(claimedToSend + (scan?.held ?? 0) + left);
          showPlan();
          await dbRetry('record the plan', () => setPlanned(db, runId, planned, census.blank));
        } catch (caught) {
          log.warn({ err: oneLine(caught) }, 'could not record the plan');
        }
      });
      const result = await runPipeline({
        deps: this.deps,
        scope,
        totals,
        commitLatency,
        log,
        stopped: () => this.#stopSignal,
        abortSignal: this.#abort.signal,
        dbRetry,
        limit: config.limit,
        idle,
        pollIntervalMs: config.pollIntervalMs,
        onClaimed: (n) => {
          claimedToSend += n;
          if (watch) planned += n;
        },
        filler: scan,
        observer: this.deps.observer ?? unobserved,
        pause: (ms) => sleep(ms, this.#abort.signal),
        waitForOthers: async () => {
          if ((await dbRetry('mark abandoned runs', () => markAbandonedRuns(db))) > 0) {
            await dbRetry('release dead claims', () => releaseDeadClaims(db));
          }
          await sleep(Math.min(1000, config.leaseMs / 4), this.#abort.signal);
        },
      });
      if (result.error) throw result.error;
      await scanEnded;
      if (scan?.error) throw scan.error;
    } catch (caught) {
      error = this.#stopSignal ? new InterruptedError(this.#stopSignal) : asError(caught);
    } finally {
      // A scan beside a run that failed goes on to its end, so the next run
      // trusts the queue and costs O(changes); after a stop it ends at its
      // next chunk. Either way nothing of it runs once the run has ended.
      // Its claims not taken go back with the run's, below.
      scan?.close();
      await scanEnded;
      clearInterval(progress);
      clearInterval(heartbeat);
      await stopListening?.().catch(() => {});
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
    if (!error && this.#stopSignal) error = new InterruptedError(this.#stopSignal);
    // What this run still holds goes back at once, for others (or the next run).
    await dbRetry('release claims', () => releaseRunClaims(db, runId)).then(
      (released) => {
        if (released > 0) log.info({ messages: released }, 'claims released');
      },
      (caught: unknown) =>
        log.warn(
          { err: oneLine(caught) },
          'could not release claims; they go back once the run is found dead',
        ),
    );

    // Messages earlier runs skipped, still as they were, are still missing:
    // a run that leaves them is partial, never a success.
    // (Those this run skipped are among them.)
    const skippedEarlier =
      error || watch
        ? 0
        : Math.max(
            0,
            (await dbRetry('count earlier skips', () => countOutstandingSkips(db, scope)).catch(
              () => totals.skipped,
            )) - totals.skipped,
          );
    // Rows another worker deferred while this one ran are still pending.
    if (!error && !watch) {
      const left = await dbRetry('read the queue', () => queueState(db, target.id, runId)).catch(
        () => undefined,
      );
      totals.deferred = Math.max(totals.deferred, left?.backingOff ?? 0);
      if (scanning && left) planned = plan(claimedToSend + left.due);
    }
    const status = error
      ? error instanceof InterruptedError || error instanceof BudgetReachedError
        ? 'interrupted'
        : 'failed'
      : totals.skipped > 0 || totals.deferred > 0 || skippedEarlier > 0
        ? 'partial'
        : 'succeeded';
    // With the database gone for good, the summary still goes out and the
    // exit code is still 1; the run row is marked abandoned by whoever comes next.
    const skippedIds = await dbRetry('read the skips', () => skipsByReason(db, runId)).catch(
      (caught: unknown) => {
        log.warn({ err: oneLine(caught) }, 'could not read the skips');
        return {} as Record<string, string[]>;
      },
    );
    const elapsedMs = Date.now() - startedAt;
    const usage = process.resourceUsage();
    const summary: RunSummary = {
      runId,
      status,
      provider: config.provider,
      model: config.model,
      planned,
      ...totals,
      ineligible: {
        blank: census.blank + totals.blank,
        upToDate: census.upToDate + totals.unchanged,
      },
      reconciled,
      skippedEarlier,
      skippedByReason: Object.fromEntries(
        Object.entries(skippedIds).map(([reason, ids]) => [reason, ids.length]),
      ),
      elapsedMs,
      messagesPerSecond: (totals.embedded + totals.skipped) / Math.max(elapsedMs / 1000, 0.001),
      // maxRSS is in KiB.
      peakRssMiB: Math.round(usage.maxRSS / 1024),
      error: error ? oneLine(error) : null,
    };
    await dbRetry('finish the run', () =>
      finishRun(db, runId, status, { ...summary }, summary.error, {
        ...totals,
        ...(watch || scanning ? { planned } : {}),
      }),
    ).catch((caught: unknown) =>
      log.error({ err: oneLine(caught) }, 'could not record the end of the run'),
    );
    // Again at the end: a worker killed before it claimed anything holds no
    // claims for others to wait on, and is found here.
    await markAbandonedRuns(db).catch(() => 0);
    if (config.manifest) await writeManifest(config.manifest, summary, skippedIds);
    this.deps.report?.(formatSummary(summary, skippedIds));
    log.info(
      {
        status,
        ...totals,
        elapsed_ms: elapsedMs,
        peak_rss_mib: summary.peakRssMiB,
        // Every thread's (PGlite's own included), in ms: what the run cost
        // the machine, steadier than its pace where other work shares the cores.
        cpu_ms: Math.round((usage.userCPUTime + usage.systemCPUTime) / 1000),
        commit: commitLatency.summary(),
      },
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
    watch: config.watch,
    triggers: config.triggers,
    base_url: config.openaiBaseUrl ? redactUrl(config.openaiBaseUrl) : null,
    // status shows what is left of it.
    budget_tokens: config.budgetTokens ?? null,
  };
}
