import pLimit, { type LimitFunction } from 'p-limit';
import type { EmbedConfig } from '../config.js';
import { asError, BudgetReachedError, ProviderFailingError, StrictModeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EmbeddedRow, SkippedRow } from '../sql/batches.js';
import type { EligibleMessage } from '../sql/messages.js';
import {
  type ClaimedMessage,
  type ClaimScope,
  claimBatch,
  claimOldest,
  queueState,
  releaseRunClaims,
} from '../sql/queue.js';
import { billedTodayByOthers } from '../sql/runs.js';
import type { Settlement } from '../sql/settle.js';
import { AdaptiveConcurrency } from './adaptive-concurrency.js';
import type { QueueFiller } from './background-scan.js';
import {
  type BatchOutcome,
  type BatchSettings,
  cutAtFirstFailure,
  type Failure,
  type Input,
  type PreparedBatch,
  prepareBatch,
  type SendControl,
  sendBatch,
} from './batch.js';
import { CircuitBreaker } from './breaker.js';
import { SpendBudget } from './budget.js';
import { ClaimKeyset } from './claim-keyset.js';
import { createFleetRateGate } from './fleet-gate.js';
import type { LatencyHistogram } from './latency.js';
import type { RunObserver } from './observer.js';
import { createRateGate } from './rate-gate.js';
import type { RunDeps } from './run.js';
import type { RunTotals } from './summary.js';

/** What the pipeline needs from its run. */
export interface PipelineContext {
  deps: RunDeps;
  scope: ClaimScope;
  /** Updated as batches commit (kept) and as answers arrive (billed); the run's summary reads them. */
  totals: RunTotals;
  /** How long each batch's commit took, retries included. */
  commitLatency: LatencyHistogram;
  log: Logger;
  /** The signal that stopped the run, once one has. */
  stopped: () => NodeJS.Signals | undefined;
  /** Aborted on stop: cuts retry waits and idle waits, never an answered request. */
  abortSignal: AbortSignal;
  /** Redoes database work lost with a connection, up to --db-retry-ms. */
  dbRetry: <T>(what: string, fn: () => Promise<T>) => Promise<T>;
  /** Most messages to send (--limit); undefined: no cap. */
  limit: number | undefined;
  /**
   * --watch: when the queue is empty, wait here (a wake-up from the capture
   * triggers, or the poll) and claim again; undefined: a one-shot run ends.
   */
  idle: ((waitMs: number) => Promise<void>) | undefined;
  /** The longest idle wait between polls (--poll-interval-ms). */
  pollIntervalMs: number;
  /** Told how many messages each claim took on to send (a watcher's planned grows so). */
  onClaimed: (count: number) => void;
  /** Waits `ms` or until the run stops: the circuit breaker's pause. */
  pause: (ms: number) => Promise<void>;
  /** Waits while other workers hold the rest of the queue (one-shot), releasing dead runs' claims. */
  waitForOthers: () => Promise<void>;
  /** A scan still filling the queue beside the run (a model's first), if one is. */
  filler: QueueFiller | undefined;
  /** Told of commits, answers and retries (RunDeps.observer, or nobody). */
  observer: RunObserver;
}

export interface PipelineResult {
  /** Messages claimed to be sent. */
  taken: number;
  /** What ended the run early, if anything did. */
  error: Error | undefined;
}

// An idle watcher polls soon after work (50 ms), then less often, doubling up
// to --poll-interval-ms: a change the wake-up gate let pass silently (see
// capture.ts) waits 50–100 ms while writes are frequent.
const FIRST_IDLE_MS = 50;

/**
 * The batch pipeline, claim → prepare → send → commit: a reader claims
 * pending messages from the queue in id order and prepares them one batch
 * ahead; up to --concurrency batches are sent at once; each commits in its
 * own statement as it finishes, fenced by its claims.
 */
