import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import { oneLine } from '../errors.js';
import type { Logger } from '../log.js';
import {
  claimRange,
  closeSweepIfDone,
  finishRange,
  type LeasedRange,
  type RangeKey,
  releaseRange,
  renewLeases,
  sweepState,
} from '../sql/ranges.js';
import { CommitWatermark, highestId } from './watermark.js';

/** One leased range as this run walks it. */
export class RangeWalk {
  readonly key: RangeKey;
  /** Where the next page starts: the committed cursor at first, then the last id read. */
  readCursor: string | null;
  /** Committed progress inside the range; its cursor is what a taker resumes from. */
  readonly watermark: CommitWatermark;
  /** Batches read from this range and not yet settled. */
  readonly tasks = new Set<Promise<void>>();
  #seq = 0;
  /** The last page has been read. */
  exhausted = false;
  /** The lease lapsed and another worker took the range: leave it. */
  lost = false;
  /** A batch did not commit in full (stop, failure, strict prefix): the range is not done. */
  incomplete = false;
  done = false;

  constructor(
    readonly lease: LeasedRange,
    runId: string,
  ) {
    this.key = { sweepId: lease.sweepId, rangeNo: lease.rangeNo, runId };
    this.readCursor = lease.cursorId;
    this.watermark = new CommitWatermark(lease.cursorId);
  }

  /** Registers a page read from this range; returns its sequence number in the range. */
  register(lastId: string): number {
    this.#seq++;
    this.watermark.register(this.#seq, lastId);
    this.readCursor = lastId;
    return this.#seq;
  }

  get readable(): boolean {
    return !this.exhausted && !this.lost;
  }
}

export interface RangeLeasesOptions {
  db: Kysely<DB>;
  sweepId: string;
  runId: string;
  leaseMs: number;
  log: Logger;
  /** Every database call goes through this: it redoes work lost with a connection. */
  dbRetry: <T>(what: string, fn: () => Promise<T>) => Promise<T>;
  /** Aborted on stop: ends a wait for other workers' ranges. */
  abortSignal: AbortSignal;
  /** True once the run must read no more (a failure): ends a wait too. */
  ended: () => boolean;
}

/**
 * The ranges this run holds: claims the next one (waiting while every
 * remaining range is leased by a live worker, so a dead one's lease is taken
 * over when it lapses), marks walked ranges done, hands the rest back.
 */
export class RangeLeases {
  readonly #held = new Map<number, RangeWalk>();
  readonly #walked: RangeWalk[] = [];
  #renewal: NodeJS.Timeout | undefined;
  #waitingLogged = false;

  constructor(private readonly options: RangeLeasesOptions) {}

