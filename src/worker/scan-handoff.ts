import type { ClaimedMessage } from '../sql/queue.js';
import type { ClaimSink } from '../sql/reconcile.js';

/**
 * What a one-shot run's own scan has claimed for it (ClaimSink), held in id
 * order until the reader takes it. A chunk claims at most `room()` of what
 * it wants and queues the rest unclaimed, as it does everything once the
 * reader has stopped taking (close). Between chunks the scan waits
 * (`roomAgain`) until the reader has taken half of what is held. So the run
 * holds at most `highWater` messages here, and the scan keeps a little
 * ahead of the sends instead of reading the whole source in the run's first
 * second, when PGlite's engine has a third of a core (BENCHMARKS.md,
 * "eighth pass" and "ninth pass").
 */
export class ScanHandoff implements ClaimSink {
  #held: ClaimedMessage[] = [];
  /** Index of the first message not yet taken: take() never shifts the array. */
  #next = 0;
  #open = true;
  #roomAgain: (() => void) | undefined;
  #claimed = 0;

  constructor(readonly highWater: number) {}

  /** Messages the scan has claimed for the run so far, taken or not. */
  get claimed(): number {
    return this.#claimed;
  }

  /** Messages held, not yet taken. */
  get held(): number {
    return this.#held.length - this.#next;
  }

  room(): number {
    if (!this.#open) return 0;
    // The run's first chunks are small, and each may claim twice what all
    // before it did: its first batches go out after a chunk of an eighth of
    // the room, read while PGlite's engine still shares the cores with V8
    // compiling it, rather than after one of the whole room.
    const ramp = Math.max(this.highWater / 8, 2 * this.#claimed);
    return Math.max(0, Math.floor(Math.min(this.highWater, ramp)) - this.held);
  }

  put(claimed: ClaimedMessage[]): void {
    this.#claimed += claimed.length;
    // Claimed after the reader stopped: the run gives its claims back as it ends.
    if (!this.#open || claimed.length === 0) return;
    this.#held = this.#held.slice(this.#next).concat(claimed);
    this.#next = 0;
  }

  /** Up to `limit` messages, in id order; none when nothing is held. */
  take(limit: number): ClaimedMessage[] {
    const taken = this.#held.slice(this.#next, this.#next + limit);
    this.#next += taken.length;
    if (this.held <= this.highWater / 2) this.#wake();
    return taken;
  }

  /** Resolves once the reader has taken half of what is held, or has stopped. */
  roomAgain(): Promise<void> {
    if (!this.#open || this.held <= this.highWater / 2) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.#roomAgain = resolve;
    });
  }

  /** The reader takes nothing more: nothing is held, and the scan claims no more. Idempotent. */
  close(): void {
    this.#open = false;
    this.#held = [];
    this.#next = 0;
    this.#wake();
  }

  #wake(): void {
    const wake = this.#roomAgain;
    this.#roomAgain = undefined;
    wake?.();
  }
}
