import { resolve } from 'node:path';
import { Kysely } from 'kysely';
import type { Database, OpenOptions, Serving } from './connect.js';
import { pgliteEmbeddingWriter } from './embedding-writer.js';
import { PGliteDialect } from './pglite-dialect.js';
import { type HeldLock, psqlCommand, type ServeAddress } from './pglite-lock.js';
import { PGliteThread } from './pglite-thread-client.js';
import type { DB } from './schema.js';

/*
 * The embedded database, owned by this process: PGlite with pgvector, and
 * the socket that serves it to others, all in a thread of their own
 * (pglite-thread.ts). Imported only when DATABASE_URL names PGlite
 * (src/db/connect.ts), so a command on a Postgres server never starts the
 * WASM engine or its extension.
 */

export async function openPGlite(
  dataDir: string | undefined,
  lock: HeldLock | undefined,
  options: OpenOptions,
): Promise<Database> {
  const notice = options.notice ?? (() => {});
  const engine = await PGliteThread.start(
    { dataDir: dataDir ? resolve(dataDir) : undefined, commits: options.commits === true },
    notice,
  );
  const db = new Kysely<DB>({ dialect: new PGliteDialect(engine) });
  let address: ServeAddress | undefined;
  if (lock && options.serve) {
    try {
      address = await engine.serve(lock.dir);
      lock.announce(address);
    } catch (error) {
      await engine.close();
      throw error;
    }
  }
  /** No longer serving: the lock says so first, so no one new tries to connect. */
  let stopping: Promise<void> | undefined;
  const stopServing = () =>
    (stopping ??= (async () => {
      if (!address) return;
      lock?.announce(undefined);
      await engine.stopServing();
    })());
  let stopWaiting = () => {};
  let cutOff = false;
  const serving: Serving | undefined = address && {
    psql: psqlCommand(address),
    cutOffClients() {
      // Now, not at close: a client holding the session must not keep this
      // process's last commits (or its exit) waiting.
      cutOff = true;
      stopWaiting();
      void stopServing();
    },
  };
  return {
    db,
    backend: 'pglite',
    oneSession: true,
    describe: dataDir ? `pglite:${dataDir}` : 'pglite:memory',
    serving,
    async watchChanges(onChange) {
      const stop = engine.onClientTurn(onChange);
      return async () => {
        stop();
      };
    },
    embeddingWriter(columnType, idType) {
      // PGlite has one session, so inside a Kysely transaction this COPY
      // runs in that transaction.
      return pgliteEmbeddingWriter((into, data) => engine.copyFrom(into, data), columnType, idType);
    },
    batchCommitter: (columnType) => engine.committer(columnType),
    // Once: openDatabase guards it.
    async close() {
      const clients = address && !cutOff ? await engine.clients() : 0;
      if (clients > 0) {
        notice(
          `still serving ${dataDir} to ${clients} connected client(s); exiting when they disconnect (Ctrl-C cuts them off)`,
        );
        await Promise.race([
          engine.whenIdle(),
          new Promise<void>((resolve) => {
            stopWaiting = resolve;
          }),
        ]);
      }
      await stopServing();
      await db.destroy();
      await engine.close();
      lock?.release();
    },
  };
}
