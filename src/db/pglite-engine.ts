import type { PGlite } from '@electric-sql/pglite';
import type { PGliteSession } from './pglite-session.js';

/** What a statement gave back: its rows, and how many rows it changed. */
export interface EngineResult<R> {
  rows: R[];
  affectedRows?: number | undefined;
}

/** The one PGlite session, held by this caller until release(). */
export interface EngineConnection {
  query<R>(sql: string, parameters: readonly unknown[]): Promise<EngineResult<R>>;
  release(): void;
}

/**
 * PGlite as the Kysely dialect and the embedding writer see it, wherever
 * the engine runs: in this thread (the thread that owns it, and the socket
 * server's tests), or in a thread of its own (pglite-thread-client.ts).
 */
export interface PGliteEngine {
  /** The session, in arrival order, after served clients that asked first. */
  acquire(): Promise<EngineConnection>;
  /**
   * Runs `COPY … FROM STDIN` with `data` as its input, in the session the
   * caller's transaction already holds (PGlite has one session, so no
   * acquire: the transaction's own statements and this one share it).
   */
  copyFrom(copySql: string, data: Uint8Array): Promise<void>;
}

/** The engine in this thread: statements go straight to PGlite. */
export function localEngine(pglite: PGlite, session: PGliteSession): PGliteEngine {
  return {
    async acquire() {
      const release = await session.acquire();
      return {
        async query<R>(sql: string, parameters: readonly unknown[]) {
          const result = await pglite.query<R>(sql, parameters as unknown[]);
          return { rows: result.rows, affectedRows: result.affectedRows };
        },
        release,
      };
    },
    async copyFrom(copySql, data) {
      await pglite.query(copySql, [], { blob: new Blob([data]) });
    },
  };
}
