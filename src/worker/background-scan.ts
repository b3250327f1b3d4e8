import { asError } from '../errors.js';
import type { ClaimedMessage } from '../sql/queue.js';
import type { ScanHandoff } from './scan-handoff.js';

/** What the pipeline asks of a scan that still fills the queue beside it. */
export interface QueueFiller {
  /** The scan is still enqueueing: a claim that finds nothing is not the end. */
  readonly running: boolean;
  /** Why the scan failed, once it has: the run ends with it. */
  readonly error: Error | undefined;
  /**
   * Resolves when the scan has committed its next chunk, or has ended; at
   * once while it holds a page for the run (it may have come while the
   * reader claimed from the queue).
   */
  nextChunk(): Promise<void>;
  /** Up to `limit` messages the scan has claimed for the run (ScanHandoff), in id order. */
  take(limit: number): ClaimedMessage[];
  /** Messages the scan has claimed for the run and not yet handed over. */
  readonly held: number;
  /**
   * The reader takes nothing more: the scan's chunks from here queue
   * unclaimed, while the batches still in flight finish. Safe to call twice.
   */
  close(): void;
}

/**
 * A reconciliation scan run beside the pipeline rather than before it: the
 * run claims what the scan's first chunks queued while it queues the rest.
 * A model's first scan of 6,046 emails took 300–580 ms on PGlite, every
 * request of the run waiting behind it (BENCHMARKS.md, "fifth pass").
 *
 * `scan` gets a callback for each committed chunk, which returns whether to
 * go on. `finished` never rejects: a failure is kept in `error`.
 */
export class BackgroundScan<T> implements QueueFiller {
  #running = true;
  /** The page the reader last asked for. */
  #asked = 1;
  #error: Error | undefined;
  #chunk!: () => void;
  #next: Promise<void>;
  readonly finished: Promise<T | undefined>;

  /**
   * `handoff`: where the scan's chunks put what they claim for the run, if
   * they claim (a one-shot run's scan); without one they only queue.
   */
  constructor(
    scan: (chunkDone: () => void) => Promise<T>,
    private readonly handoff?: ScanHandoff,
  ) {
    this.#next = this.#arm();
    this.finished = scan(() => this.#chunkDone()).then(
      (result) => result,
      (error: unknown) => {
        this.#error = asError(error);
        return undefined;
      },
    );
    void this.finished.finally(() => {
      this.#running = false;
      this.#chunkDone();
    });
  }

  get running(): boolean {
    return this.#running;
  }

  get error(): Error | undefined {
    return this.#error;
  }

  nextChunk(): Promise<void> {
    // A scan holding a page for the reader may be waiting for it to take
    // some (ScanHandoff): a reader waiting for its next chunk would wait for
    // ever. It holds less than a page only while it goes on: it waits for
    // room only above half its room, which is two rounds of the send slots.
    if (!this.#running || this.held >= this.#asked) return Promise.resolve();
    return this.#next;
  }

  get held(): number {
    return this.handoff?.held ?? 0;
  }

  /**
   * While the scan runs, a full page or none: the tail of a chunk that
   * wanted fewer (a first chunk of 8 for batches of 7) went out as a batch
   * of its own.
   */
  take(limit: number): ClaimedMessage[] {
    this.#asked = limit;
    if (this.#running && this.held < limit) return [];
    return this.handoff?.take(limit) ?? [];
  }

  /**
   * The reader has stopped: the scan goes on to its end (or stops at its
   * next chunk, if told to), queueing unclaimed. Safe to call twice.
   */
  close(): void {
    this.handoff?.close();
  }

  #arm(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.#chunk = resolve;
    });
  }

  #chunkDone(): void {
    const resolve = this.#chunk;
    this.#next = this.#arm();
    resolve();
  }
}
