import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { turnsWhile } from '../support/turns.js';

const ports = () =>
  process.getActiveResourcesInfo().filter((resource) => resource === 'MessagePort').length;

describe('PGlite in a thread of its own', () => {
  // Counted, not timed: turns of this thread's event loop while one
  // statement runs. PGlite runs a statement synchronously, so on this thread
  // the loop could not turn at all until it ended.
  it('keeps the event loop turning while a statement runs', async () => {
    const database = await openDatabase('pglite:memory');
    try {
      const { value, turns } = await turnsWhile(() =>
        sql<{ n: string }>`select count(*) as n from generate_series(1, 2000000)`.execute(
          database.db,
        ),
      );
      expect(value.rows).toEqual([{ n: '2000000' }]);
      expect(turns).toBeGreaterThan(10);
    } finally {
      await database.close();
    }
  });

  it("gives back PGlite's errors with their SQLSTATE and fields, and goes on", async () => {
    const database = await openDatabase('pglite:memory');
    try {
      await sql`create table t (v text primary key)`.execute(database.db);
      await sql`insert into t values ('a')`.execute(database.db);
      const error = await sql`insert into t values (${'a'})`.execute(database.db).then(
        () => undefined,
        (e: unknown) => e as Record<string, unknown>,
      );
      expect(error).toBeInstanceOf(Error);
      expect(error).toMatchObject({
        message: 'duplicate key value violates unique constraint "t_pkey"',
        code: '23505',
        constraint: 't_pkey',
        detail: 'Key (v)=(a) already exists.',
      });
      // The statement's parameters (message texts, in pgembed) stay in the thread.
      expect(error).not.toHaveProperty('params');
      const { rows } = await sql<{ v: string }>`select v from t`.execute(database.db);
      expect(rows).toEqual([{ v: 'a' }]);
    } finally {
      await database.close();
    }
  });

  it('ends its thread on close', async () => {
    // The thread's port is what keeps a process alive: counted, not the
    // process's threads, which V8 and libuv start and end on their own.
    const before = ports();
    const database = await openDatabase('pglite:memory');
    expect(ports()).toBe(before + 1);
    await database.close();
    expect(ports()).toBe(before);
  });
});
