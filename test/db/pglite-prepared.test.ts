import { PGlite } from '@electric-sql/pglite';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  type EngineConnection,
  localEngine,
  type PGliteEngine,
} from '../../src/db/pglite-engine.js';
import { PGliteSession } from '../../src/db/pglite-session.js';

/*
 * Statements with parameters run as named prepared statements of PGlite's
 * one session (src/db/pglite-prepared.ts). The session's own catalog,
 * pg_prepared_statements, says what it holds and how often each ran.
 */
describe("PGlite's engine: statements prepared once", () => {
  let pglite: PGlite;
  let session: PGliteSession;
  let engine: PGliteEngine;

  /** One statement in a turn of its own, as the dialect runs one outside a transaction. */
  async function run<R>(text: string, parameters: readonly unknown[] = []): Promise<R[]> {
    const connection = await engine.acquire();
    try {
      return (await connection.query<R>(text, parameters)).rows;
    } finally {
      connection.release();
    }
  }
  /** What the session holds prepared, read as text (no parameters, so never prepared itself). */
  const held = () =>
    run<{ statement: string; generic: number; custom: number }>(
      `select statement, generic_plans::int as generic, custom_plans::int as custom
       from pg_prepared_statements order by name`,
    );

  beforeAll(async () => {
    pglite = await PGlite.create({ parsers: { 20: (value: string) => value } });
    session = new PGliteSession(async () => {
      await pglite.exec('discard all');
    });
    engine = localEngine(pglite, session);
  });
  afterAll(async () => {
    await pglite?.close();
  });
  beforeEach(async () => {
    await pglite.exec(`drop table if exists t;
      create table t (id bigint primary key, v text, b bytea, tags text[], j jsonb)`);
    // Each test starts with nothing prepared: a served client's turn, then
    // the holder's, resets the session, and the cache learns of it.
    (await session.acquire(1))();
    (await session.acquire())();
  });

  it('prepares a repeated text once and plans it once for all its calls', async () => {
    const text = 'insert into t (id, v) values ($1, $2) returning id, v';
    for (let i = 1; i <= 12; i++) {
      expect(await run(text, [i, `v${i}`])).toEqual([{ id: String(i), v: `v${i}` }]);
    }
    const [one, ...others] = await held();
    expect(others).toEqual([]);
    expect(one?.statement).toBe(text);
    // Postgres plans the first five custom, then keeps the generic plan when
    // it costs no more: planned once for the other seven.
    expect(one?.custom).toBe(5);
    expect(one?.generic).toBe(7);
  });

  it("answers as PGlite's own query() does, for every type the worker sends and reads", async () => {
    const insert = 'insert into t (id, v, b, tags, j) values ($1, $2, $3, $4::text[], $5)';
    const parameters = [
      '9007199254740993',
      null,
      new Uint8Array([0, 1, 255]),
      ['a', 'b,c', null, '"q"'],
      JSON.stringify({ k: [1, 'x'] }),
    ];
    await run(insert, parameters);
    await run(insert, ['1', "it's", new Uint8Array([]), [], null]);
    const select = `select id, v, b, tags, j, id = any($1::bigint[]) as hit, count(*) over () as n
      from t where id > $2 order by id`;
    const args = [['1', '5'], 0];
    const prepared = await run(select, args);
    expect(prepared).toEqual((await pglite.query(select, args)).rows);
    expect(prepared[1]).toEqual({
      id: '9007199254740993',
      v: null,
      b: new Uint8Array([0, 1, 255]),
      tags: ['a', 'b,c', null, '"q"'],
      j: { k: [1, 'x'] },
      hit: false,
      n: '2',
    });
    // Without parameters: unnamed, in one call, answered the same.
    const bare = 'select id, b, tags, j from t order by id';
    expect(await run(bare)).toEqual((await pglite.query(bare)).rows);
    const connection = await engine.acquire();
    try {
      const update = await connection.query('update t set v = $1 where id >= $2', ['w', 0]);
      expect(update.affectedRows).toBe(2);
      expect((await connection.query('delete from t', [])).affectedRows).toBe(2);
    } finally {
      connection.release();
    }
  });

  it("fails with Postgres's error, and the transaction and the next statements go on as they would", async () => {
    const insert = 'insert into t (id, v) values ($1, $2)';
    const connection: EngineConnection = await engine.acquire();
    try {
      await connection.query('begin', []);
      await connection.query(insert, [1, 'a']);
      const error = await connection.query(insert, [1, 'b']).then(
        () => undefined,
        (e: unknown) => e as Record<string, unknown>,
      );
      expect(error).toMatchObject({ code: '23505', constraint: 't_pkey', query: insert });
      const aborted = await connection.query('select $1::int as x', [1]).catch((e: unknown) => e);
      expect(aborted).toMatchObject({ code: '25P02' });
      await connection.query('rollback', []);
      // Not a statement of the session's: a syntax error prepares nothing.
      await expect(connection.query('selec $1', [1])).rejects.toMatchObject({ code: '42601' });
      await expect(connection.query('select 1 / 0', [])).rejects.toMatchObject({ code: '22012' });
    } finally {
      connection.release();
    }
    await run(insert, [2, 'c']);
    expect(await run('select id, v from t where id > $1', [0])).toEqual([{ id: '2', v: 'c' }]);
  });

  it('keeps at most 64 statements, the least recently used going first', async () => {
    const first = 'select $1::int as n';
    await run(first, [0]);
    for (let i = 1; i <= 70; i++) {
      await run(`select $1::int + ${i} as n`, [i]);
      // The first stays in use, so it is never the least recent.
      await run(first, [i]);
    }
    const statements = (await held()).map((s) => s.statement);
    expect(statements).toHaveLength(64);
    expect(statements).toContain(first);
    expect(statements).not.toContain('select $1::int + 1 as n');
    expect(statements).toContain('select $1::int + 70 as n');
    expect(await run('select $1::int + 1 as n', [1])).toEqual([{ n: 2 }]);
  });

  it('prepares again after a served client has had the session and it was reset', async () => {
    const text = 'select count(*)::int as n from t where id > $1';
    expect(await run(text, [0])).toEqual([{ n: 0 }]);
    // A served client's turn, then the holder's: the session is reset
    // (DISCARD ALL), and what it had prepared is gone.
    (await session.acquire(7))();
    expect(await run(text, [0])).toEqual([{ n: 0 }]);
    expect((await held()).map((s) => s.statement)).toEqual([text]);
  });
});
