/** Who takes the session: this process's own driver, or a served client by its handler id. */
export type SessionOwner = 'holder' | number;

/**
 * PGlite is one Postgres session. Everything that talks to it, this
 * process's Kysely driver and every client served over the socket, takes the
 * session here and holds it until its transaction (or its one statement) is
 * over, so no one's statement ever lands inside another's transaction. One
 * owner for the one piece of state the backend has.
 *
 * What a client leaves in the session (a `set search_path`, a prepared
 * statement, an advisory lock, a LISTEN) would stay in force for whoever
 * comes next (seen: the holder's next insert failed, "relation does not
 * exist"), so when the session passes from a client to anyone else, it is
 * reset first (DISCARD ALL). A client keeps its settings only as long as no
 * one else takes a turn in between.
 */
export class PGliteSession {
  #tail: Promise<void> = Promise.resolve();
  #waiting = 0;
  /** The client whose statements ran last, while its settings may still be in force. */
  #lastClient: number | undefined;

  readonly #onClientTurn = new Set<() => void>();
  readonly #onReset = new Set<() => void>();

  constructor(private readonly reset: () => Promise<void>) {}

  /**
   * Calls `listener` each time a served client gives the session back: it
   * may have written messages, which the capture triggers queued. PGlite's
   * own LISTEN cannot serve here: the reset between owners (DISCARD ALL)
   * unlistens. Returns the function that stops the calls.
   */
  onClientTurn(listener: () => void): () => void {
    this.#onClientTurn.add(listener);
    return () => this.#onClientTurn.delete(listener);
  }

  /**
   * Calls `listener` after each reset: what the session held for anyone
   * (prepared statements) is gone.
   */
  onReset(listener: () => void): void {
    this.#onReset.add(listener);
  }

  /** Callers queued behind the holder: for tests that act once a caller is known to wait. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Resolves, in arrival order, with the function that gives the session back. */
  async acquire(owner: SessionOwner = 'holder'): Promise<() => void> {
    let release!: () => void;
    const previous = this.#tail;
    this.#tail = new Promise<void>((resolve) => {
      release = resolve;
    });
    this.#waiting++;
    await previous;
    this.#waiting--;
    if (this.#lastClient !== undefined && this.#lastClient !== owner) {
      this.#lastClient = undefined;
      await this.reset().catch(() => {});
      for (const listener of this.#onReset) listener();
    }
    if (owner !== 'holder') this.#lastClient = owner;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      release();
      if (owner !== 'holder') for (const listener of this.#onClientTurn) listener();
    };
  }
}
