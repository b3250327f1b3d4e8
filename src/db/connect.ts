import { mkdirSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { DatabaseConnectionError } from '../errors.js';
import { redactUrl } from '../redact.js';
import { WAKE_CHANNEL } from '../sql/capture.js';
import { type BatchCommitter, localCommitter } from '../worker/commit.js';
import { type EmbeddingWriter, postgresEmbeddingWriter } from './embedding-writer.js';
import {
  type DatabaseTarget,
  type EmbeddingColumnType,
  type IdType,
  parseDatabaseUrl,
} from './names.js';
import { acquireDirectoryLock, pgConfig, stillServing } from './pglite-lock.js';
import type { DB } from './schema.js';

export interface Database {
  readonly db: Kysely<DB>;
  readonly backend: DatabaseTarget['kind'];
  /**
   * One session serves every client, one statement or transaction at a
   * time: PGlite, in this process or served over its socket. No
   * transaction then commits while one of ours runs (ClaimScope.oneSession).
   */
  readonly oneSession: boolean;
  /** How this backend writes a batch's vectors into a column of this type, chosen once. */
  embeddingWriter(columnType: EmbeddingColumnType, idType: IdType): EmbeddingWriter;
  /** How a run commits its batches here, vectors written as embeddingWriter writes them. */
  batchCommitter(columnType: EmbeddingColumnType): BatchCommitter;
  /** Where we are connected, password removed: safe for logs. */
  readonly describe: string;
  /** Set while this process serves its PGlite directory to other processes. */
  readonly serving?: Serving | undefined;
  /**
   * Calls `onChange` whenever other sessions may have queued work: a NOTIFY
   * from the capture triggers on a Postgres server (one LISTEN connection of
   * its own), a served client's turn on PGlite. Undefined where neither can
   * be heard (a client of a PGlite another process serves): poll instead.
   * Returns the function that stops listening.
   */
  readonly watchChanges?: ((onChange: () => void) => Promise<() => Promise<void>>) | undefined;
  close(): Promise<void>;
}

// Counts handles that are open, so the test suite can fail on a leaked pool.
let openHandles = 0;
export function openDatabaseHandles(): number {
  return openHandles;
}

export interface OpenOptions {
  /** pg pool size; each in-flight batch holds one connection while it commits. */
  poolMax?: number;
  /** Called for errors on idle pooled connections, which would otherwise crash the process. */
  onIdleError?: (error: Error) => void;
  /** PGlite directory: the command named in its lock, for the lines other processes print. */
  command?: string;
  /**
   * PGlite directory: serve it to other processes (status, search, psql, a
   * second embed) while this process holds it. For long-running commands;
   * others waiting for a short one is cheaper than it serving them.
   */
  serve?: boolean;
  /**
   * The process will commit runs' batches (embed): PGlite's thread loads the
   * commit code while the engine opens, not after (see pglite-thread.ts).
   */
  commits?: boolean;
  /** PGlite directory: how long to wait for a holder that does not serve it. */
  lockWaitMs?: number;
  /** One line for a person: a lock taken over, a wait, clients still served at close. */
  notice?: (message: string) => void;
  /** Postgres: whether watchChanges may open a LISTEN connection (default true). */
  listen?: boolean;
}

/** This process serves its PGlite directory to others. */
export interface Serving {
  /** The exact psql command that reaches the database. */
  readonly psql: string;
  /** Close does not wait for connected clients; if it is waiting, it stops waiting. */
  cutOffClients(): void;
}

// A short command (status, search, migrate) holds the directory for well
// under a second, seed for as long as its input takes; 30 s covers both.
const DEFAULT_LOCK_WAIT_MS = 30_000;

export async function openDatabase(
  url: string | undefined,
  options: OpenOptions = {},
): Promise<Database> {
  const database = await openTarget(parseDatabaseUrl(url), options);
  openHandles++;
  let closed = false;
  return {
    ...database,
    async close() {
      if (closed) return;
      closed = true;
      openHandles--;
      await database.close();
    },
  };
}

async function openTarget(target: DatabaseTarget, options: OpenOptions): Promise<Database> {
  if (target.kind === 'postgres') {
    return openPostgres(
      { connectionString: target.connectionString },
      redactUrl(target.connectionString),
      options,
      (error) => describeConnectError(error, target.connectionString),
    );
  }
  // The WASM engine and pgvector cost ~0.1 s and tens of MB to load: only here.
  const { openPGlite } = await import('./pglite-open.js');
  if (target.dataDir === undefined) return openPGlite(undefined, undefined, options);
  mkdirSync(resolve(target.dataDir), { recursive: true });
  const dir = realpathSync(resolve(target.dataDir));
  const notice = options.notice ?? ((message) => process.stderr.write(`pgembed: ${message}\n`));
  for (;;) {
    const acquired = await acquireDirectoryLock(dir, {
      command: options.command ?? 'pgembed',
      waitMs: options.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS,
      notice,
    });
    if (acquired.kind === 'held') {
      try {
        return await openPGlite(target.dataDir, acquired.lock, { ...options, notice });
      } catch (error) {
        acquired.lock.release();
        throw error;
      }
    }
    const { holder } = acquired;
    const where = `the embedded database ${target.dataDir} served by pid ${holder.pid} (${holder.command})`;
    try {
      return await openPostgres(
        pgConfig(holder.serving),
        `pglite:${target.dataDir} (served by pid ${holder.pid})`,
        // LISTEN on the one session the holder shares would not last: its
        // reset between owners unlistens. A client polls.
        { ...options, listen: false },
        (error) => `cannot connect to ${where}: ${firstLine((error as Error).message)}`,
      );
    } catch (error) {
      // It is closing, or was killed, since it wrote its lock: look again,
      // to wait for it or take the directory over.
      if (!stillServing(dir, holder)) continue;
      throw error;
    }
  }
}

async function openPostgres(
  connection: pg.PoolConfig,
  describe: string,
  options: OpenOptions,
  describeError: (error: unknown) => string,
): Promise<Database> {
  const pool = new pg.Pool({
    ...connection,
    max: options.poolMax ?? 4,
    // Fail a dead host in 10 s rather than the OS's 2-minute TCP timeout.
    connectionTimeoutMillis: 10_000,
    application_name: 'pgembed',
    // A peer that vanished without a FIN/RST (a network blip) is found by
    // keepalive probes instead of a query that waits forever.
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
  });
  pool.on('error', (error) => options.onIdleError?.(error));
  // pg emits 'error' on a checked-out client whose connection drops (after
  // failing its query); with no listener that would crash the process
  // instead of letting the query's caller retry on a new connection.
  pool.on('connect', (client) => client.on('error', () => {}));
  let versionRow: { version: string } | undefined;
  try {
    const client = await pool.connect();
    try {
      ({
        rows: [versionRow],
      } = await client.query<{ version: string }>('select version()'));
    } finally {
      client.release();
    }
  } catch (error) {
    await pool.end().catch(() => {});
    throw new DatabaseConnectionError(describeError(error), { cause: error });
  }
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  return {
    db,
    backend: 'postgres',
    // PGlite served over its socket (by pgembed, or pglite-socket) runs one
    // statement, or one client's transaction, at a time.
    oneSession: /\(PGlite /.test(versionRow?.version ?? ''),
    describe,
    embeddingWriter: (columnType) => postgresEmbeddingWriter(columnType),
    batchCommitter: (columnType) =>
      localCommitter(postgresEmbeddingWriter(columnType), { overConnection: true }),
    watchChanges:
      options.listen === false ? undefined : (onChange) => listenForChanges(connection, onChange),
    // Once: openDatabase guards it.
    async close() {
      await db.destroy(); // ends the pool
    },
  };
}

/**
 * LISTENs for the capture triggers' NOTIFY on a connection of its own (a
 * pooled one would be handed to a query). A notification from another
 * pgembed schema in the database is ignored. A lost connection is made again
 * after a second, waking the caller, since a change may have gone unheard.
 */
async function listenForChanges(
  connection: pg.PoolConfig,
  onChange: () => void,
): Promise<() => Promise<void>> {
  let stopped = false;
  let client: pg.Client | undefined;
  let retry: NodeJS.Timeout | undefined;
  const connect = async (): Promise<void> => {
    const next = new pg.Client({ ...connection, application_name: 'pgembed listen' });
    next.on('error', () => {});
    next.on('end', () => {
      if (stopped) return;
      retry = setTimeout(() => {
        void connect()
          .then(onChange)
          .catch(() => next.emit('end'));
      }, 1000);
      retry.unref();
    });
    await next.connect();
    const { rows } = await next.query<{ schema: string }>('select current_schema() as schema');
    const schema = rows[0]?.schema;
    next.on('notification', (message) => {
      if (message.channel === WAKE_CHANNEL && message.payload === schema) onChange();
    });
    await next.query(`listen ${WAKE_CHANNEL}`);
    client = next;
  };
  await connect();
  return async () => {
    stopped = true;
    clearTimeout(retry);
    await client?.end().catch(() => {});
  };
}

/** One line that says what is wrong with the connection and where to fix it. */
export function describeConnectError(error: unknown, connectionString: string): string {
  const url = new URL(connectionString);
  const where = `${url.hostname || 'localhost'}:${url.port || '5432'}`;
  const user = decodeURIComponent(url.username) || process.env.PGUSER || 'current user';
  const database = decodeURIComponent(url.pathname.replace(/^\//, '')) || user;
  const e = error as { code?: string; message?: string };
  const prefix = `cannot connect to Postgres at ${where} (DATABASE_URL=${redactUrl(connectionString)})`;
  switch (e.code) {
    case 'ECONNREFUSED':
      return `${prefix}: connection refused; is the server running and listening there?`;
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return `${prefix}: host '${url.hostname}' not found`;
    case 'ETIMEDOUT':
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return `${prefix}: host unreachable (${e.code})`;
    case '28P01':
      return `${prefix}: password authentication failed for user "${user}"`;
    case '28000':
      return `${prefix}: ${firstLine(e.message)} (check the user in DATABASE_URL and pg_hba.conf)`;
    case '3D000':
      return `${prefix}: database "${database}" does not exist`;
  }
  if (/timeout/i.test(e.message ?? '')) return `${prefix}: timed out after 10 s`;
  return `${prefix}: ${firstLine(e.message) || e.code || 'unknown error'}`;
}

function firstLine(text: string | undefined): string {
  return (text ?? '').split('\n')[0]?.trim() ?? '';
}
