import { resolve } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import { Kysely } from 'kysely';
import type { Database, OpenOptions, Serving } from './connect.js';
import { pgliteEmbeddingWriter } from './embedding-writer.js';
import { PGliteDialect } from './pglite-dialect.js';
import type { HeldLock } from './pglite-lock.js';
import type { PGliteServer } from './pglite-server.js';
import { PGliteSession } from './pglite-session.js';
import type { DB } from './schema.js';

/*
 * The embedded database, in this process: PGlite with pgvector, and the
 * socket that serves it to others. Imported only when DATABASE_URL names
 * PGlite (src/db/connect.ts), so a command on a Postgres server never loads
 * the WASM engine or its extension.
 */

export async function openPGlite(
  dataDir: string | undefined,
  lock: HeldLock | undefined,
  options: OpenOptions,
): Promise<Database> {
  const pglite = await PGlite.create(dataDir ? resolve(dataDir) : undefined, {
    extensions: { vector },
    // int8 as text, like pg, so ids stay exact and identical on both backends.
    parsers: { 20: (value: string) => value },
  });
  const session = new PGliteSession(async () => {
    await pglite.exec('discard all');
  });
  const db = new Kysely<DB>({ dialect: new PGliteDialect(pglite, session) });
  const notice = options.notice ?? (() => {});
  let server: PGliteServer | undefined;
  if (lock && options.serve) {
    try {
      // pglite-socket only for a command that serves (embed, seed).
      const { PGliteServer } = await import('./pglite-server.js');
      server = await PGliteServer.start(pglite, session, lock.dir, { notice });
      lock.announce(server.address);
    } catch (error) {
      await server?.stop();
      await pglite.close();
      throw error;
    }
  }
  /** No longer serving: the lock says so first, so no one new tries to connect. */
  let stopping: Promise<void> | undefined;
  const stopServing = () =>
    (stopping ??= (async () => {
      if (!server) return;
      lock?.announce(undefined);
      await server.stop();
    })());
  let stopWaiting = () => {};
  let cutOff = false;
  const serving: Serving | undefined = server && {
    psql: server.psql,
    clients: () => server?.clients ?? 0,
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
    describe: dataDir ? `pglite:${dataDir}` : 'pglite:memory',
    serving,
    async watchChanges(onChange) {
      const stop = session.onClientTurn(onChange);
      return async () => {
        stop();
      };
    },
    embeddingWriter(columnType, idType) {
      // PGlite has one session, so inside a Kysely transaction this COPY
      // runs in that transaction.
      const copyFromBlob = async (copySql: string, data: Uint8Array) => {
        await pglite.query(copySql, [], { blob: new Blob([data]) });
      };
      return pgliteEmbeddingWriter(copyFromBlob, columnType, idType);
    },
    // Once: openDatabase guards it.
    async close() {
      if (server && !cutOff && server.clients > 0) {
        notice(
          `still serving ${dataDir} to ${server.clients} connected client(s); exiting when they disconnect (Ctrl-C cuts them off)`,
        );
        await Promise.race([
          server.whenIdle(),
          new Promise<void>((resolve) => {
            stopWaiting = resolve;
          }),
        ]);
      }
      await stopServing();
      await db.destroy();
      await pglite.close();
      lock?.release();
    },
  };
}
