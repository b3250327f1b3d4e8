import { compareIds } from '../db/source.js';

/**
 * Batches commit in whatever order they finish; the resume cursor may only
 * move to the last id of the longest run of committed batches from the start.
 * So a crash never leaves an uncommitted batch below the cursor.
 */
export class CommitWatermark {
  readonly #lastIds = new Map<number, string>();
  readonly #committed = new Set<number>();
  #next = 1;
  #cursor: string | null;
  #registered = 0;
  #prefixOnly = false;
  /**
   * The last batch the cursor may pass: a batch that committed only a prefix
   * ends the walk there, and later batches that did commit must not carry
   * the cursor past the messages it left out.
   */
  #ceiling = Number.POSITIVE_INFINITY;

  /** `start`: where reading began (a resumed range's committed cursor). */
  constructor(start: string | null = null) {
    this.#cursor = start;
  }

  /** Batch `seq` (1, 2, …, in read order) covers messages up to `lastId`. */
  register(seq: number, lastId: string): void {
    this.#lastIds.set(seq, lastId);
    this.#registered = Math.max(this.#registered, seq);
  }

  /**
   * The cursor as it will be once `seq` commits, for writing in its
   * transaction. `lastId` overrides the batch's own end when only a prefix of
   * it commits (strict mode), which also ends the run.
   */
  cursorWith(seq: number, lastId?: string | null): string | null {
    let next = this.#next;
    let cursor = this.#cursor;
    while (next <= this.#ceiling && (next === seq || this.#committed.has(next))) {
      if (next === seq && lastId !== undefined) return lastId ?? cursor;
      cursor = this.#lastIds.get(next) ?? cursor;
      next++;
    }
    return cursor;
  }

  /** `lastId` when only a prefix of the batch committed (strict mode). */
  commit(seq: number, lastId?: string | null): void {
    if (lastId !== undefined) {
      this.#prefixOnly = true;
      this.#ceiling = Math.min(this.#ceiling, lastId === null ? seq - 1 : seq);
      if (lastId === null) return; // nothing of it committed: the cursor stops before it
      this.#lastIds.set(seq, lastId);
    }
    this.#committed.add(seq);
    while (this.#next <= this.#ceiling && this.#committed.has(this.#next)) {
      this.#cursor = this.#lastIds.get(this.#next) ?? this.#cursor;
      this.#committed.delete(this.#next);
      this.#lastIds.delete(this.#next);
      this.#next++;
    }
  }

  get cursor(): string | null {
    return this.#cursor;
  }

  /** Every registered batch committed in full: what was read is all handled. */
  get complete(): boolean {
    return !this.#prefixOnly && this.#next === this.#registered + 1;
  }
}

/** The highest of some ids (bigint or uuid text), null when there are none. */
export function highestId(ids: Iterable<string | null>): string | null {
  let highest: string | null = null;
  for (const id of ids) {
    if (id !== null && (highest === null || compareIds(id, highest) > 0)) highest = id;
  }
  return highest;
}
