import { sql } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { parseVector } from '../../src/db/vector.js';
import { runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';
import { type FakeOpenAI, fakeEmbedding, startFakeOpenAI } from '../support/fake-openai.js';

describe.each(backends())("the application's own table on %s", (backend) => {
  let fake: FakeOpenAI;
  let database: TestDatabase | undefined;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
  });
  afterEach(async () => {
    await database?.drop();
    database = undefined;
  });

  async function freshDatabase(setup: string[]): Promise<string> {
    database = await createTestDatabase(backend);
    const db = await openDatabase(database.url);
    try {
      for (const statement of setup) await sql.raw(statement).execute(db.db);
    } finally {
      await db.close();
    }
    return database.url;
  }
  async function query<T>(url: string, text: string): Promise<T[]> {
    const db = await openDatabase(url);
    try {
      return (await sql.raw<T>(text).execute(db.db)).rows;
    } finally {
      await db.close();
    }
  }
  const embed = (url: string, args: string[]) =>
    runCli('embed', ['--batch-size', '4', ...args], {
      DATABASE_URL: url,
      OPENAI_BASE_URL: fake.url,
    });

  it('embeds a schema-qualified table with bigint ids and other column names, and creates no messages table', async () => {
    const url = await freshDatabase([
      'create schema app',
      'create table app.chat_turns (turn_id bigint primary key, body text not null, author text)',
      "insert into app.chat_turns select g, 'turn ' || g || ' of the chat', 'bot' from generate_series(1, 10) g",
      "insert into app.chat_turns values (11, '   ', 'bot')",
    ]);
    const args = ['--source', 'app.chat_turns', '--id-column', 'turn_id', '--text-column', 'body'];
    const result = await embed(url, args);
    expect(result.code, result.stderr).toBe(0);
    const rows = await query<{ id: string; embedding: string; type: string }>(
      url,
      `select message_id::text as id, embedding::text as embedding,
              pg_typeof(message_id)::text as type
       from message_embeddings order by message_id`,
    );
    expect(rows.map((r) => r.id)).toEqual(['1', '2', '3', '4', '5', '6', '7', '8', '9', '10']);
    expect(rows[0]?.type).toBe('bigint');
    expect(parseVector(rows[2]?.embedding as string).map(Math.fround)).toEqual(
      Array.from(fakeEmbedding('turn 3 of the chat', 1536)),
    );
    const tables = await query<{ exists: boolean }>(
      url,
      "select to_regclass('public.messages') is not null as exists",
    );
    expect(tables[0]?.exists).toBe(false);
    const status = await runCli('status', [...args, '--json'], { DATABASE_URL: url });
    expect(JSON.parse(status.stdout).coverage[0]).toMatchObject({ eligible: 10, upToDate: 10 });
  }, 60_000);

  it('keys embeddings by uuid for a uuid source: reruns, edits, status and search all follow it', async () => {
    const url = await freshDatabase([
      'create table notes (note_id uuid primary key, txt varchar(200) not null)',
      `insert into notes select ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
         'note number ' || g from generate_series(1, 9) g`,
    ]);
    const args = ['--source', 'notes', '--id-column', 'note_id', '--text-column', 'txt'];
    const first = await embed(url, [...args, '--range-size', '4', '--concurrency', '2']);
    expect(first.code, first.stderr).toBe(0);
    const types = await query<{ table: string; type: string }>(
      url,
      `select attrelid::regclass::text as table, format_type(atttypid, atttypmod) as type
       from pg_attribute
       where attname in ('message_id', 'cursor_id', 'hi_id') and attrelid in
         ('message_embeddings'::regclass, 'embedding_skips'::regclass, 'embedding_ranges'::regclass)
       order by 1`,
    );
    // message_embeddings.message_id, embedding_skips.message_id, embedding_ranges' cursor_id and hi_id.
    expect(types.map((t) => t.type)).toEqual(['uuid', 'uuid', 'uuid', 'uuid']);
    const count = await query<{ n: number }>(
      url,
      'select count(*)::int as n from message_embeddings',
    );
    expect(count[0]?.n).toBe(9);
    const ranges = await query<{ state: string; cursor: string }>(
      url,
      'select state, cursor_id::text as cursor from embedding_ranges order by range_no',
    );
    expect(ranges.map((r) => r.state)).toEqual(['done', 'done', 'done']);
    expect(ranges.at(-1)?.cursor).toBe('00000000-0000-4000-8000-000000000009');

    fake.reset();
    expect((await embed(url, args)).code).toBe(0);
    expect(fake.stats.requests).toBe(0);
    await query(
      url,
      "update notes set txt = 'an edited note' where note_id = '00000000-0000-4000-8000-000000000005'",
    );
    expect((await embed(url, args)).code).toBe(0);
    expect([...fake.stats.seen.keys()]).toEqual(['an edited note']);

    const found = await runCli('search', ['note number 7', ...args, '--json', '-k', '1'], {
      DATABASE_URL: url,
      OPENAI_BASE_URL: fake.url,
    });
    expect(found.code, found.stderr).toBe(0);
    expect(JSON.parse(found.stdout).hits[0]).toMatchObject({
      messageId: '00000000-0000-4000-8000-000000000007',
    });
  }, 90_000);

  it.for([
    [['--source', 'no_such_table'], /^pgembed: --source no_such_table: no such table or view/],
    [
      ['--source', 'notes', '--text-column', 'body'],
      /^pgembed: --source notes has no column 'body' \(--text-column\)/,
    ],
    [
      ['--source', 'notes', '--id-column', 'slug', '--text-column', 'txt'],
      /^pgembed: --id-column slug is text; ids must be an integer type or uuid/,
    ],
    [['--source', 'notes; drop table notes'], /^pgembed: --source must be a table or view name/],
  ] as const)(
    'refuses %j before any work, with one line naming the problem',
    async ([args, pattern]) => {
      const url = await freshDatabase([
        'create table notes (id bigint primary key, slug text, txt text not null)',
        "insert into notes values (1, 'a', 'one note')",
      ]);
      fake.reset();
      const result = await embed(url, [...args]);
      expect(result.code).toBe(1);
      expect(stderrLines(result)).toHaveLength(1);
      expect(stderrLines(result)[0]).toMatch(pattern);
      expect(fake.stats.requests).toBe(0);
      const tables = await query<{ exists: boolean }>(
        url,
        "select to_regclass('message_embeddings') is not null as exists",
      );
      expect(tables[0]?.exists).toBe(false);
    },
  );
});