  /** The next range to read, or undefined when the sweep is done or the run stops. */
  async next(): Promise<RangeWalk | undefined> {
    const { db, sweepId, runId, leaseMs, log, dbRetry, abortSignal, ended } = this.options;
    // Poll often enough that a released range is picked up within a second.
    const pollMs = Math.min(1000, leaseMs / 4);
    while (!abortSignal.aborted && !ended()) {
      // A walk given up as lost may in fact still be this run's lease: then
      // the claim hands it back to this run rather than leaving it stranded.
      const walking = [...this.#held.values()].filter((w) => !w.lost).map((w) => w.key.rangeNo);
      const lease = await dbRetry('claim a range', () =>
        claimRange(db, { sweepId, runId, leaseMs, walking }),
      );
      if (lease) {
        const walk = new RangeWalk(lease, runId);
        this.#held.set(lease.rangeNo, walk);
        this.#walked.push(walk);
        this.#waitingLogged = false;
        log.info(
          {
            range_no: lease.rangeNo,
            after_id: lease.cursorId,
            up_to_id: lease.hiId,
            taken_from_run: lease.takenFrom,
          },
          lease.takenFrom ? 'range taken over from a lapsed lease' : 'range leased',
        );
        return walk;
      }
      const state = await dbRetry('read the sweep', () => sweepState(db, sweepId, runId));
      if (state.done === state.total) {
        await dbRetry('close the sweep', () => closeSweepIfDone(db, sweepId));
        return undefined;
      }
      // Otherwise what is left is held: by other workers (taken over if they
      // lapse), or by this run, finishing in flight. Either way the run waits:
      // it ends only with the sweep done, so exit 0 means nothing was left.
      if (!this.#waitingLogged && state.heldByOthers > 0) {
        this.#waitingLogged = true;
        log.info(
          { held_by_others: state.heldByOthers, lease_ms: leaseMs },
          'every remaining range is leased by another worker; waiting to take over any that lapse',
        );
      }
      await sleep(pollMs, abortSignal);
    }
    return undefined;
  }

  /**
   * Once every batch read from `walk` has settled, marks it done if they all
   * committed in full; otherwise it is handed back by releaseAll.
   */
  async finishWhenSettled(walk: RangeWalk): Promise<void> {
    walk.exhausted = true;
    await Promise.allSettled([...walk.tasks]);
    if (walk.lost || walk.incomplete || !walk.watermark.complete) return;
    const { db, dbRetry, log } = this.options;
    const finished = await dbRetry('finish a range', () =>
      finishRange(db, walk.key, walk.watermark.cursor),
    );
    if (finished) {
      walk.done = true;
      this.#held.delete(walk.key.rangeNo);
      log.debug({ range_no: walk.key.rangeNo, cursor_id: walk.watermark.cursor }, 'range done');
    } else {
      walk.lost = true;
      log.warn(
        { range_no: walk.key.rangeNo },
        'range was taken over before it could be marked done',
      );
    }
  }

  /**
   * Renews the leases every `intervalMs` (the run's heartbeat). A held
   * range missing from the renewal was taken over while this worker stalled:
   * it is left at once, not at its next commit.
   */
  startRenewal(intervalMs: number): void {
    const { db, runId, leaseMs, log, sweepId } = this.options;
    this.#renewal = setInterval(() => {
      // Only walks claimed before the renewal began can be judged by its answer.
      const judged = [...this.#held.values()];
      renewLeases(db, runId, leaseMs)
        .then((renewed) => {
          const still = new Set(renewed.filter((r) => r.sweepId === sweepId).map((r) => r.rangeNo));
          for (const walk of judged) {
            if (walk.done || walk.lost || still.has(walk.key.rangeNo)) continue;
            walk.lost = true;
            log.warn(
              { range_no: walk.key.rangeNo },
              'lease lost; leaving the range to its new owner',
            );
          }
        })
        .catch((error: unknown) => log.warn({ err: oneLine(error) }, 'lease renewal failed'));
    }, intervalMs);
    this.#renewal.unref();
  }

  stopRenewal(): void {
    clearInterval(this.#renewal);
  }

  /** The highest committed cursor of any range this run walked: the run row's cursor_id. */
  highestCursor(): string | null {
    // A walk that committed nothing still has the cursor it resumed from.
    return highestId(
      this.#walked
        .filter((w) => w.watermark.cursor !== w.lease.cursorId)
        .map((w) => w.watermark.cursor),
    );
  }

  /**
   * Hands back every range still held, at its committed cursor, so another
   * worker takes it at once instead of waiting for the lease to lapse.
   * Best effort: with the database gone, the leases lapse instead.
   */
  async releaseAll(): Promise<void> {
    const { db, dbRetry, log } = this.options;
    for (const walk of this.#held.values()) {
      // Lost walks too: the release is fenced on this run's lease, so it does
      // nothing where another worker holds the range, and frees it where not.
      if (walk.done) continue;
      try {
        await dbRetry('release a range', () => releaseRange(db, walk.key, walk.watermark.cursor));
        log.info(
          { range_no: walk.key.rangeNo, cursor_id: walk.watermark.cursor },
          'range released',
        );
      } catch (error) {
        log.warn(
          { range_no: walk.key.rangeNo, err: error },
          'could not release a range; its lease will lapse',
        );
      }
    }
    this.#held.clear();
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
