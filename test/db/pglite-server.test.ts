import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PGlite } from '@electric-sql/pglite';
import { Kysely, sql } from 'kysely';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, inject, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { PGliteDialect } from '../../src/db/pglite-dialect.js';
import { localEngine } from '../../src/db/pglite-engine.js';
import { pgConfig } from '../../src/db/pglite-lock.js';
import { PGliteServer } from '../../src/db/pglite-server.js';
import { PGliteSession } from '../../src/db/pglite-session.js';

/** Resolves once `check` holds, looking again on every turn of the event loop. */
async function until(check: () => boolean): Promise<void> {
  while (!check()) await new Promise((resolve) => setImmediate(resolve));
}

describe('serving PGlite to other processes', () => {
  let dir: string;
  let pglite: PGlite;
  let session: PGliteSession;
  let server: PGliteServer;
  let db: Kysely<{ t: { v: string } }>;
  const clients: pg.Client[] = [];
  const notices: string[] = [];

  async function connect(config: Partial<pg.ClientConfig> = {}): Promise<pg.Client> {
    const client = new pg.Client({ ...pgConfig(server.address), ...config });
    client.on('error', () => {});
    clients.push(client);
    await client.connect();
    return client;
  }

  async function values(): Promise<string[]> {
    const rows = await db.selectFrom('t').select('v').orderBy('v').execute();
    return rows.map((row) => row.v);
  }

  // One database for the file: opening PGlite on disk takes seconds.
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pgembed-serve-'));
    pglite = await PGlite.create(dir);
    session = new PGliteSession(async () => {
      await pglite.exec('discard all');
    });
    db = new Kysely({ dialect: new PGliteDialect(localEngine(pglite, session)) });
    server = await PGliteServer.start(pglite, session, dir, {
      notice: (message) => notices.push(message),
      // Short, so the test that leaves a transaction open sees it closed soon.
      holdIdleMs: 200,
    });
  });
  beforeEach(async () => {
    await sql`drop table if exists t`.execute(db);
    await sql`create table t (v text)`.execute(db);
  });
  afterEach(async () => {
    await Promise.all(clients.splice(0).map((client) => client.end().catch(() => {})));
    await until(() => server.clients === 0);
  });
  afterAll(async () => {
    await server.stop();
    await db.destroy();
    await pglite.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('is one session to a pgembed client, and a Postgres server is not', async () => {
    const { socketDir, port } = server.address;
    const served = await openDatabase(
      `postgres://postgres@localhost:${port}/postgres?host=${encodeURIComponent(socketDir)}`,
    );
    try {
      // So its claims take no row locks and read in their own statement.
      expect(served.oneSession).toBe(true);
    } finally {
      await served.close();
    }
    const serverUrl = inject('postgresServerUrl');
    if (serverUrl) {
      const database = await openDatabase(serverUrl);
      try {
        expect(database.oneSession).toBe(false);
      } finally {
        await database.close();
      }
    }
  });

  it('listens on a unix socket in the data directory, where psql -h DIR looks', () => {
    expect(server.address).toEqual({ socketDir: dir, port: 5432 });
  });

  it("never runs a client's statement inside the holder's transaction", async () => {
    const client = await connect();
    let clientInsert: Promise<unknown> | undefined;
    await db
      .transaction()
      .execute(async (trx) => {
        await sql`insert into t values ('holder')`.execute(trx);
        clientInsert = client.query(`insert into t values ('client')`);
        // The client's statement has reached the server and waits for the session.
        await until(() => session.waiting === 1);
        throw new Error('roll the holder back');
      })
      .catch(() => {});
    await clientInsert;
    // Had the client's insert run inside the holder's transaction, the
    // rollback would have taken it too.
    expect(await values()).toEqual(['client']);
  });

  it("keeps the holder out of a client's transaction until it ends", async () => {
    const client = await connect();
    await client.query('begin');
    await client.query(`insert into t values ('client')`);
    const holderInsert = sql`insert into t values ('holder')`.execute(db);
    await until(() => session.waiting === 1);
    await client.query('rollback');
    await holderInsert;
    expect(await values()).toEqual(['holder']);
  });

  it('rolls back what a client left open when it went away, and serves the next one', async () => {
    const client = await connect();
    await client.query('begin');
    await client.query(`insert into t values ('lost')`);
    const gone = new Promise((resolve) => client.once('end', resolve));
    // A client killed mid-transaction: its socket closes without a COMMIT.
    (
      client as unknown as { connection: { stream: { destroy(): void } } }
    ).connection.stream.destroy();
    await gone;
    await until(() => server.clients === 0);
    expect(await values()).toEqual([]);
    const next = await connect();
    expect((await next.query('select count(*)::int as n from t')).rows).toEqual([{ n: 0 }]);
  });

  it('gives every client the same start: a startup packet PGlite would find FATAL harms no one', async () => {
    // node-postgres sends user '' as given; PGlite answers a startup without a
    // user with FATAL, which left its one backend unusable for the holder.
    const odd = await connect({
      user: '',
      database: 'whatever',
      options: '-c search_path=nowhere',
    });
    expect(
      (await odd.query(`select current_user as u, current_setting('search_path') as p`)).rows,
    ).toEqual([{ u: 'postgres', p: 'public' }]);
    await sql`insert into t values ('holder')`.execute(db);
    expect(await values()).toEqual(['holder']);
  });

  it('resets what a client set in the session before anyone else takes a turn', async () => {
    const client = await connect();
    await client.query('set search_path = nowhere');
    await client.query('set default_transaction_read_only = on');
    // Its own settings hold for its next statement...
    expect((await client.query(`select current_setting('search_path') as p`)).rows).toEqual([
      { p: 'nowhere' },
    ]);
    // ...but not for the holder, whose insert would fail under either of them.
    await sql`insert into t values ('holder')`.execute(db);
    expect(await values()).toEqual(['holder']);
  });

  it('closes a client that sends a message type PGlite does not know, and goes on', async () => {
    // PGlite spins forever on an unknown type: the holder's event loop stopped.
    const socket = createConnection(join(dir, '.s.PGSQL.5432'));
    const received: Buffer[] = [];
    socket.on('data', (chunk) => received.push(chunk));
    const closed = new Promise((resolve) => socket.once('close', resolve));
    await new Promise((resolve) => socket.once('connect', resolve));
    const startup = Buffer.from('\0\0\0\0\0\x03\0\0user\0postgres\0\0', 'latin1');
    startup.writeInt32BE(startup.length, 0);
    socket.write(Buffer.concat([startup, Buffer.from([0x7a, 0, 0, 0, 4])]));
    await closed;
    expect(Buffer.concat(received).toString('latin1')).toContain(
      'invalid frontend message type 122',
    );
    await sql`insert into t values ('holder')`.execute(db);
    expect(await values()).toEqual(['holder']);
  });

  it('closes a client that keeps the session in an open transaction without a statement', async () => {
    const client = await connect();
    const ended = new Promise((resolve) => client.once('end', resolve));
    await client.query('begin');
    await client.query(`insert into t values ('abandoned')`);
    // The holder's statement waits behind the open transaction until the
    // client is closed and its transaction rolled back.
    await sql`insert into t values ('holder')`.execute(db);
    await ended;
    expect(notices.at(-1)).toMatch(
      /^closed a client that kept the embedded database in an open transaction/,
    );
    expect(await values()).toEqual(['holder']);
  });

  it('tells when the last client has gone', async () => {
    const client = await connect();
    expect(server.clients).toBe(1);
    const idle = server.whenIdle();
    await client.end();
    await idle;
    expect(server.clients).toBe(0);
  });
});
