import { asError } from '../errors.js';

/** What the pipeline asks of a scan that still fills the queue beside it. */
export interface QueueFiller {
  /** The scan is still enqueueing: a claim that finds nothing is not the end. */
  readonly running: boolean;
  /** Why the scan failed, once it has: the run ends with it. */
  readonly error: Error | undefined;
  /** Resolves when the scan has committed its next chunk, or has ended. */
  nextChunk(): Promise<void>;
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
  #error: Error | undefined;
  #chunk!: () => void;
  #next: Promise<void>;
  readonly finished: Promise<T | undefined>;

  constructor(scan: (chunkDone: () => void) => Promise<T>) {
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
    return this.#running ? this.#next : Promise.resolve();
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
