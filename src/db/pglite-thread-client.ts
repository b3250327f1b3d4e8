import type { Worker } from 'node:worker_threads';
import { startSiblingThread, ThreadCalls } from '../thread.js';
import type { BatchCommitter, Committed } from '../worker/commit.js';
import type { EmbeddingColumnType } from './names.js';
import type { EngineConnection, EngineResult, PGliteEngine } from './pglite-engine.js';
import type { ServeAddress } from './pglite-lock.js';
import type { ThreadError, ThreadMessage, ThreadRequest, ThreadStart } from './pglite-thread.js';

type Request = ThreadRequest extends infer R
  ? R extends { id: number }
    ? Omit<R, 'id'>
    : never
  : never;

/**
 * This process's end of the embedded database's thread (pglite-thread.ts):
 * each call is one message there and one answer back. Errors come back with
 * PGlite's fields (code, detail, constraint …), so callers classify them as
 * they would an error from pg.
 */
export class PGliteThread implements PGliteEngine {
  readonly #onClientTurn = new Set<() => void>();
  /** Once the thread has failed or ended, every call fails with its error. */
  readonly #calls: ThreadCalls<Request, unknown>;

  private constructor(
    private readonly worker: Worker,
    notice: (message: string) => void,
  ) {
    this.#calls = new ThreadCalls(worker, {
      failure: (ended) =>
        'error' in ended ? ended.error : new Error('the embedded database thread has ended'),
    });
    worker.on('message', (message: ThreadMessage) => {
      if (message.type === 'clientTurn') for (const listener of this.#onClientTurn) listener();
      else if (message.type === 'notice') notice(message.message);
      else if (message.type === 'reply') this.#calls.resolve(message.id, message.value);
      else if (message.type === 'error') this.#calls.reject(message.id, errorFrom(message.error));
    });
  }

  /** Opens the database in a thread of its own; rejects with the engine's own error. */
  static async start(start: ThreadStart, notice: (message: string) => void): Promise<PGliteThread> {
    const worker = startSiblingThread(import.meta.url, 'pglite-thread', { workerData: start });
    await new Promise<void>((resolve, reject) => {
      const settle = (message: ThreadMessage) => {
        if (message.type === 'opened') resolve();
        else if (message.type === 'failed') reject(errorFrom(message.error));
        else return;
        worker.off('message', settle);
      };
      worker.on('message', settle);
      worker.once('error', reject);
      worker.once('exit', () =>
        reject(new Error('the embedded database thread ended while opening')),
      );
    });
    return new PGliteThread(worker, notice);
  }

  async acquire(): Promise<EngineConnection> {
    const connection = (await this.#calls.call({ op: 'acquire' })) as number;
    let released = false;
    return {
      query: <R>(sql: string, parameters: readonly unknown[]) =>
        this.#calls.call({ op: 'query', connection, sql, parameters }) as Promise<EngineResult<R>>,
      release: () => {
        if (released || this.#calls.broken) return;
        released = true;
        this.worker.postMessage({ op: 'release', connection } satisfies ThreadRequest);
      },
    };
  }

  async copyFrom(into: string, data: Uint8Array): Promise<void> {
    await this.#calls.call({ op: 'copy', into, data });
  }

  /** Commits a run's batches in the engine's thread (see BatchCommitter). */
  committer(columnType: EmbeddingColumnType): BatchCommitter {
    // Loaded there now, while the run scans and claims; a failure to load
    // is the first commit's error.
    this.#calls.call({ op: 'loadCommits' }).catch(() => {});
    return {
      commit: (_db, scope, batch, work) =>
        this.#calls.call({ op: 'commit', columnType, scope, batch, work }) as Promise<
          Committed | undefined
        >,
    };
  }

  /** Serves the database on a socket in `dir` (or a private directory); resolves with where. */
  serve(dir: string): Promise<ServeAddress> {
    return this.#calls.call({ op: 'serve', dir }) as Promise<ServeAddress>;
  }

  /** Closes the socket and every client's connection. */
  async stopServing(): Promise<void> {
    await this.#calls.call({ op: 'stopServing' });
  }

  /** How many clients are connected now. */
  clients(): Promise<number> {
    return this.#calls.call({ op: 'clients' }) as Promise<number>;
  }

  /** Resolves once no client is connected. */
  async whenIdle(): Promise<void> {
    await this.#calls.call({ op: 'whenIdle' });
  }

  /** Calls `listener` each time a served client gives the session back. */
  onClientTurn(listener: () => void): () => void {
    this.#onClientTurn.add(listener);
    return () => this.#onClientTurn.delete(listener);
  }

  /** Closes the engine (its files flushed), then waits for the thread to end. */
  async close(): Promise<void> {
    if (this.#calls.broken) return;
    const ended = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    try {
      await this.#calls.call({ op: 'close' });
    } catch (error) {
      await this.worker.terminate();
      throw error;
    }
    await ended;
  }
}

/** The thread's error, rebuilt here with the same name, message and fields. */
function errorFrom(error: ThreadError): Error {
  const rebuilt = Object.assign(new Error(error.message), error.fields);
  rebuilt.name = error.name;
  return rebuilt;
}
