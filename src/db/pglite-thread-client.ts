import type { Worker } from 'node:worker_threads';
import { startSiblingThread } from '../thread.js';
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
  readonly #pending = new Map<
    number,
    { resolve: (v: unknown) => void; reject: (e: Error) => void }
  >();
  readonly #onClientTurn = new Set<() => void>();
  #nextId = 0;
  /** Once the thread has failed or ended, every call fails with this. */
  #broken: Error | undefined;

  private constructor(
    private readonly worker: Worker,
    notice: (message: string) => void,
  ) {
    worker.on('message', (message: ThreadMessage) => {
      if (message.type === 'clientTurn') for (const listener of this.#onClientTurn) listener();
      else if (message.type === 'notice') notice(message.message);
      else if (message.type === 'reply' || message.type === 'error') {
        const call = this.#pending.get(message.id);
        this.#pending.delete(message.id);
        if (message.type === 'reply') call?.resolve(message.value);
        else call?.reject(errorFrom(message.error));
      }
    });
    worker.on('error', (error) => this.#fail(error));
    worker.on('exit', () => this.#fail(new Error('the embedded database thread has ended')));
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
    const connection = (await this.#call({ op: 'acquire' })) as number;
    let released = false;
    return {
      query: <R>(sql: string, parameters: readonly unknown[]) =>
        this.#call({ op: 'query', connection, sql, parameters }) as Promise<EngineResult<R>>,
      release: () => {
        if (released || this.#broken) return;
        released = true;
        this.worker.postMessage({ op: 'release', connection } satisfies ThreadRequest);
      },
    };
  }

  async copyFrom(into: string, data: Uint8Array): Promise<void> {
    await this.#call({ op: 'copy', into, data });
  }

  /** Commits a run's batches in the engine's thread (see BatchCommitter). */
  committer(columnType: EmbeddingColumnType): BatchCommitter {
    // Loaded there now, while the run scans and claims; a failure to load
    // is the first commit's error.
    this.#call({ op: 'loadCommits' }).catch(() => {});
    return {
      commit: (_db, scope, batch, work) =>
        this.#call({ op: 'commit', columnType, scope, batch, work }) as Promise<
          Committed | undefined
        >,
    };
  }

  /** Serves the database on a socket in `dir` (or a private directory); resolves with where. */
  serve(dir: string): Promise<ServeAddress> {
    return this.#call({ op: 'serve', dir }) as Promise<ServeAddress>;
  }

  /** Closes the socket and every client's connection. */
  async stopServing(): Promise<void> {
    await this.#call({ op: 'stopServing' });
  }

  /** How many clients are connected now. */
  clients(): Promise<number> {
    return this.#call({ op: 'clients' }) as Promise<number>;
  }

  /** Resolves once no client is connected. */
  async whenIdle(): Promise<void> {
    await this.#call({ op: 'whenIdle' });
  }

  /** Calls `listener` each time a served client gives the session back. */
  onClientTurn(listener: () => void): () => void {
    this.#onClientTurn.add(listener);
    return () => this.#onClientTurn.delete(listener);
  }

  /** Closes the engine (its files flushed), then waits for the thread to end. */
  async close(): Promise<void> {
    if (this.#broken) return;
    const ended = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    try {
      await this.#call({ op: 'close' });
    } catch (error) {
      await this.worker.terminate();
      throw error;
    }
    await ended;
  }

  #call(request: Request): Promise<unknown> {
    if (this.#broken) return Promise.reject(this.#broken);
    const id = ++this.#nextId;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...request, id } as ThreadRequest);
    });
  }

  #fail(error: Error): void {
    this.#broken ??= error;
    for (const call of this.#pending.values()) call.reject(this.#broken);
    this.#pending.clear();
  }
}

/** The thread's error, rebuilt here with the same name, message and fields. */
function errorFrom(error: ThreadError): Error {
  const rebuilt = Object.assign(new Error(error.message), error.fields);
  rebuilt.name = error.name;
  return rebuilt;
}
