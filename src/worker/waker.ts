/**
 * How an idle watcher waits: until a wake-up (a NOTIFY from the capture
 * triggers, a served PGlite client's turn), the poll's timeout, or a stop.
 * A wake-up that comes while the watcher is busy is kept, so the next wait
 * returns at once: a change committed between a claim that found nothing
 * and the wait is not left for the poll.
 */
export class Waker {
  #waiting: (() => void) | undefined;
  #pending = false;

  /** Something may have been queued. */
  notify(): void {
    if (this.#waiting) this.#waiting();
    else this.#pending = true;
  }

  wait(timeoutMs: number, signal: AbortSignal): Promise<void> {
    if (this.#pending || signal.aborted) {
      this.#pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        this.#waiting = undefined;
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.#waiting = done;
      signal.addEventListener('abort', done, { once: true });
    });
  }
}

/** An abortable sleep: the circuit breaker's pause, a one-shot run's wait for others. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Waker().wait(ms, signal);
}