export async function runPipeline(ctx: PipelineContext): Promise<PipelineResult> {
  const { log, scope } = ctx;
  const { db, config } = ctx.deps;
  const { observer } = ctx;
  const limit = pLimit(config.concurrency);
  const adaptive = new AdaptiveConcurrency(limit, config.concurrency, log);
  // With a key, --max-rpm/--max-tpm hold for every worker of the provider,
  // model and API key together (fleet-gate.ts); without one, per process.
  const fleetKey = ctx.deps.rateLimitKey;
  const gate =
    fleetKey && (config.maxRpm || config.maxTpm)
      ? createFleetRateGate(db, fleetKey, config)
      : createRateGate(config);
  const breaker = new CircuitBreaker();
  // Every batch until it has committed, and of those, the ones not yet
  // through their send. The reader keeps batches ahead of the send slots,
  // whatever is still committing: when batches committing held their slot,
  // 16 in flight at 200 ms reached 70% of ideal with a commit p99 of 531 ms.
  const inFlight = new Set<Promise<void>>();
  const unsent = new Set<Promise<void>>();
  const track = (task: Promise<void>, sent: Promise<void>) => {
    inFlight.add(task);
    unsent.add(sent);
    void task.finally(() => inFlight.delete(task));
    void sent.finally(() => unsent.delete(sent));
  };
  // Sending at most `current`, committing at most `current` more, and one
  // batch read ahead for every 4 send slots, at most 8. Sends end in bunches,
  // and the reader refills them one claim at a time. With one ahead, 16 in
  // flight at 200 ms reached 88% of ideal, with two 91% (BENCHMARKS.md, "The
  // hot path, third pass"). Since PGlite's claims run in its own thread
  // beside the worker's, two ahead left a steady 88-89% there and four 95-97%
  // (PostgreSQL 97% either way); at 64 in flight more than 8 measured no
  // better ("fourth pass").
  const readAhead = () => Math.min(Math.ceil(adaptive.current / 4), 8);
  const full = () =>
    unsent.size >= adaptive.current + readAhead() ||
    inFlight.size >= 2 * adaptive.current + readAhead();
  // The failure that ends the run. Any failure other than a strict-mode
  // culprit (a fatal provider error, a lost database) stops everything at
  // once, so it outranks every culprit, earlier batch or not: once recorded,
  // no culprit replaces it, and nothing is sent again. Within each kind, the
  // earliest (batch, position in it) wins.
  let failure: RunFailure | undefined;
  const fail = (seq: number, error: unknown, position = -1) => {
    const next = { seq, position, error: asError(error) };
    if (!failure || outranks(next, failure)) failure = next;
  };
  // A transient failure (retries exhausted) is never a skip in watch mode or
  // with --allow-partial: the message goes back to the queue after a backoff.
  const deferrable = (f: Failure) =>
    f.reason === 'retries_exhausted' && (config.allowPartial || ctx.idle !== undefined);
  const settings: BatchSettings = {
    provider: ctx.deps.provider,
    maxInputTokens: config.effectiveMaxInputTokens,
    truncate: config.truncate,
    // The token gate admits each request by its exact size; without one,
    // only inputs that could be over the limit are counted.
    countAll: config.maxTpm !== undefined,
    maxRequestInputs: config.maxRequestInputs,
    maxRequestTokens: config.maxRequestTokens,
    beforeAttempt: (tokens) => gate.acquire(tokens),
    onSent: () => adaptive.onSuccess(),
    // Billed the moment the answer arrives, whatever becomes of it.
    onAnswered: ({ tokens }) => {
      ctx.totals.tokensBilled += tokens;
      ctx.totals.requestsBilled += 1;
      observer.billed(tokens);
    },
    retry: {
      maxRetries: config.maxRetries,
      maxRetryWaitMs: config.maxRetryWaitMs,
      signal: ctx.abortSignal,
      onRetry: ({ error, attempt, delayMs }) => {
        observer.retried();
        if (error.status === 429) adaptive.onRateLimited();
        log.warn({ attempt, delay_ms: delayMs, err: error.message }, 'retrying request');
      },
    },
  };
  const onBatchResult = (seq: number, failed: boolean) => {
    if (!breaker.record(failed)) return;
    const what = `${breaker.failedInRow} batches in a row exhausted their retries with nothing embedded`;
    if (ctx.idle === undefined) {
      fail(
        seq,
        new ProviderFailingError(
          `the provider is failing: ${what}; nothing more is sent, and the messages not embedded stay pending for the next run`,
        ),
      );
      return;
    }
    log.error(
      { pause_ms: breaker.pauseMs },
      `the provider is failing: ${what}; pausing, then trying one batch`,
    );
  };

  observer.pipeline({
    inFlight: () => inFlight.size,
    concurrency: () => adaptive.current,
    providerFailing: () => breaker.state !== 'closed',
    rateBudgetSeconds: () => gate.budgetSeconds(),
  });
  const budget =
    config.budgetTokens === undefined
      ? undefined
      : new SpendBudget(config.budgetTokens, config.watch, () => billedTodayByOthers(db, scope));
  const keyset = config.watch ? undefined : new ClaimKeyset();
  let taken = 0;
  let lastPage = false;
  let idleMs = FIRST_IDLE_MS;
  let batchNo = 0;
  let waitingLogged = false;
  try {
    while (!ctx.stopped() && !failure && !lastPage) {
      if (ctx.limit !== undefined && taken >= ctx.limit) break;
      // Backpressure: batches claimed and tokenized ahead of the free send
      // slots, so claiming, tokenizing, sending and committing overlap, while
      // memory holds at most 2 × `concurrency` + min(⌈concurrency / 4⌉, 8) batches
      // however long the queue.
      while (full()) await Promise.race([...unsent, ...inFlight]);
      if (ctx.stopped() || failure) break;
      if (ctx.filler?.error) {
        // The scan beside the run failed: nothing more is sent.
        fail(batchNo + 1, ctx.filler.error);
        break;
      }
      if (breaker.state !== 'closed') {
        // Watch mode only (a one-shot run has failed by now): wait out the
        // pause with nothing in flight, then one batch at a time until one works.
        await Promise.allSettled(inFlight);
        if (breaker.state === 'open') {
          await ctx.pause(breaker.pauseMs);
          if (ctx.stopped()) break;
          breaker.halfOpen();
        }
      }
      if (budget) {
        const spent = await ctx.dbRetry('read the spend', () =>
          budget.spent(ctx.totals.tokensBilled),
        );
        if (spent >= budget.limitTokens) {
          fail(batchNo + 1, budgetReached(config, spent, budget.limitTokens));
          break;
        }
      }
      const pageSize = Math.min(config.batchSize, (ctx.limit ?? Number.POSITIVE_INFINITY) - taken);
      // What the run's own scan has claimed for it comes first, as read
      // (ScanHandoff). Then a watcher takes the oldest change first; a
      // one-shot run walks the queue in id order by keyset (see ClaimKeyset).
      const handed = ctx.filler?.take(pageSize) ?? [];
      const after = keyset?.after ?? null;
      const page: ClaimedMessage[] =
        handed.length > 0
          ? handed
          : await ctx.dbRetry('claim a batch', () =>
              keyset
                ? claimBatch(db, scope, { after, limit: pageSize, ignoreBackoff: false })
                : claimOldest(db, scope, pageSize),
            );
      // A keyset that ran off the end claims again from the first id at once,
      // for rows given back since (an edit during a send, a dead worker's).
      const pageIds = page.map((m) => m.id);
      if (handed.length === 0 && keyset?.advance(pageIds, pageSize)) continue;
      if (page.length === 0) {
        if (ctx.filler && (ctx.filler.running || ctx.filler.held > 0)) {
          // The scan has not queued everything yet: claim again after its
          // next chunk (or once a batch in flight settles). Or it handed
          // over claims while this claim looked: take them at once.
          await Promise.race([ctx.filler.nextChunk(), ...inFlight]);
          continue;
        }
        // Not while a scan runs or holds claims for the run: those are this
        // run's, and no batch holds them either. Seen: a scan ending during
        // the claim above, its 29 claims released here, then sent, and
        // fenced out as no longer held.
        if (inFlight.size === 0) {
          // A claim whose answer was lost with the connection did commit:
          // its rows are this run's and no batch holds them. Without this, a
          // one-shot run found the queue empty and exited 0 with them undone.
          const strays = await ctx.dbRetry('release lost claims', () =>
            releaseRunClaims(db, scope.runId),
          );
          if (strays > 0) {
            log.warn({ messages: strays }, 'claims whose answer was lost given back');
            continue;
          }
        }
        if (ctx.idle) {
          // Watching: until a wake-up, the poll, or a batch in flight settles.
          await Promise.race([ctx.idle(idleMs), ...inFlight]);
          idleMs = Math.min(idleMs * 2, ctx.pollIntervalMs);
          continue;
        }
        if (inFlight.size > 0) {
          // What is in flight may give rows back: claim again once it settles.
          await Promise.race(inFlight);
          continue;
        }
        const state = await ctx.dbRetry('read the queue', () =>
          queueState(db, scope.targetId, scope.runId),
        );
        // Rows queued since this claim looked are claimed before the run may
        // end. Seen in CI: a run of 4 messages on a server claimed before the
        // scan beside it had committed its one chunk; the scan ended while
        // the run gave back lost claims, so it was no longer running, and
        // the run ended with exit 0 and all 4 still queued.
        if (state.due > 0) continue;
        if (state.claimedByOthers === 0) break;
        // One-shot runs end with the queue done, so exit 0 means nothing was
        // left: wait for the other workers, taking over from any that die.
        if (!waitingLogged) {
          waitingLogged = true;
          log.info(
            { claimed_by_others: state.claimedByOthers, lease_ms: config.leaseMs },
            'the rest of the queue is claimed by other workers; waiting for them, or to take over from any that die',
          );
        }
        await ctx.waitForOthers();
        continue;
      }
      idleMs = FIRST_IDLE_MS;
      const sorted = sortClaimed(page);
      taken += sorted.toEmbed.length;
      ctx.onClaimed(sorted.toEmbed.length);
      const seq = ++batchNo;
      // The page's texts longer than the limit in bytes are counted on the
      // counting thread (tokens.ts), while sends, commits and the scan go on.
      // Strict mode waits for their counts before it reads the next page: a
      // text over the limit ends the run there, and nothing after it is
      // sent. With --allow-partial nothing waits on them, and the pages
      // after it go out meanwhile.
      let prepared: PreparedBatch | Promise<PreparedBatch> = prepareBatch(sorted.toEmbed, settings);
      if (!config.allowPartial) {
        try {
          const ready = await prepared;
          // A culprit: the run ends here, and nothing after it is sent.
          lastPage = ready.failed.length > 0;
          prepared = lastPage ? await cutAtFirstFailure(ready) : ready;
        } catch (error) {
          fail(seq, error);
          break;
        }
      }
      const trial = breaker.state === 'half-open';
      let markSent = () => {};
      const sent = new Promise<void>((resolve) => {
        markSent = resolve;
      });
      const task = processBatch(ctx, {
        seq,
        onSent: markSent,
        prepared,
        settled: sorted,
        settings,
        sendSlots: limit,
        currentFailure: () => failure,
        recordFailure: fail,
        deferrable,
        onResult: (failed) => onBatchResult(seq, failed),
      })
        .catch((error: unknown) => fail(seq, error))
        .finally(markSent);
      track(task, sent);
      // Half-open: the trial batch alone, and its verdict before the next.
      if (trial) await task;
    }
    // Not once the batches in flight are done: a scan waiting for the reader
    // to take what it holds would wait for them too. A first run with
    // --limit 3,840 of 6,046 emails on PGlite ended 100-170 ms after its
    // last commit, the scan's last chunks queueing the rest only then;
    // 42-86 ms now (BENCHMARKS.md, "eleventh pass").
    ctx.filler?.close();
    await Promise.all(inFlight);
  } finally {
    await Promise.allSettled(inFlight);
    observer.pipeline(undefined);
  }
  return { taken, error: failure?.error };
}

