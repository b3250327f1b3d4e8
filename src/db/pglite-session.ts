/**
 * PGlite is one Postgres session. Everything that talks to it, this
 * process's Kysely driver and every client served over the socket, takes the
 * session here and holds it until its transaction (or its one statement) is
 * over, so no one's statement ever lands inside another's transaction. One
 * owner for the one piece of state the backend has.
 */
export class PGliteSession {
  #tail: Promise<void> = Promise.resolve();
  #waiting = 0;

  /** Callers queued behind the holder: for tests that act once a caller is known to wait. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Resolves, in arrival order, with the function that gives the session back. */
  async acquire(): Promise<() => void> {
    let release!: () => void;
    const previous = this.#tail;
    this.#tail = new Promise<void>((resolve) => {
      release = resolve;
    });
    this.#waiting++;
    await previous;
    this.#waiting--;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      release();
    };
  }
}
