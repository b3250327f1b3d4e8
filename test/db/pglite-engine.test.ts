import { PGlite } from '@electric-sql/pglite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { localEngine, type PGliteEngine } from '../../src/db/pglite-engine.js';
import { PGliteSession } from '../../src/db/pglite-session.js';

/** Binary COPY input of one bigint column (the format's header, rows, trailer). */
function bigintRows(values: bigint[]): Uint8Array {
  const data = Buffer.alloc(19 + values.length * 14 + 2);
  Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1').copy(data, 0);
  let offset = 19;
  for (const value of values) {
    offset = data.writeInt16BE(1, offset);
    offset = data.writeInt32BE(8, offset);
    offset = data.writeBigInt64BE(value, offset);
  }
  data.writeInt16BE(-1, offset);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

describe("PGlite's engine: binary COPY", () => {
  let pglite: PGlite;
  let engine: PGliteEngine;
  const files = () => (pglite.Module.FS as unknown as { readdir(path: string): string[] }).readdir;
  const left = () => files()('/tmp').filter((name) => name.startsWith('pgembed'));

  beforeAll(async () => {
    pglite = await PGlite.create();
    engine = localEngine(pglite, new PGliteSession(async () => {}));
    await pglite.exec('create table t (id bigint primary key)');
  });
  afterAll(async () => {
    await pglite?.close();
  });

  it('writes every row of its input and leaves no file behind', async () => {
    await engine.copyFrom('t (id)', bigintRows([1n, 2n, 9007199254740993n]));
    const { rows } = await pglite.query<{ id: string }>('select id::text as id from t order by id');
    expect(rows.map((row) => row.id)).toEqual(['1', '2', '9007199254740993']);
    expect(left()).toEqual([]);
  });

  it("fails with Postgres's own error, leaves no file, and the next COPY works", async () => {
    const error = await engine.copyFrom('t (id)', bigintRows([3n, 1n])).then(
      () => undefined,
      (e: unknown) => e as Record<string, unknown>,
    );
    expect(error).toMatchObject({ code: '23505', constraint: 't_pkey' });
    expect(left()).toEqual([]);
    await engine.copyFrom('t (id)', bigintRows([4n]));
    const { rows } = await pglite.query<{ n: number }>('select count(*)::int as n from t');
    // 3 went with its failed statement; 4 came after.
    expect(rows).toEqual([{ n: 4 }]);
  });
});