/** A claimed page sorted: what to send, and what settles without a request. */
interface SortedClaims {
  /** Each message's queue row version as read, for the fence. */
  versions: Record<string, string>;
  toEmbed: EligibleMessage[];
  gone: string[];
  blank: string[];
  unchanged: string[];
}

function sortClaimed(page: ClaimedMessage[]): SortedClaims {
  const versions = Object.fromEntries(page.map((m) => [m.id, m.version]));
  const sorted: SortedClaims = { versions, toEmbed: [], gone: [], blank: [], unchanged: [] };
  for (const m of page) {
    if (!m.exists) sorted.gone.push(m.id);
    // A NULL text is blank.
    else if (m.content === null || m.sha256Hex === null || !m.nonBlank) sorted.blank.push(m.id);
    // An update that left the text as it was costs no request.
    else if (m.current && !m.force) sorted.unchanged.push(m.id);
    else sorted.toEmbed.push({ id: m.id, content: m.content, sha256Hex: m.sha256Hex });
  }
  return sorted;
}

/**
 * What ends the run: a strict-mode culprit (`position`: where in batch `seq`
 * it is), or any other failure (`position` -1: the whole batch), which stops
 * everything and is never replaced by a culprit.
 */
interface RunFailure {
  seq: number;
  position: number;
  error: Error;
}

