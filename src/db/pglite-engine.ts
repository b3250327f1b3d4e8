import type { PGlite } from '@electric-sql/pglite';
import { PreparedStatements } from './pglite-prepared.js';
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
   * Runs `COPY <into> FROM … WITH (FORMAT binary)` with `data` as its input,
   * in the session the caller's transaction already holds (PGlite has one
   * session, so no acquire: the transaction's own statements and this one
   * share it). `into` is a table and its column list.
   */
  copyFrom(into: string, data: Uint8Array): Promise<void>;
}

/**
 * Where a COPY's input waits, in the engine's own in-memory file system
 * (/tmp there is MEMFS). PGlite's `/dev/blob` device, its documented way in,
 * hands the input to Postgres one byte at a time in JavaScript, after two
 * copies (a Blob, then its ArrayBuffer): 379 ms of the engine thread's 4.5 s
 * in a run of 20,000 short messages, 5.5 ms a 64-vector COPY against 3.3 ms
 * from a file, which MEMFS reads a chunk at a time with one memcpy
 * (BENCHMARKS.md, "sixth pass"). One session, so one file: no two COPYs
 * ever run at once.
 */
const COPY_FILE = '/tmp/pgembed-copy.bin';

/** The two calls of the engine's file system (Emscripten's FS) that a COPY needs. */
interface EngineFiles {
  writeFile(path: string, data: Uint8Array, options: { canOwn: boolean }): void;
  unlink(path: string): void;
}

/**
 * The engine in this thread: statements go straight to PGlite, those with
 * parameters prepared once (pglite-prepared.ts).
 */
export function localEngine(pglite: PGlite, session: PGliteSession): PGliteEngine {
  const prepared = new PreparedStatements(pglite);
  session.onReset(() => prepared.forget());
  return {
    async acquire() {
      const release = await session.acquire();
      return {
        async query<R>(sql: string, parameters: readonly unknown[]) {
          return prepared.query<R>(sql, parameters);
        },
        release,
      };
    },
    async copyFrom(into, data) {
      const files = pglite.Module.FS as unknown as EngineFiles;
      // canOwn: the file is `data` itself, not a copy; it is gone after the COPY.
      files.writeFile(COPY_FILE, data, { canOwn: true });
      try {
        await prepared.query(`copy ${into} from '${COPY_FILE}' with (format binary)`, []);
      } finally {
        files.unlink(COPY_FILE);
      }
    },
  };
}
