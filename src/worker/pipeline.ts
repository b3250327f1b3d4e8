import pLimit, { type LimitFunction } from 'p-limit';
import { asError, LeaseLostError, StrictModeError } from '../errors.js';
import type { Logger } from '../log.js';
import type { EmbeddedRow, SkippedRow } from '../sql/batches.js';
import { type EligibleMessage, type EmbeddingTarget, fetchEligiblePage } from '../sql/messages.js';
import { AdaptiveConcurrency } from './adaptive-concurrency.js';
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
import { commitBatch } from './commit.js';
import { RangeLeases, type RangeWalk } from './range-leases.js';
import { createRateGate } from './rate-gate.js';
import type { RunDeps } from './run.js';
import type { RunTotals } from './summary.js';

/** What the pipeline needs from its run. */
export interface PipelineContext {
  deps: RunDeps;
  runId: string;
  sweepId: string;
  target: EmbeddingTarget;
  /** Updated as batches commit (kept) and as answers arrive (billed); the run's summary reads them. */
  totals: RunTotals;
  log: Logger;
  /** The signal that stopped the run, once one has. */
  stopped: () => NodeJS.Signals | undefined;
  /** Aborted on stop: cuts retry waits and waits for ranges, never an answered request. */
  abortSignal: AbortSignal;
  /** Redoes database work lost with a connection, up to --db-retry-ms. */
  dbRetry: <T>(what: string, fn: () => Promise<T>) => Promise<T>;
  /** Most messages to read in this pass (what --limit leaves); undefined: no cap. */
  limit: number | undefined;
  /**
   * The run's batch numbers, shared by its passes: embedding_batches is keyed
   * by (run_id, batch_no), and a redone commit recognises itself by that key.
   */
  batchNumbers: { last: number };
  /** How often the run beats; leases are renewed on the same beat. */
  heartbeatMs: number;
}

export interface PipelineResult {
  /** The highest committed range cursor, for the run row. */
  cursorId: string | null;
  /** Eligible messages read. */
  taken: number;
  /** What ended the pass early, if anything did. */
  error: Error | undefined;
}

/**
 * The batch pipeline: a reader leases ranges of the sweep, pages eligible
 * messages in each with its keyset cursor and prepares them one batch ahead;
 * up to --concurrency batches are sent at once; each commits in its own
 * transaction as it finishes, moving its range's cursor.
 */