interface BatchJob {
  seq: number;
  /** The send is over (answered, failed, or not made): the reader may claim again. */
  onSent: () => void;
  /** Its counts may still be coming (--allow-partial). */
  prepared: PreparedBatch | Promise<PreparedBatch>;
  /** The page's messages that settle without a request. */
  settled: SortedClaims;
  settings: BatchSettings;
  sendSlots: LimitFunction;
  currentFailure: () => RunFailure | undefined;
  recordFailure: (seq: number, error: unknown, position?: number) => void;
  /** A failure that goes back to the queue rather than stop the run or be skipped. */
  deferrable: (failure: Failure) => boolean;
  /** For the circuit breaker: whether the batch failed on retries with nothing embedded. */
  onResult: (failed: boolean) => void;
}

function isCulprit(failure: RunFailure): boolean {
  return failure.error instanceof StrictModeError;
}

/**
 * Whether `next` ends the run in place of `current`: a failure that stops
 * everything beats a strict-mode culprit whatever their batches; between two
 * of a kind, the earlier (batch, position) wins.
 */
function outranks(next: RunFailure, current: RunFailure): boolean {
  if (isCulprit(next) !== isCulprit(current)) return !isCulprit(next);
  return next.seq < current.seq || (next.seq === current.seq && next.position < current.position);
}

