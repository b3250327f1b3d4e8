import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { ConfigError, DatabaseConnectionError } from '../errors.js';
import { redactUrl } from '../redact.js';
import { PGliteDialect } from './pglite-dialect.js';
import type { DB } from './schema.js';

export const DEFAULT_PGLITE_DIR = './.data/pglite';

export type DatabaseTarget =
  | { kind: 'pglite'; dataDir: string | undefined /* undefined: in memory */ }
  | { kind: 'postgres'; connectionString: string };

export interface Database {
  readonly db: Kysely<DB>;
  readonly backend: DatabaseTarget['kind'];
  /**
   * `COPY … FROM '/dev/blob'` with the given bytes, on the current session.
   * PGlite only: it has one session, so inside a Kysely transaction this runs
   * in that transaction. Undefined on a pg pool.
   */
  readonly copyFromBlob?: (copySql: string, data: Uint8Array) => Promise<void>;
  /** Where we are connected, password removed: safe for logs. */
  readonly describe: string;
  close(): Promise<void>;
}

/** `DATABASE_URL` → backend. Unset means the embedded default, so a newcomer needs no server. */
export function parseDatabaseUrl(url: string | undefined): DatabaseTarget {
  const value = url?.trim();
  if (!value) return { kind: 'pglite', dataDir: DEFAULT_PGLITE_DIR };
  if (value.startsWith('postgres://') || value.startsWith('postgresql://')) {
    try {
      new URL(value);
    } catch {
      throw new ConfigError(`DATABASE_URL is not a valid URL: ${redactUrl(value)}`);
    }
    return { kind: 'postgres', connectionString: value };
  }
  if (value.startsWith('pglite:')) {
    const rest = value.slice('pglite:'.length).replace(/^\/\//, '');
    if (rest === 'memory') return { kind: 'pglite', dataDir: undefined };
    return { kind: 'pglite', dataDir: rest || DEFAULT_PGLITE_DIR };
  }
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(value)?.[1];
  throw new ConfigError(
    `DATABASE_URL has unsupported scheme '${scheme ?? value}': use postgres://user:pass@host:5432/db, pglite:<dir>, or pglite:memory`,
  );
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
}

export async function openDatabase(
  url: string | undefined,
  options: OpenOptions = {},
): Promise<Database> {
  const target = parseDatabaseUrl(url);
  return target.kind === 'pglite' ? openPGlite(target.dataDir) : openPostgres(target, options);
}

async function openPGlite(dataDir: string | undefined): Promise<Database> {
  if (dataDir) mkdirSync(resolve(dataDir), { recursive: true });
  const pglite = await PGlite.create(dataDir ? resolve(dataDir) : undefined, {
    extensions: { vector },
    // int8 as text, like pg, so ids stay exact and identical on both backends.
    parsers: { 20: (value: string) => value },
  });
  const db = new Kysely<DB>({ dialect: new PGliteDialect(pglite) });
  openHandles++;
  let closed = false;
  return {
    db,
    backend: 'pglite',
    describe: dataDir ? `pglite:${dataDir}` : 'pglite:memory',
    async copyFromBlob(copySql, data) {
      await pglite.query(copySql, [], { blob: new Blob([data]) });
    },
    async close() {
      if (closed) return;
      closed = true;
      openHandles--;
      await db.destroy();
      await pglite.close();
    },
  };
}

async function openPostgres(
  target: Extract<DatabaseTarget, { kind: 'postgres' }>,
  options: OpenOptions,
): Promise<Database> {
  const describe = redactUrl(target.connectionString);
  const pool = new pg.Pool({
    connectionString: target.connectionString,
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
  try {
    const client = await pool.connect();
    client.release();
  } catch (error) {
    await pool.end().catch(() => {});
    throw new DatabaseConnectionError(describeConnectError(error, target.connectionString), {
      cause: error,
    });
  }
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  openHandles++;
  let closed = false;
  return {
    db,
    backend: 'postgres',
    describe,
    async close() {
      if (closed) return;
      closed = true;
      openHandles--;
      await db.destroy(); // ends the pool
    },
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