export async function runPipeline(ctx: PipelineContext): Promise<PipelineResult> {
  const { target, log } = ctx;
  const { db, config } = ctx.deps;
  const limit = pLimit(config.concurrency);
  const adaptive = new AdaptiveConcurrency(limit, config.concurrency, log);
  const gate = createRateGate(config);
  const leases = new RangeLeases({
    db,
    sweepId: ctx.sweepId,
    runId: ctx.runId,
    leaseMs: config.leaseMs,
    log,
    dbRetry: ctx.dbRetry,
    abortSignal: ctx.abortSignal,
    ended: () => failure !== undefined,
  });
  leases.startRenewal(ctx.heartbeatMs);
  const inFlight = new Set<Promise<void>>();
  const track = (task: Promise<void>) => {
    inFlight.add(task);
    void task.finally(() => inFlight.delete(task));
  };
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
  const settings: BatchSettings = {
    provider: ctx.deps.provider,
    maxInputTokens: config.effectiveMaxInputTokens,
    truncate: config.truncate,
    maxRequestInputs: config.maxRequestInputs,
    maxRequestTokens: config.maxRequestTokens,
    beforeAttempt: (tokens) => gate.acquire(tokens),
    onSent: () => adaptive.onSuccess(),
    // Billed the moment the answer arrives, whatever becomes of it.
    onAnswered: ({ tokens }) => {
      ctx.totals.tokensBilled += tokens;
      ctx.totals.requestsBilled += 1;
    },
    retry: {
      maxRetries: config.maxRetries,
      maxRetryWaitMs: config.maxRetryWaitMs,
      signal: ctx.abortSignal,
      onRetry: ({ error, attempt, delayMs }) => {
        if (error.status === 429) adaptive.onRateLimited();
        log.warn({ attempt, delay_ms: delayMs, err: error.message }, 'retrying request');
      },
    },
  };
  const finish = (walk: RangeWalk) =>
    track(
      leases
        .finishWhenSettled(walk)
        .catch((error: unknown) => fail(ctx.batchNumbers.last + 1, error)),
    );

  let walk: RangeWalk | undefined;
  let taken = 0;
  let lastPage = false;
  try {
    while (!ctx.stopped() && !failure && !lastPage) {
      if (ctx.limit !== undefined && taken >= ctx.limit) break;
      // Backpressure: one batch read and tokenized ahead of the free send slots,
      // so reading, tokenizing, sending and committing overlap, while memory
      // holds at most `concurrency` + 1 batches however large the table is.
      while (inFlight.size > adaptive.current) await Promise.race(inFlight);
      if (ctx.stopped() || failure) break;
      if (!walk?.readable) {
        walk = await leases.next();
        if (!walk) break;
      }
      const current = walk;
      const pageSize = Math.min(config.batchSize, (ctx.limit ?? Number.POSITIVE_INFINITY) - taken);
      const page = await ctx.dbRetry('read a page', () =>
        fetchEligiblePage(
          db,
          target,
          { after: current.readCursor, upTo: current.lease.hiId },
          pageSize,
          { notSkippedByRun: ctx.runId },
        ),
      );
      // A short page is the range's last: no need to read an empty one to know.
      const lastOfRange = page.length < pageSize;
      if (page.length > 0) {
        taken += page.length;
        let prepared = prepareBatch(page, settings);
        if (!config.allowPartial && prepared.failed.length > 0) {
          // Strict mode knows the run ends here: send nothing after the culprit.
          prepared = cutAtFirstFailure(prepared);
          lastPage = true;
        }
        const batchSeq = ++ctx.batchNumbers.last;
        const rangeSeq = current.register((page[page.length - 1] as EligibleMessage).id);
        const task: Promise<void> = processBatch(ctx, {
          seq: batchSeq,
          walk: current,
          rangeSeq,
          prepared,
          settings,
          sendSlots: limit,
          currentFailure: () => failure,
          recordFailure: fail,
        }).then(
          (committed) => {
            if (!committed) current.incomplete = true;
          },
          (error: unknown) => {
            current.incomplete = true;
            fail(batchSeq, error);
          },
        );
        current.tasks.add(task);
        track(task);
      }
      if (lastOfRange) finish(current);
    }
    await Promise.all(inFlight);
  } finally {
    // Whatever ended the loop: settle what is in flight, then hand back the
    // ranges not walked to the end so other workers take them at once.
    await Promise.allSettled(inFlight);
    leases.stopRenewal();
    await leases.releaseAll();
  }
  return { cursorId: leases.highestCursor(), taken, error: failure?.error };
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
  walk: RangeWalk;
  rangeSeq: number;
  prepared: PreparedBatch;
  settings: BatchSettings;
  sendSlots: LimitFunction;
  currentFailure: () => RunFailure | undefined;
  recordFailure: (seq: number, error: unknown, position?: number) => void;
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
 * Sends one batch when a send slot is free, then commits what it got in its
 * own transaction, outside the slot, so the next request need not wait for
 * this commit.
 */
async function processBatch(ctx: PipelineContext, job: BatchJob): Promise<boolean> {
  const { seq, walk, rangeSeq, prepared, settings, sendSlots, currentFailure, recordFailure } = job;
  const { runId, totals, log } = ctx;
  const { db, config, columnType } = ctx.deps;
  const watermark = walk.watermark;
  const blog = log.child({ batch: seq, range_no: walk.key.rangeNo });
  // Asked before every request of this batch, parts and retries included.
  const control: SendControl = {
    sendable: (inputs) => sendableAfter(currentFailure(), seq, inputs),
    onFailure: (found) => {
      if (config.allowPartial) return;
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
  let latencyMs = 0;
  const outcome = await sendSlots(async () => {
    // Read ahead but not yet sent: after a stop or a failure, it never is.
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
  if (!outcome) return false;
  const page = prepared.messages;

  // Strict mode: keep what precedes the first failure, then stop, so the
  // committed set is the eligible prefix before that message.
  const firstFailure = config.allowPartial ? undefined : outcome.failed[0];
  const earlier = currentFailure();
  if (earlier && earlier.seq < seq && isCulprit(earlier)) {
    blog.debug('discarded: a strict-mode failure precedes this batch');
    return false;
  }
  // Where the committed prefix ends: before the strict-mode culprit, or
  // before the first input not sent because the run was stopping.
  const cut = minDefined(firstFailure?.position, outcome.unsent[0]?.position);
  const kept =
    cut === undefined ? outcome.embedded : outcome.embedded.filter((e) => e.position < cut);
  const skipped = firstFailure
    ? []
    : cut === undefined
      ? outcome.failed
      : outcome.failed.filter((f) => f.position < cut);
  // A prefix commit: where it ends (null: nothing before the cut).
  const prefixEnd = cut === undefined ? undefined : (page[cut - 1]?.id ?? null);

  if (kept.length > 0 || skipped.length > 0) {
    const lastHandled = cut === undefined ? page[page.length - 1] : page[cut - 1];
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
      retries: outcome.attempts - outcome.sends,
      latencyMs,
      cursorId: watermark.cursorWith(rangeSeq, prefixEnd),
    };
    const to = {
      db,
      columnType,
      copyFromBlob: ctx.deps.copyFromBlob,
      range: walk.key,
      leaseMs: config.leaseMs,
      idType: ctx.deps.idType ?? 'bigint',
    };
    try {
      await ctx.dbRetry('commit a batch', () =>
        commitBatch(to, batch, kept.map(toRow), skipped.map(toSkip)),
      );
    } catch (error) {
      if (!(error instanceof LeaseLostError)) throw error;
      // Another worker owns the range now and redoes this batch from the
      // committed cursor; this worker leaves the range to it.
      walk.lost = true;
      blog.warn({ err: error.message }, 'lease lost; leaving the range to its new owner');
      return false;
    }
    totals.batches += 1;
    totals.embedded += kept.length;
    totals.skipped += skipped.length;
    totals.truncated += kept.filter((e) => e.truncated).length;
    totals.tokens += batch.tokens;
    totals.requests += batch.attempts;
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
  watermark.commit(rangeSeq, prefixEnd);
  for (const failure of skipped) {
    blog.warn({ message_id: failure.message.id, reason: failure.reason }, failure.detail);
  }
  // Already recorded if the provider's answer told; a pre-counted culprit is recorded here.
  if (firstFailure) recordFailure(seq, strictError(firstFailure), firstFailure.position);
  // Committed in full, or only a prefix (the range is then handed back at its cursor).
  return cut === undefined;
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
  return { messageId: f.message.id, reason: f.reason, detail: f.detail, inputTokens: f.tokens };
}