/**
 * Of batch `seq`'s inputs, those whose answers the run would still keep now
 * that `failure` is known. A strict-mode culprit ends the kept prefix: the
 * batches before it and its own inputs before it commit, nothing after it is
 * sent. Any other failure (a fatal provider error, a lost database) ends the
 * run at once: nothing more is sent.
 */
function sendableAfter(failure: RunFailure | undefined, seq: number, inputs: Input[]): Input[] {
  if (!failure) return inputs;
  // Never replaced by a culprit (see outranks): nothing is sent again.
  if (!isCulprit(failure)) return [];
  if (seq < failure.seq) return inputs;
  if (seq > failure.seq) return [];
  return inputs.filter((i) => i.position < failure.position);
}

/**
 * Sends one batch when a send slot is free, then commits what it got
 * (commitBatch), outside the slot, so the next request need not wait for
 * this commit.
 */
async function processBatch(ctx: PipelineContext, job: BatchJob): Promise<void> {
  const { seq, settings, sendSlots, currentFailure, recordFailure, deferrable } = job;
  const prepared = await job.prepared;
  const { totals, log, scope } = ctx;
  const { db, config } = ctx.deps;
  const blog = log.child({ batch: seq });
  // Asked before every request of this batch, parts and retries included.
  const control: SendControl = {
    sendable: (inputs) => sendableAfter(currentFailure(), seq, inputs),
    onFailure: (found) => {
      if (config.allowPartial || deferrable(found)) return;
      // Strict mode: the run stops at this message. Known now, from the
      // provider's answer, not when this batch commits: from here on nothing
      // after it is sent, by this batch or any other.
      recordFailure(seq, strictError(found), found.position);
      const now = currentFailure();
      if (now?.seq !== seq || now.position !== found.position) return; // an earlier one stops it
      blog.warn(
        { message_id: found.message.id, reason: found.reason },
        'strict mode: this message stops the run; nothing after it is sent',
      );
    },
  };
  const nothingToSend = prepared.toSend.length === 0 && prepared.failed.length === 0;
  let latencyMs = 0;
  const outcome: BatchOutcome | undefined = nothingToSend
    ? { embedded: [], failed: [], unsent: [], attempts: 0, sends: 0 }
    : await sendSlots(async () => {
        // Claimed but not yet sent: after a stop or a failure, it never is.
        if (ctx.stopped() || currentFailure()) return undefined;
        const startedAt = Date.now();
        try {
          const sent = await sendBatch(prepared, settings, control);
          latencyMs = Date.now() - startedAt;
          return sent;
        } catch (error) {
          // Recorded before the slot is freed: p-limit starts the next queued
          // batch at once, and it must see this failure and not send.
          recordFailure(seq, error);
          throw error;
        }
      });
  job.onSent();
  // Not sent: its claims go back when the run ends.
  if (!outcome) return;
  const page = prepared.messages;
  const deferred = outcome.failed.filter(deferrable);
  const failures = outcome.failed.filter((f) => !deferrable(f));
  if (!nothingToSend) job.onResult(deferred.length > 0 && outcome.embedded.length === 0);

  // Strict mode: keep what precedes the first failure, then stop.
  const firstFailure = config.allowPartial ? undefined : failures[0];
  const earlier = currentFailure();
  if (earlier && earlier.seq < seq && isCulprit(earlier)) {
    blog.debug('discarded: a strict-mode failure precedes this batch');
    return;
  }
  // Where the kept part ends: before the strict-mode culprit, or before the
  // first input not sent because the run was stopping.
  const cut = minDefined(firstFailure?.position, outcome.unsent[0]?.position);
  const before = <T extends { position: number }>(list: T[]) =>
    cut === undefined ? list : list.filter((x) => x.position < cut);
  const kept = before(outcome.embedded);
  const skipped = firstFailure ? [] : before(failures);
  const deferredKept = before(deferred);
  const handled = new Set([...kept, ...skipped, ...deferredKept].map((x) => x.message.id));
  const work: Settlement = {
    versions: job.settled.versions,
    embedded: kept.map(toRow),
    skipped: skipped.map(toSkip),
    gone: job.settled.gone,
    blank: job.settled.blank,
    unchanged: job.settled.unchanged,
    deferred: deferredKept.map((f) => f.message.id),
    deferredError: deferredKept[0]?.detail,
    released: page.map((m) => m.id).filter((id) => !handled.has(id)),
  };
  const first = page[0];
  const batch = first && {
    runId: scope.runId,
    provider: scope.provider,
    model: scope.model,
    batchNo: seq,
    firstMessageId: first.id,
    lastMessageId: (page[page.length - 1] as EligibleMessage).id,
    size: 0,
    tokens: 0,
    attempts: outcome.attempts,
    retries: outcome.attempts - outcome.sends,
    latencyMs,
  };
  const commitStart = performance.now();
  const committed = await ctx.dbRetry('commit a batch', () =>
    ctx.deps.committer.commit(db, scope, batch, work),
  );
  const commitMs = performance.now() - commitStart;
  ctx.commitLatency.record(commitMs);
  if (committed) {
    ctx.observer.committed(committed, commitMs / 1000);
    if (committed.embedded + committed.skipped > 0) {
      totals.batches += 1;
      totals.requests += outcome.attempts;
      totals.retries += outcome.attempts - outcome.sends;
    }
    totals.embedded += committed.embedded;
    totals.skipped += committed.skipped;
    totals.truncated += committed.truncated;
    totals.tokens += committed.tokens;
    totals.deferred += work.deferred.length;
    totals.unchanged += committed.unchanged;
    totals.blank += committed.blank;
    totals.gone += committed.gone;
    if (committed.changed > 0) {
      blog.debug(
        { changed: committed.changed },
        'messages edited while in flight go back to the queue',
      );
    }
    blog.debug(
      {
        first_id: batch?.firstMessageId,
        last_id: batch?.lastMessageId,
        embedded: committed.embedded,
        skipped: committed.skipped,
        deferred: work.deferred.length,
        unchanged: committed.unchanged,
        attempts: outcome.attempts,
        latency_ms: latencyMs,
      },
      'batch committed',
    );
  }
  for (const failure of skipped) {
    blog.warn({ message_id: failure.message.id, reason: failure.reason }, failure.detail);
  }
  if (deferredKept.length > 0) {
    blog.warn(
      { messages: deferredKept.length, first_id: deferredKept[0]?.message.id },
      `retries exhausted; back in the queue for a later try: ${deferredKept[0]?.detail}`,
    );
  }
  // Already recorded if the provider's answer told; a pre-counted culprit is recorded here.
  if (firstFailure) recordFailure(seq, strictError(firstFailure), firstFailure.position);
}

