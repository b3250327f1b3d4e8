/**
 * The circuit breaker. A batch whose requests exhausted their retries with
 * nothing embedded is a failed batch; after `threshold` in a row (3) the
 * provider is failing, not an input. A one-shot run then stops (exit 1)
 * instead of deferring every message it reaches; a watcher pauses, then
 * lets one batch through (half-open): a success closes the circuit, a
 * failure opens it again for twice as long, up to `maxPauseMs`.
 */
export class CircuitBreaker {
  #failedInRow = 0;
  #state: 'closed' | 'open' | 'half-open' = 'closed';
  #pauseMs: number;

  constructor(
    readonly threshold = 3,
    private readonly basePauseMs = 30_000,
    private readonly maxPauseMs = 300_000,
  ) {
    this.#pauseMs = basePauseMs;
  }

  get state(): 'closed' | 'open' | 'half-open' {
    return this.#state;
  }

  get failedInRow(): number {
    return this.#failedInRow;
  }

  /** How long an open circuit waits before its half-open trial. */
  get pauseMs(): number {
    return this.#pauseMs;
  }

  /** A batch's result; true when this one opened the circuit. */
  record(failed: boolean): boolean {
    if (!failed) {
      this.#failedInRow = 0;
      this.#state = 'closed';
      this.#pauseMs = this.basePauseMs;
      return false;
    }
    this.#failedInRow++;
    if (this.#state === 'half-open') {
      this.#state = 'open';
      this.#pauseMs = Math.min(this.#pauseMs * 2, this.maxPauseMs);
      return true;
    }
    if (this.#state === 'closed' && this.#failedInRow >= this.threshold) {
      this.#state = 'open';
      return true;
    }
    return false;
  }

  /** The pause is over: the next batch is the trial. */
  halfOpen(): void {
    if (this.#state === 'open') this.#state = 'half-open';
  }
}
