import { parentPort, workerData } from 'node:worker_threads';
import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import type { BatchRecord } from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import type { Settlement } from '../sql/settle.js';
import type { EmbeddingColumnType } from './names.js';
import type { engineCommits } from './pglite-commits.js';
import { type EngineConnection, localEngine } from './pglite-engine.js';
import type { ServeAddress } from './pglite-lock.js';
import type { PGliteServer } from './pglite-server.js';
import { PGliteSession } from './pglite-session.js';

/*
 * The embedded database's own thread: PGlite, its one session, and the
 * socket that serves it to other processes. The engine runs each statement
 * synchronously in WebAssembly; on the main thread it took turns with
 * everything else the worker does (a claim's 2 ms, a commit's COPY, while
 * sixteen requests' answers waited to be read), and at 16 batches in flight
 * the one thread bound the run at 81% of the provider's pace. Here the main
 * thread sends a statement, and reads the network while it runs; a run's
 * batch commits run here whole (pglite-commits.ts), so a transaction never
 * waits on the main thread between its statements while it holds the one
 * session.
 *
 * pglite-thread-client.ts is the other end. Messages on one port arrive in
 * order, so a release is always seen before the acquire that follows it.
 */

export interface ThreadStart {
  /** An absolute path, or undefined for a database in memory. */
  dataDir: string | undefined;
  /** Load the commit code while the engine opens: this process will commit batches. */
  commits: boolean;
}

export type ThreadRequest =
  | { op: 'acquire'; id: number }
  | { op: 'query'; id: number; connection: number; sql: string; parameters: readonly unknown[] }
  | { op: 'copy'; id: number; into: string; data: Uint8Array }
  /** A run is about to commit batches: load the commit code now, not at its first commit. */
  | { op: 'loadCommits'; id: number }
  | {
      op: 'commit';
      id: number;
      columnType: EmbeddingColumnType;
      scope: ClaimScope;
      batch: BatchRecord | undefined;
      work: Settlement;
    }
  | { op: 'release'; connection: number }
  | { op: 'serve'; id: number; dir: string }
  | { op: 'stopServing'; id: number }
  | { op: 'clients'; id: number }
  | { op: 'whenIdle'; id: number }
  | { op: 'close'; id: number };

/** An error as it crosses: its message and PGlite's fields (code, detail, constraint …). */
export interface ThreadError {
  name: string;
  message: string;
  fields: Record<string, string | number>;
}

export type ThreadMessage =
  | { type: 'opened' }
  | { type: 'failed'; error: ThreadError }
  | { type: 'reply'; id: number; value: unknown }
  | { type: 'error'; id: number; error: ThreadError }
  /** A served client gave the session back: it may have queued work. */
  | { type: 'clientTurn' }
  | { type: 'notice'; message: string };

const port = parentPort;
if (!port) throw new Error('pglite-thread runs as the worker thread of pglite-thread-client');
const post = (message: ThreadMessage) => port.postMessage(message);

function threadError(error: unknown): ThreadError {
  if (!(error instanceof Error)) return { name: 'Error', message: String(error), fields: {} };
  const fields: Record<string, string | number> = {};
  // Strings and numbers only: PGlite's error also carries the statement's
  // parameters, which are message texts, and need not travel.
  for (const [key, value] of Object.entries(error)) {
    if (typeof value === 'string' || typeof value === 'number') fields[key] = value;
  }
  return { name: error.name, message: error.message, fields };
}

async function open(dataDir: string | undefined): Promise<PGlite | undefined> {
  try {
    return await PGlite.create(dataDir, {
      extensions: { vector },
      // int8 as text, like pg, so ids stay exact and identical on both backends.
      parsers: { 20: (value: string) => value },
    });
  } catch (error) {
    post({ type: 'failed', error: threadError(error) });
    port?.close();
    return undefined;
  }
}

const start = workerData as ThreadStart;
// Kysely and the commit's modules took ~300 ms to load after the engine had
// opened, in this thread, where a run's first statements waited for them;
// loaded while it opens (its WebAssembly compiles off this thread), the
// engine opened ~130 ms later and the load was done (embed: ~710 ms to a
// ready thread, against ~890).
const commitCode = start.commits ? import('./pglite-commits.js') : undefined;
// A failure to load is the first commit's error, not this thread's end.
commitCode?.catch(() => {});
const pglite = await open(start.dataDir);
if (pglite) {
  const session = new PGliteSession(async () => {
    await pglite.exec('discard all');
  });
  session.onClientTurn(() => post({ type: 'clientTurn' }));
  const engine = localEngine(pglite, session);
  // Loaded once, at the start (above) or when a run asks for its committer
  // (its first commit would otherwise wait for Kysely and the commit's
  // modules), however many commits arrive meanwhile.
  let commits: Promise<ReturnType<typeof engineCommits>> | undefined;
  const loadCommits = () =>
    (commits ??= (commitCode ?? import('./pglite-commits.js')).then((m) =>
      m.engineCommits(engine),
    ));
  const connections = new Map<number, EngineConnection>();
  let nextConnection = 0;
  let server: PGliteServer | undefined;

  const handle = async (request: Exclude<ThreadRequest, { op: 'release' }>): Promise<unknown> => {
    switch (request.op) {
      case 'acquire': {
        const connection = await engine.acquire();
        connections.set(++nextConnection, connection);
        return nextConnection;
      }
      case 'query': {
        const connection = connections.get(request.connection);
        if (!connection) throw new Error('the session was already given back');
        return connection.query(request.sql, request.parameters);
      }
      case 'copy':
        return engine.copyFrom(request.into, request.data);
      case 'loadCommits':
        await loadCommits();
        return undefined;
      case 'commit':
        return (await loadCommits()).commit(
          request.columnType,
          request.scope,
          request.batch,
          request.work,
        );
      case 'serve': {
        // pglite-socket only for a command that serves (embed, seed).
        const { PGliteServer } = await import('./pglite-server.js');
        server = await PGliteServer.start(pglite, session, request.dir, {
          notice: (message) => post({ type: 'notice', message }),
        });
        return server.address satisfies ServeAddress;
      }
      case 'stopServing':
        return server?.stop();
      case 'clients':
        return server?.clients ?? 0;
      case 'whenIdle':
        return server?.whenIdle();
      case 'close':
        await server?.stop();
        await (await commits)?.close();
        await pglite.close();
        // Nothing is left to answer: the thread ends once the port closes.
        setImmediate(() => port.close());
        return undefined;
    }
  };

  port.on('message', (request: ThreadRequest) => {
    if (request.op === 'release') {
      connections.get(request.connection)?.release();
      connections.delete(request.connection);
      return;
    }
    handle(request).then(
      (value) => post({ type: 'reply', id: request.id, value }),
      (error: unknown) => post({ type: 'error', id: request.id, error: threadError(error) }),
    );
  });
  post({ type: 'opened' });
}