function budgetReached(config: EmbedConfig, spent: number, limit: number): BudgetReachedError {
  const how = [
    config.maxTokens !== undefined ? `--max-tokens ${config.maxTokens}` : undefined,
    config.maxCostUsd !== undefined ? `--max-cost-usd ${config.maxCostUsd}` : undefined,
  ]
    .filter(Boolean)
    .join(', ');
  const when = config.watch ? ' today (UTC), every run of this model counted' : ' by this run';
  return new BudgetReachedError(
    `spend budget reached: ${spent} tokens billed${when}, of ${limit} (${how}); nothing more is sent, and the messages not embedded stay pending`,
  );
}

function minDefined(a: number | undefined, b: number | undefined): number | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return Math.min(a, b);
}

function strictError(failure: Failure): StrictModeError {
  const how =
    failure.reason === 'context_length'
      ? `rerun with --allow-partial to skip it (recorded in embedding_skips), or --truncate to embed its first ${failure.limitTokens ?? 'N'} tokens`
      : failure.reason === 'rejected_input'
        ? // Strict mode sends nothing after it, so it cannot tell whether every input would be refused alike.
          'rerun with --allow-partial to skip it (recorded in embedding_skips); if every message is refused alike, the request itself is wrong: check --model and --dimensions'
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
  return {
    messageId: f.message.id,
    sha256Hex: f.message.sha256Hex,
    reason: f.reason,
    detail: f.detail,
    inputTokens: f.tokens ?? null,
  };
}
