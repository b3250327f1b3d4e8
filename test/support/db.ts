import { randomBytes } from 'node:crypto';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, inject } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { migrateToLatest } from '../../src/db/migrator.js';

export type BackendName = 'pglite' | 'postgres';

/** Every backend this run can test against: PGlite always, a real server when one was found. */
export function backends(): BackendName[] {
  return inject('postgresServerUrl') ? ['pglite', 'postgres'] : ['pglite'];
}

export interface TestDatabase {
  /** DATABASE_URL for this test's own database. */
  readonly url: string;
  drop(): Promise<void>;
}

/**
 * A database of this test's own: a fresh database on the server, or a fresh
 * PGlite directory (on disk, so a spawned CLI process can open it too).
 */
export async function createTestDatabase(backend: BackendName): Promise<TestDatabase> {
  if (backend === 'pglite') {
    const dir = mkdtempSync(join(tmpdir(), 'pgembed-pglite-'));
    cpSync(inject('pgliteTemplateDir'), dir, { recursive: true });
    return {
      url: `pglite:${dir}`,
      async drop() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  const serverUrl = inject('postgresServerUrl');
  if (!serverUrl) throw new Error('no Postgres server for tests');
  const name = `pgembed_test_${randomBytes(6).toString('hex')}`;
  await withAdminClient(serverUrl, (c) => c.query(`create database ${name}`));
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    async drop() {
      await withAdminClient(serverUrl, (c) =>
        c.query(`drop database if exists ${name} with (force)`),
      );
    },
  };
}

/** Runs `fn` on a one-off connection to the server's admin database. */
export async function withAdminClient<T>(
  url: string,
  fn: (client: pg.Client) => Promise<T>,
): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** Opens and migrates a test database; the caller closes it. */
export async function openMigrated(url: string): Promise<Database> {
  const database = await openDatabase(url);
  try {
    await migrateToLatest(database, { warn: () => {} });
  } catch (error) {
    await database.close();
    throw error;
  }
  return database;
}

/**
 * A migrated test database for the whole file (describe block): made
 * before its tests, closed and dropped after them. Returns its accessor.
 */
export function useMigratedDatabase(backend: BackendName): () => Database {
  let target: TestDatabase | undefined;
  let database: Database | undefined;
  beforeAll(async () => {
    target = await createTestDatabase(backend);
    database = await openMigrated(target.url);
  });
  afterAll(async () => {
    await database?.close();
    await target?.drop();
  });
  return () => {
    if (!database) throw new Error('useMigratedDatabase: used outside its tests');
    return database;
  };
}
